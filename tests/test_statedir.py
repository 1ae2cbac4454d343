"""The state directory's layout (DESIGN.md, "Runtime layout"), spelled out once more here
on purpose: a change to a name in ``StateDir`` is a change to the on-disk layout."""

from __future__ import annotations

from pathlib import Path

import config
from statedir import StateDir


def test_every_path_under_the_state_directory(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    names = {
        "log_dir": "", "events": "events.jsonl", "segments": "segments",
        "snapshots": "snapshots", "status": "status.json", "lock": "daemon.lock",
        "outputs": "outputs", "artifacts": "artifacts", "logs": "logs", "dry_run": "dry-run",
        "single_instance_comparison": "single-instance-comparison",
    }
    for attribute, name in names.items():
        assert getattr(state, attribute) == tmp_path / name, attribute
    spool = state.spool
    assert (spool.root, spool.tmp, spool.incoming, spool.force, spool.accepted,
            spool.rejected, spool.commands) == tuple(
        tmp_path / "spool" / p for p in ("", "tmp", "incoming", "incoming/force", "accepted",
                                         "rejected", "commands"))


def test_a_relative_or_text_state_dir_is_taken_as_a_path() -> None:
    state = StateDir("var")  # type: ignore[arg-type]
    assert state.root == Path("var") and state.status == Path("var/status.json")
    assert state.spool.root == Path.cwd() / "var" / "spool"  # the spool is absolute


def test_artifact_dir_defaults_to_the_state_dirs(tmp_path: Path) -> None:
    settings = config.load_settings(None, {"STATE_DIR": str(tmp_path)})
    assert settings.artifact_dir == StateDir(tmp_path).artifacts == tmp_path / "artifacts"
