"""A real full disk under a service daemon: its state directory on a small tmpfs, filled
while a batch renders and while the daemon is down. Nothing ends the daemon; dispatch
pauses, says so, and resumes once space is freed; nothing is lost or rendered twice."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import wait_for
from test_service import Service, prompt, service  # noqa: F401 - the fixture

import submit


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/state`` on a tmpfs of 8 MiB (skipped where mounting is not allowed)."""
    state = tmp_path / "state"
    state.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(state)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk refuses more; returns it (delete it to free space)."""
    filler = disk / "filler"
    with contextlib.suppress(OSError), filler.open("wb", buffering=0) as f:
        while True:
            f.write(b"\0" * 65536)
    with contextlib.suppress(OSError), filler.open("ab", buffering=0) as f:
        while True:  # the last blocks, a byte at a time
            f.write(b"\0" * 512)
    with pytest.raises(OSError) as refused:
        (disk / "probe").write_bytes(b"\0" * 4096)
    assert refused.value.errno == errno.ENOSPC
    return filler


def status_lines(svc: Service) -> list[str]:
    return [m for m in svc.messages if m.startswith("STATUS=")]


def test_a_full_disk_pauses_the_daemon_and_freeing_it_resumes(
        tmp_path: Path, small_disk: Path, sims, service, capsys) -> None:  # noqa: F811
    svc: Service = service().start()
    spool = small_disk / "spool"
    prompt(spool / "tmp", "v", frames=606).rename(spool / "incoming" / "v.txt")
    wait_for(lambda: sims[0].executions(), "the first render")
    late = prompt(spool / "tmp", "late", frames=101)  # written while there is room
    filler = fill(small_disk)
    late.rename(spool / "incoming" / "late.txt")  # something to record, whatever renders
    wait_for(lambda: any("EVENT LOG NOT WRITABLE" in m for m in status_lines(svc)),
             "the status line says the log cannot be written")
    assert svc.proc.poll() is None
    assert submit.main(["status", "--state-dir", str(small_disk)]) == 0
    shown = capsys.readouterr().out
    assert "EVENT LOG NOT WRITABLE" in shown or "is the state directory's disk full?" in shown

    filler.unlink()
    for batch in ("b0001", "b0002"):
        svc.wait_state(batch, "done", timeout=60)
    assert all(n == 1 for sim in sims for n in sim.counts().values())
    rendered = [r["job_id"] for sim in sims for r in sim.executions()]
    assert len(rendered) == len(set(rendered)) == 21  # 6 + 1 chunks: every job once

    svc.terminate()
    filler = fill(small_disk)  # full while the daemon is down: it starts and waits
    (tmp_path / "again").mkdir()
    again = Service(tmp_path / "again", sims[0].port, sims[1].port)
    again.state = small_disk
    try:
        again.start()
        assert again.proc.poll() is None
        filler.unlink()
        prompt(spool / "tmp", "w").rename(spool / "incoming" / "w.txt")
        wait_for(lambda: again.batch_state("b0003") == "done", "a render after the restart")
        again.terminate()
        assert "Traceback" not in again.stderr()
    finally:
        again.close()
    assert "Traceback" not in svc.stderr()
    assert "Traceback" not in (small_disk / "logs" / "comfy-dual.jsonl").read_text()
    assert not os.path.exists(small_disk / ".status.json.tmp")
