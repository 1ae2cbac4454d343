"""The daemon's command line: dry run, bad configuration, unreachable servers, logs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import daemon

PROJECT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((PROJECT / "examples" / "prompts").iterdir())


def run_daemon(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROJECT / "daemon.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=PROJECT)


def test_dry_run_writes_the_plan_and_every_rendered_workflow(tmp_path, capsys):
    code = daemon.main(["--dry-run", "--state-dir", str(tmp_path), *map(str, EXAMPLES)])
    assert code == 0
    out = tmp_path / "dry-run"
    batches = sorted(p.name for p in out.iterdir())
    assert batches == ["b0001", "b0002", "b0003"]
    plan = json.loads((out / "b0001" / "plan.json").read_text())
    graphs = sorted(p.name for p in (out / "b0001").iterdir() if p.name != "plan.json")
    assert len(graphs) == len(plan["jobs"])
    assert not (tmp_path / "events.jsonl").exists()
    assert "b0001" in capsys.readouterr().out


def test_a_bad_config_stops_with_the_key_and_the_fix(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('COMBINE_GATE = "phases"\n')
    result = run_daemon("--config", str(bad), str(EXAMPLES[0]))
    assert result.returncode == 2
    assert "COMBINE_GATE = 'phases'" in result.stderr and "'batch'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_second_daemon_on_the_same_state_refuses_naming_the_pid(tmp_path):
    from service.lock import StateLock, StateLocked

    with StateLock(tmp_path / "daemon.lock"):
        try:
            with StateLock(tmp_path / "daemon.lock"):
                raise AssertionError("two locks on one state directory")
        except StateLocked as exc:
            assert "pid" in str(exc) and str(tmp_path) in str(exc)


def test_unreachable_servers_are_reported_without_a_traceback(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("HEALTH_INTERVAL = 0.2\nPROBE_BACKOFF_MAX = 0.5\nCONNECT_TIMEOUT = 0.2\n"
                   "[[COMFYUI_INSTANCES]]\ninstance_id = 'gone'\nhost = '127.0.0.1'\n"
                   "port = 9\njob_types = ['HIGH', 'LOW']\n")
    proc = subprocess.Popen([sys.executable, str(PROJECT / "daemon.py"), "--config", str(cfg),
                             "--state-dir", str(tmp_path / "s"), str(EXAMPLES[0])],
                            stderr=subprocess.PIPE, text=True, cwd=PROJECT)
    lines = []
    try:
        while not lines or "is down" not in lines[-1]:
            lines.append(proc.stderr.readline())
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=30)[1]
    text = "".join(lines) + rest
    assert "Instance gone at 127.0.0.1:9 is down" in text
    assert "Traceback" not in text
    assert proc.returncode != 0  # stopped before the batch could finish
    logged = (tmp_path / "s" / "logs" / "comfy-dual.jsonl").read_text().splitlines()
    assert any(json.loads(line).get("detail") for line in logged)
