"""The daemon's command line: dry run, bad configuration, unreachable servers, logs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_end_to_end import settings_for

import daemon

PROJECT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((PROJECT / "examples" / "prompts").iterdir())


def run_daemon(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROJECT / "daemon.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=PROJECT)


def test_the_production_daemon_imports_neither_the_simulator_nor_aiohttp():
    """The simulator (and aiohttp under it) is loaded only by ``--simulate``."""
    check = ("import daemon, sys; "
             "assert 'aiohttp' not in sys.modules and 'simulator' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          timeout=60, cwd=PROJECT)
    assert done.returncode == 0, done.stderr


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
                   "WEB_ADDRESS = ''\n"
                   "[[COMFYUI_INSTANCES]]\ninstance_id = 'gone'\nhost = '127.0.0.1'\n"
                   "port = 9\njob_types = ['HIGH', 'LOW']\n")
    proc = subprocess.Popen([sys.executable, str(PROJECT / "daemon.py"), "--config", str(cfg),
                             "--state-dir", str(tmp_path / "s"), str(EXAMPLES[0])],
                            stderr=subprocess.PIPE, text=True, cwd=PROJECT)
    assert proc.stderr is not None
    lines: list[str] = []
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


def hostile_paths(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    sparse = tmp_path / "sparse.txt"
    with sparse.open("wb") as f:
        f.truncate(2 << 30)
    digits = tmp_path / "digits.txt"
    digits.write_bytes(b"v\n\n" + b"7" * 6000 + b"\n\np\n")
    nested = tmp_path / "nested.toml"
    nested.write_text("name = 'x'\nframes = 10\npositive = 'p'\nz = " + "[" * 3000 + "]" * 3000)
    return {"FIFO": fifo, "character device": Path("/dev/zero"), "directory": tmp_path,
            "larger than the limit": sparse, "No such file": tmp_path / "missing.txt",
            "6,000 digits": digits, "too deeply": nested}


@pytest.mark.parametrize("mode", [[], ["--dry-run"]])
def test_hostile_files_on_the_command_line_exit_2_with_their_reasons(tmp_path, mode):
    cases = hostile_paths(tmp_path)
    result = run_daemon(*mode, "--state-dir", str(tmp_path / "state"),
                        *map(str, cases.values()), timeout=30)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    for reason, path in cases.items():
        assert any(line.startswith(f"{path}: refused: ") and reason in line for line in lines), \
            (reason, result.stderr)
    assert not (tmp_path / "state" / "events.jsonl").exists()  # nothing was started


def test_a_file_refused_in_the_loop_is_not_summed_up_as_done(tmp_path, sims):
    """One-shot: a file that is gone or changed between the start-up check and its reading
    is refused by the loop; the run says so (and ``main`` exits 2)."""
    good = tmp_path / "good.txt"
    good.write_text("good\n\n10\n\np\n")
    gone = tmp_path / "gone.txt"
    result = daemon.run_files(settings_for(tmp_path / "s", sims[0].port, sims[1].port),
                              [good, gone], daemon.Stop())
    assert result.refused and not result.all_done and result.batch_ids == ("b0001",)
    assert f"Refused: {gone}" in result.summary
    assert result.summary.endswith("NOT every batch is done.")


def test_a_state_dir_that_cannot_be_used_is_a_bad_configuration(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("")
    for state, said in ((afile, "exists and is not a directory"),
                        (afile / "below", "cannot be created")):
        for mode in ([], ["--dry-run"]):
            result = run_daemon(*mode, "--state-dir", str(state), str(EXAMPLES[0]))
            assert result.returncode == 2 and said in result.stderr, result.stderr
            assert "Traceback" not in result.stderr


def test_simulate_on_a_taken_port_says_so(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "c.toml"
        cfg.write_text(f"[[COMFYUI_INSTANCES]]\ninstance_id = 'a'\nhost = '127.0.0.1'\n"
                       f"port = {port}\njob_types = ['HIGH', 'LOW']\n")
        result = run_daemon("--simulate", "--config", str(cfg), "--state-dir",
                            str(tmp_path / "s"), str(EXAMPLES[0]))
    assert result.returncode == 1
    assert f"cannot listen on port {port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_one_file_named_twice_with_force_is_two_batches_in_the_summary(tmp_path, sims):
    good = tmp_path / "twice.txt"
    good.write_text("twice\n\n10\n\np\n")
    settings = settings_for(tmp_path / "s", sims[0].port, sims[1].port)
    result = daemon.run_files(settings, [good, good], daemon.Stop(), force=True)
    assert result.all_done and result.batch_ids == ("b0001", "b0002")
    assert "b0001  twice" in result.summary and "b0002  twice" in result.summary
    again = daemon.run_files(settings, [good, good], daemon.Stop())
    assert again.batch_ids == ("b0002",) and again.summary.count("twice") == 1
