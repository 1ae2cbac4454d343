"""submit.py, the user's CLI, against real state directories: a fake daemon is the lock held
by this process, a status.json written here and threads that answer through the spool."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from support import dispatch, make_plan, run_to_success

import config
import submit
from service.lock import StateLock
from service.status import status_view, write_status_file
from spool.commands import pending_commands, reply
from spool.layout import MAX_NAME_BYTES
from statedir import StateDir
from statemachine import events as ev
from statemachine.log import EventLog, LogReader, MemoryLog
from statemachine.store import Store

T = TypeVar("T")
PROJECT = Path(__file__).resolve().parent.parent
GOOD = b"sunset_beach\n\n202\n\nA sunset over the sea\n\nblurry\n"
VIDEO = {"9": {"images": [{"filename": "sunset_beach.mp4", "subfolder": "b0001-sunset_beach",
                           "type": "output"}]}}


def run(capsys, state: Path, *argv: str) -> tuple[int, str, str]:
    code = submit.main([*argv, "--state-dir", str(state)])
    out, err = capsys.readouterr()
    return code, out, err


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file()) if directory.exists() \
        else []


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "var"


@pytest.fixture
def prompt(tmp_path: Path) -> Path:
    path = tmp_path / "sunset_beach.txt"
    path.write_bytes(GOOD)
    return path


@pytest.fixture
def daemon(state: Path) -> Iterator[None]:
    """A "running daemon": this process holds daemon.lock as the real daemon does."""
    with StateLock(state / "daemon.lock"):
        yield


@contextlib.contextmanager
def background(work: Callable[[threading.Event], None]) -> Iterator[None]:
    """Run ``work(stop)`` in a thread for the duration of the block; re-raise its errors."""
    stop, errors = threading.Event(), []

    def body() -> None:
        try:
            work(stop)
        except BaseException as exc:  # handed to the test thread below
            errors.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
    if errors:
        raise errors[0]


def wait_for(probe: Callable[[], T], stop: threading.Event, timeout: float = 10) -> T:
    """The first true value of ``probe``; fails once ``stop`` is set or ``timeout`` is over."""
    deadline = time.monotonic() + timeout
    while not stop.is_set() and time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        stop.wait(0.01)
    raise AssertionError("stopped or timed out before the probe found anything")


# --- state the tests set up ---------------------------------------------------------------


def finish_batch(store: Store, batch_id: str, now: float) -> None:
    """Run every job of the batch to success; the last COMBINE reports the final video."""
    while any(j.batch.batch_id == batch_id for j in store.ready.values()):
        job = next(j for j in store.ready.values() if j.batch.batch_id == batch_id)
        if job is store.batches[batch_id].jobs[-1]:
            prompt_id = dispatch(store, job.job_id, "high_priority", now)
            store.record(ev.JobSucceeded(job.job_id, prompt_id, VIDEO), now)
        else:
            run_to_success(store, job.job_id, "high_priority", now)


def fail_job(store: Store, job_id: str, now: float) -> None:
    prompt_id = dispatch(store, job_id, "low_priority", now)
    store.record(ev.JobFailed(job_id, prompt_id, "CUDA out of memory"), now)


def write_log(state: Path) -> None:
    """A real event log: b0001 done, b0002 failed, b0003 rendering with a job running."""
    log = EventLog(state)
    store = Store(log)
    for batch_id in ("b0001", "b0002", "b0003"):
        store.record(ev.BatchAccepted(make_plan(batch_id)), now=1.0)
    finish_batch(store, "b0001", now=2.0)
    fail_job(store, "b0002/H1", now=3.0)
    prompt_id = dispatch(store, "b0003/H1", "high_priority", now=4.0)
    store.record(ev.JobStarted("b0003/H1", prompt_id), now=4.0)
    store.commit()
    log.close()


def live_store(state: str = "running") -> Store:
    """b0001 with H1 running on high_priority; ``state="done"`` finishes the batch."""
    store = Store(MemoryLog())
    store.record(ev.InstanceUp("high_priority"), now=1.0)
    store.record(ev.BatchAccepted(make_plan("b0001")), now=1.0)
    prompt_id = dispatch(store, "b0001/H1", "high_priority", now=2.0)
    store.record(ev.JobStarted("b0001/H1", prompt_id), now=2.0)
    if state == "done":
        store.record(ev.JobSucceeded("b0001/H1", prompt_id, {}), now=3.0)
        finish_batch(store, "b0001", now=3.0)
    elif state == "failed":
        store.record(ev.JobFailed("b0001/H1", prompt_id, "boom"), now=3.0)
    return store


def write_status(state: Path, store: Store) -> None:
    instances = config.load_settings(overrides={"STATE_DIR": state}).instances
    view = status_view(store, instances, now=time.time(),
                       progress={"b0001/H1": ("3", 5, 10)}, busy={"high_priority": 0.45},
                       daemon={"pid": os.getpid()})
    write_status_file(state / "status.json", view)


# --- submit -------------------------------------------------------------------------------


def test_submit_appears_in_incoming_only_by_rename_of_a_synced_whole_file(
        capsys, monkeypatch, state, prompt):
    steps = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        steps.append("fsync")
        real_fsync(fd)

    def rename(src, dst):
        src, dst = Path(src), Path(dst)
        assert src.parent == state / "spool" / "tmp" and src.read_bytes() == GOOD
        assert dst.parent == state / "spool" / "incoming" and files_in(dst.parent) == []
        steps.append("rename")
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    code, out, err = run(capsys, state, "submit", str(prompt))
    assert (code, err) == (0, "")
    assert steps == ["fsync", "rename", "fsync"]  # the file, then the directory
    [name] = files_in(state / "spool" / "incoming")
    assert name.startswith("sunset_beach-") and name.endswith(".txt") and len(name) == 25
    assert (state / "spool" / "incoming" / name).read_bytes() == GOOD
    assert files_in(state / "spool" / "tmp") == []
    assert name in out and "'sunset_beach'" in out and "daemon is not running" in out


def test_force_goes_to_incoming_force_and_toml_keeps_its_suffix(capsys, state):
    examples = sorted(str(p) for p in (PROJECT / "examples" / "prompts").iterdir())
    code, out, _ = run(capsys, state, "submit", "--force", *examples)
    assert code == 0
    names = files_in(state / "spool" / "incoming" / "force")
    assert [n.split("-")[0] for n in names] == ["city_rain", "forest_fog", "sunset_beach"]
    assert [Path(n).suffix for n in names] == [".txt", ".toml", ".txt"]
    assert files_in(state / "spool" / "incoming") == []
    assert len(out.splitlines()) == 3


def test_a_bad_file_is_refused_with_its_reason_and_nothing_is_spooled(
        capsys, state, prompt, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"name\n\nlots\n\nprompt\n")
    code, out, err = run(capsys, state, "submit", str(prompt), str(bad),
                         str(tmp_path / "missing.txt"))
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 2
    assert "bad.txt" in lines[0] and "not a positive integer" in lines[0]
    assert "missing.txt: cannot open it: No such file" in lines[1]
    assert not (state / "spool").exists()


def test_spool_names_keep_the_users_name_and_fit_the_daemons_limit():
    assert submit.spool_name(Path("dir/sunset beach.txt"), "1a2b3c4d") == \
        "sunset_beach-1a2b3c4d.txt"
    assert submit.spool_name(Path("fog.TOML"), "1a2b3c4d") == "fog-1a2b3c4d.TOML"
    assert submit.spool_name(Path("notes.t x"), "1a2b3c4d") == "notes.t_x-1a2b3c4d"
    long = submit.spool_name(Path("日落" * 60 + ".txt"), "1a2b3c4d")
    stem = long.removesuffix("-1a2b3c4d.txt")
    assert len(long.encode()) <= MAX_NAME_BYTES and len(stem) > 50
    assert ("日落" * 60).startswith(stem)


def test_submit_prints_the_batch_id_once_the_daemon_accepts_the_file(
        capsys, state, prompt, daemon):
    spool = state / "spool"

    def accept(stop):
        name = wait_for(lambda: files_in(spool / "incoming"), stop)[0]
        (spool / "accepted").mkdir()
        os.rename(spool / "incoming" / name, spool / "accepted" / f"b0007-{name}")

    with background(accept):
        code, out, err = run(capsys, state, "submit", str(prompt))
    assert (code, err) == (0, "")
    assert out.rstrip().endswith(": batch b0007")


def test_a_file_the_daemon_rejects_prints_the_reason_and_fails(capsys, state, prompt, daemon):
    spool = state / "spool"

    def reject(stop):
        name = wait_for(lambda: files_in(spool / "incoming"), stop)[0]
        (spool / "rejected").mkdir()
        os.rename(spool / "incoming" / name, spool / "rejected" / name)
        # written whole, then renamed in, as the daemon does (write_atomic)
        (spool / "rejected" / f".{name}.tmp").write_text("duplicate of batch b0001\n")
        os.rename(spool / "rejected" / f".{name}.tmp", spool / "rejected" / f"{name}.reason")

    with background(reject):
        code, out, err = run(capsys, state, "submit", str(prompt))
    assert code == 1 and out == ""
    assert err.rstrip().endswith("rejected: duplicate of batch b0001")


def test_a_file_not_taken_in_time_stays_spooled(capsys, state, prompt, daemon):
    code, out, _ = run(capsys, state, "submit", "--wait", "0", str(prompt))
    assert code == 0 and "not taken yet after 0 s" in out
    assert len(files_in(state / "spool" / "incoming")) == 1


# --- status -------------------------------------------------------------------------------


def test_status_without_daemon_replays_the_log_read_only_and_says_so(capsys, state):
    write_log(state)
    log = state / "events.jsonl"
    with log.open("ab") as f:
        f.write(b'{"seq": 99, "ts"')  # a torn tail: the daemon cuts it, we skip it
    before = (log.read_bytes(), log.stat().st_mtime_ns)
    write_status_file(state / "status.json", {"version": 1, "batches": "stale"})
    code, out, err = run(capsys, state, "status")
    assert (code, err) == (0, "")
    assert out.startswith("daemon not running: state replayed from the event log\n")
    lines = out.splitlines()
    done = next(line for line in lines if line.lstrip().startswith("b0001"))
    assert "done" in done and "9/9" in done
    assert "output b0001-sunset_beach/sunset_beach.mp4" in out
    failed = next(line for line in lines if line.lstrip().startswith("b0002"))
    assert "failed" in failed and "b0002/H1: CUDA out of memory" in failed
    assert any(line.lstrip().startswith("b0003/H1") and "running" in line for line in lines)
    assert (log.read_bytes(), log.stat().st_mtime_ns) == before
    assert sorted(p.name for p in state.iterdir()) == ["events.jsonl", "status.json"]


def test_status_json_is_one_object_with_the_view(capsys, state):
    write_log(state)
    code, out, _ = run(capsys, state, "status", "--json")
    assert code == 0
    view = json.loads(out)
    assert {"version", "updated_at", "daemon", "batches", "running", "instances",
            "counts"} <= set(view)
    assert view["daemon"] is None and view["source"] == "event log"
    assert [(b["batch_id"], b["state"], b["done"], b["total"]) for b in view["batches"]] == [
        ("b0001", "done", 9, 9), ("b0002", "failed", 0, 9), ("b0003", "rendering", 0, 9)]
    assert [j["job_id"] for j in view["running"]] == ["b0003/H1"]
    assert view["counts"]["succeeded"] == 9


def test_status_with_a_running_daemon_shows_its_status_file(capsys, state, daemon):
    write_status(state, live_store())
    code, out, _ = run(capsys, state, "status")
    assert code == 0
    assert out.startswith(f"daemon running (pid {os.getpid()}); status as of")
    running = next(line for line in out.splitlines() if "b0001/H1" in line)
    assert "HIGH" in running and "high_priority" in running
    assert "[#####-----] 5/10" in running
    instance = next(line for line in out.splitlines() if "http://127.0.0.1:8188" in line)
    assert " up " in instance and "1/2 in flight" in instance and "45.0%" in instance
    code, out, _ = run(capsys, state, "status", "--json")
    assert json.loads(out)["source"] == "status.json"


def test_status_with_a_daemon_but_no_status_file_yet_replays(capsys, state, daemon):
    write_log(state)
    code, out, _ = run(capsys, state, "status")
    assert code == 0 and "no status.json yet: state replayed from the event log" in out


def test_replay_stays_whole_when_the_daemon_compacts_between_log_and_snapshot(state):
    """The reader holds the old log open; the snapshot it then reads is newer: consistent."""
    write_log(state)
    reader = LogReader(state)
    log = EventLog(state)
    store = Store.open(log)
    store.record(ev.BatchAccepted(make_plan("b0004")), now=5.0)
    store.compact()
    log.close()
    assert list(Store.open(reader).batches) == ["b0001", "b0002", "b0003", "b0004"]
    reader.close()
    assert (state / "events.jsonl").read_bytes() == b""


def test_progress_bar_shapes():
    assert submit.progress_bar({"value": 0, "max": 4}) == "[----------] 0/4"
    assert submit.progress_bar({"value": 4, "max": 4}) == "[##########] 4/4"
    assert submit.progress_bar({"value": 7, "max": 3}).startswith("[##########]")
    assert submit.progress_bar({"value": 0, "max": 0}) == ""
    assert submit.progress_bar(None) == ""


# --- cancel and retry ---------------------------------------------------------------------


def answer_commands(state: Path, ok: bool, seen: list[dict]) -> Callable[[threading.Event], None]:
    """A fake daemon: reads the first command as the daemon does and replies."""
    def work(stop):
        found = wait_for(lambda: pending_commands(state / "spool" / "commands")[0], stop)
        command = found[0]
        seen.append(json.loads(command.path.read_bytes()))
        reply(command.path, ok, f"{command.batch_id} {'cancelled' if ok else 'is done'}")
    return work


@pytest.mark.parametrize("ok", [True, False])
def test_cancel_writes_a_command_and_prints_the_daemons_answer(capsys, state, daemon, ok):
    write_status(state, live_store())
    seen: list[dict] = []
    with background(answer_commands(state, ok, seen)):
        code, out, err = run(capsys, state, "cancel", "b0001")
    [body] = seen
    assert set(body) == {"id", "command", "batch_id", "requested_at"}
    assert (body["command"], body["batch_id"], len(body["id"])) == ("cancel", "b0001", 32)
    if ok:
        assert (code, out, err) == (0, "cancel b0001: b0001 cancelled\n", "")
    else:
        assert (code, out, err) == (1, "", "error: cancel b0001: b0001 is done\n")


def test_retry_without_daemon_queues_the_command_for_its_start(capsys, state):
    write_log(state)
    code, out, _ = run(capsys, state, "retry", "b0002")
    assert code == 0 and "will run when it starts" in out
    commands = state / "spool" / "commands"
    [name] = files_in(commands)
    body = json.loads((commands / name).read_bytes())
    assert name == f"{body['id']}.json"
    assert (body["command"], body["batch_id"]) == ("retry", "b0002")
    assert files_in(commands / "tmp") == []


def test_an_unknown_batch_is_refused_and_nothing_is_queued(capsys, state):
    write_log(state)
    code, out, err = run(capsys, state, "cancel", "b0099")
    assert code == 2 and out == ""
    assert err == "error: unknown batch 'b0099' (known batches: b0001, b0002, b0003)\n"
    assert not (state / "spool").exists()


# --- watch --------------------------------------------------------------------------------


def test_watch_redraws_until_the_watched_batches_end(state, daemon):
    """As a user runs it, in a pipe: one block per redraw, exit 0 once the batch is done."""
    write_status(state, live_store())
    proc = subprocess.Popen(
        [sys.executable, "submit.py", "watch", "--interval", "0.05", "--state-dir", str(state)],
        cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        first = [proc.stdout.readline() for _ in range(3)]
        assert first[0].startswith("daemon running") and "rendering" in first[2]
        write_status(state, live_store("done"))
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert (proc.returncode, err) == (0, "")
    assert "\x1b" not in out
    assert out.rstrip().endswith("ended: b0001 done")


def test_watch_exits_1_when_a_watched_batch_fails(capsys, state, daemon):
    write_status(state, live_store())
    settings = config.load_settings(overrides={"STATE_DIR": state})
    code = submit.watch(settings, StateDir(state), interval=0, tty=True,
                        pause=lambda _: write_status(state, live_store("failed")))
    out = capsys.readouterr().out
    assert code == 1
    assert out.count(submit.CLEAR_SCREEN) == 2
    assert out.rstrip().endswith("ended: b0001 failed")


def test_watch_on_a_terminal_draws_a_progress_bar_per_running_job(state, daemon):
    write_status(state, live_store())
    settings = config.load_settings(overrides={"STATE_DIR": state})
    view = submit.load_view(settings, StateDir(state))
    text = submit.render_status(view, time.time(), tty=True)
    (line,) = [line for line in text.splitlines() if "b0001/H1" in line]
    assert "\u2501" in line and "\x1b[" in line  # rich's bar, in colour
    assert line.rstrip().endswith("5/10")
    plain = submit.render_status(view, time.time())
    assert "[#####-----] 5/10" in plain and "\x1b" not in plain


def test_watch_with_nothing_unfinished_exits_at_once(capsys, state):
    code, out, _ = run(capsys, state, "watch")
    assert code == 0 and out.rstrip().endswith("no unfinished batch to watch")


# --- errors -------------------------------------------------------------------------------


def test_a_bad_config_is_one_line_and_exit_2(capsys, state, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("MAX_RETRIES = -1\n")
    code, out, err = run(capsys, state, "status", "--config", str(bad))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "MAX_RETRIES = -1" in err and "Traceback" not in err


def test_usage_errors_exit_2(capsys, state):
    assert submit.main([]) == 2
    assert submit.main(["submit", "x.txt", "--wait", "-1"]) == 2
    capsys.readouterr()


def test_hostile_command_files_are_answered_not_run(tmp_path):
    commands = tmp_path / "commands"
    commands.mkdir()
    os.mkfifo(commands / "pipe.json")
    (commands / "huge.json").write_bytes(b" " * (1 << 20))
    (commands / "nested.json").write_bytes(b"[" * 5000 + b"]" * 5000)
    (commands / "list.json").write_bytes(b"[1, 2]")
    (commands / "zero.json").symlink_to("/dev/zero")
    (commands / "ok.json").write_bytes(b'{"id": "ok", "command": "cancel", "batch_id": "b1"}')
    good, bad = pending_commands(commands)
    assert [c.id for c in good] == ["ok"]
    why = {path.name: reason for path, reason in bad}
    assert sorted(why) == ["huge.json", "list.json", "nested.json", "pipe.json", "zero.json"]
    assert "FIFO" in why["pipe.json"] and "larger than the limit" in why["huge.json"]
    for path, reason in bad:
        reply(path, False, reason)
    assert sorted(p.name for p in commands.iterdir()) == ["done", "ok.json"]


def test_special_files_are_refused_without_blocking(capsys, state, tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    code, out, err = run(capsys, state, "submit", str(fifo), "/dev/zero", str(tmp_path))
    assert code == 2 and out == ""
    assert [line.split(": ", 2)[2] for line in err.splitlines()] == [
        "a FIFO (named pipe), not a regular file: drop a regular file",
        "a character device, not a regular file: drop a regular file",
        "a directory, not a prompt file: drop the files themselves"]
