"""The event log on a real disk: torn tails, corruption, a kill in the middle of appends."""

from __future__ import annotations

import fcntl
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import make_plan

from statemachine import events as ev
from statemachine.errors import CorruptLog, LogWriteError
from statemachine.log import EventLog
from statemachine.store import Store

HERE = Path(__file__).parent


def write_events(directory: Path, n: int) -> Store:
    store = Store(EventLog(directory))
    for i in range(n):
        store.record(ev.InstanceUp(f"i{i}"), now=float(i))
    store.commit()
    return store


def test_events_survive_a_reopen(tmp_path):
    store = write_events(tmp_path, 5)
    store.record(ev.BatchAccepted(make_plan("a")), 9)
    store.commit()
    assert Store.open(EventLog(tmp_path)).snapshot() == store.snapshot()


def test_a_torn_last_line_is_cut_and_reported(tmp_path):
    write_events(tmp_path, 3)
    good = (tmp_path / "events.jsonl").read_bytes()
    with open(tmp_path / "events.jsonl", "ab") as f:
        f.write(b'{"seq": 4, "ts": 1.0, "type": "inst')
    log = EventLog(tmp_path)
    assert log.repaired_bytes == len(b'{"seq": 4, "ts": 1.0, "type": "inst')
    assert (tmp_path / "events.jsonl").read_bytes() == good
    assert Store.open(log).seq == 3


def test_nul_padding_after_the_last_line_is_cut(tmp_path):
    write_events(tmp_path, 2)
    with open(tmp_path / "events.jsonl", "ab") as f:
        f.write(b"\0" * 4096)
    assert Store.open(EventLog(tmp_path)).seq == 2


@pytest.mark.parametrize("torn", [100, 64 * 1024, 200 * 1024])
def test_a_torn_tail_of_any_length_is_cut(tmp_path, torn):
    write_events(tmp_path, 3)
    good = (tmp_path / "events.jsonl").read_bytes()
    with open(tmp_path / "events.jsonl", "ab") as f:
        f.write(b'{"seq":4,"ts":1.0,"type":"batch_accepted","v":2,"plan":"' + b"x" * torn)
    log = EventLog(tmp_path)
    assert (tmp_path / "events.jsonl").read_bytes() == good
    assert Store.open(log).seq == 3


def test_a_torn_first_line_leaves_an_empty_log(tmp_path):
    (tmp_path / "events.jsonl").write_bytes(b"x" * 200_000)
    assert EventLog(tmp_path).repaired_bytes == 200_000
    assert (tmp_path / "events.jsonl").read_bytes() == b""


@pytest.mark.parametrize("where", [b'"i1"', b'"ts":1.0', b'"seq":2'])
def test_a_byte_changed_inside_a_record_is_a_corrupt_log_naming_its_line(tmp_path, where):
    write_events(tmp_path, 4)
    path = tmp_path / "events.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    assert where in lines[1]
    flipped = where.replace(b"1", b"7").replace(b"2", b"3") if where != b'"ts":1.0' \
        else b'"ts":1.5'
    lines[1] = lines[1].replace(where, flipped)
    path.write_bytes(b"".join(lines))
    with pytest.raises(CorruptLog, match="line 2: checksum mismatch"):
        Store.open(EventLog(tmp_path))


def test_a_corrupt_middle_line_stops_replay_with_its_number(tmp_path):
    write_events(tmp_path, 4)
    path = tmp_path / "events.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = b'{"seq": 2, "ts": 0, "ty\n'
    path.write_bytes(b"".join(lines))
    with pytest.raises(CorruptLog, match="line 2"):
        Store.open(EventLog(tmp_path))


def test_a_failed_write_keeps_the_file_whole_and_the_events_pending(tmp_path, monkeypatch):
    store = write_events(tmp_path, 2)
    before = (tmp_path / "events.jsonl").read_bytes()
    store.record(ev.InstanceUp("late"), 5)
    real_write, calls = os.write, []

    def fills_up_halfway(fd, data):
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real_write(fd, data[: len(data) // 2])  # the disk took part of it

    monkeypatch.setattr(os, "write", fills_up_halfway)
    with pytest.raises(LogWriteError, match="No space left"):
        store.commit()
    assert len(calls) == 2 and (tmp_path / "events.jsonl").read_bytes() == before
    monkeypatch.setattr(os, "write", real_write)
    store.commit()
    assert Store.open(EventLog(tmp_path)).snapshot() == store.snapshot()


def test_a_commit_is_one_write_that_returns_once_durable(tmp_path, monkeypatch):
    log = EventLog(tmp_path)
    assert fcntl.fcntl(log._fd, fcntl.F_GETFL) & os.O_DSYNC
    real_write, writes = os.write, []

    def write(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    for n in range(3):
        log.append(b"line %d\n" % n)
    log.commit()
    log.commit()  # nothing pending: no write at all
    assert writes == [b"line 0\nline 1\nline 2\n"]
    log.close()


def test_compaction_then_more_events_then_reopen(tmp_path):
    store = write_events(tmp_path, 3)
    store.record(ev.BatchAccepted(make_plan("a")), 4)
    store.compact()
    assert (tmp_path / "events.jsonl").read_bytes() == b""
    store.record(ev.InstanceUp("after"), 5)
    store.commit()
    assert Store.open(EventLog(tmp_path)).snapshot() == store.snapshot()


@pytest.mark.parametrize("seed", range(5))
def test_sigkill_during_appends_loses_at_most_the_unsynced_turn(tmp_path, seed):
    env = {**os.environ, "PYTHONPATH": f"{HERE}:{HERE.parent}"}
    proc = subprocess.Popen([sys.executable, str(HERE / "log_writer.py"), str(tmp_path)],
                            stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    turns = random.Random(seed).randint(5, 60)
    committed = 0
    for _ in range(turns):
        committed = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    store = Store.open(EventLog(tmp_path))  # repairs a torn tail, raises on corruption
    assert store.seq >= committed
    expected = Store(EventLog(tmp_path / "expected"))
    for n in range(len(store.batches)):
        expected.record(ev.BatchAccepted(make_plan(f"b{n}", frames=505)), now=float(n))
        expected.record(ev.InstanceUp(f"i{n}"), now=float(n))
    assert store.snapshot()["batches"] == expected.snapshot()["batches"]
