"""The ``statemachine.log.Log`` contract, the same tests against every implementation:

* ``EventLog``: the daemon's log on disk;
* ``MemoryLog``: the same in memory (tests, benchmarks); a restart is ``crash()``;
* ``MeteredLog`` (service/metrics.py) wrapping either of them: what the daemon's store
  really writes through;
* ``LogReader``: read-only; an ``EventLog`` in the same directory writes, the reader
  (opened afresh for each read) reads, and refuses every write itself.

Implementation details (torn-tail repair, retention, segment names, O_DSYNC) are in
test_log.py and test_snapshots.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from support import make_plan, run_to_success

from service.metrics import MeteredLog, Metrics
from statemachine import events as ev
from statemachine.log import EventLog, Log, LogReader, MemoryLog
from statemachine.store import Store


class Harness:
    """One implementation under test: ``log`` takes the writes, ``reader()`` is the Log
    the reads go to, ``restart()`` is the daemon stopping (or crashing) and starting."""

    on_disk = True
    read_only = False

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.log: Log = self.open()

    def open(self) -> Log:
        return EventLog(self.directory)

    def reader(self) -> Log:
        return self.log

    def restart(self) -> None:
        self.close()
        self.log = self.open()

    def close(self) -> None:
        self.log.close()  # type: ignore[attr-defined]


class EventLogHarness(Harness):
    pass


class MemoryHarness(Harness):
    on_disk = False

    def open(self) -> Log:
        return MemoryLog()

    def restart(self) -> None:
        self.log.crash()  # type: ignore[attr-defined]

    def close(self) -> None:
        pass


class Metered(Harness):
    """``MeteredLog`` around another harness's log, wrapped afresh at each restart."""

    def __init__(self, inner: Harness) -> None:
        self.inner = inner
        self.directory = inner.directory
        self.on_disk = inner.on_disk
        self.log = MeteredLog(inner.log, Metrics())

    def restart(self) -> None:
        self.inner.restart()
        self.log = MeteredLog(self.inner.log, Metrics())

    def close(self) -> None:
        self.inner.close()


class ReaderHarness(Harness):
    read_only = True

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.readers: list[LogReader] = []

    def reader(self) -> Log:
        reader = LogReader(self.directory)
        self.readers.append(reader)
        return reader

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
        self.readers.clear()
        super().close()


KINDS: dict[str, Callable[[Path], Harness]] = {
    "EventLog": EventLogHarness,
    "MemoryLog": MemoryHarness,
    "MeteredLog(EventLog)": lambda d: Metered(EventLogHarness(d)),
    "MeteredLog(MemoryLog)": lambda d: Metered(MemoryHarness(d)),
    "LogReader": ReaderHarness,
}


@pytest.fixture(params=list(KINDS))
def h(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    harness = KINDS[request.param](tmp_path)
    yield harness
    harness.close()


def line(seq: int) -> bytes:
    return b'{"seq":%d,"ts":0.0,"type":"instance_up","instance_id":"i%d"}\n' % (seq, seq)


def snapshot(seq: int) -> bytes:
    return b'{"seq":%d,"state":"as of %d"}' % (seq, seq)


def write(log: Log, *seqs: int, commit: bool = True) -> None:
    for seq in seqs:
        log.append(line(seq))
    if commit:
        log.commit()


def seqs(lines: Iterator[tuple[int, bytes]]) -> list[int]:
    return [orjson.loads(data)["seq"] for _, data in lines]


# --- append, commit, read back ----------------------------------------------------------


def test_committed_lines_read_back_whole_in_order_numbered_from_one(h: Harness) -> None:
    write(h.log, 1, 2, 3, 4, 5)
    reader = h.reader()
    assert list(reader.lines()) == [(n, line(n)) for n in range(1, 6)]
    assert list(reader.history()) == [(n, line(n)) for n in range(1, 6)]
    assert reader.locate(3) == "event log line 3"


def test_nothing_is_read_from_an_empty_log(h: Harness) -> None:
    reader = h.reader()
    assert list(reader.lines()) == [] and list(reader.history()) == []
    assert reader.load_snapshot() is None


def test_appended_lines_are_read_only_once_committed(h: Harness) -> None:
    write(h.log, 1, 2)
    write(h.log, 3, commit=False)
    assert seqs(h.reader().lines()) == [1, 2]
    h.log.commit()
    assert seqs(h.reader().lines()) == [1, 2, 3]


def test_a_commit_with_nothing_appended_changes_nothing(h: Harness) -> None:
    write(h.log, 1)
    h.log.commit()
    h.log.commit()
    assert list(h.reader().lines()) == [(1, line(1))]


def test_a_restart_keeps_the_committed_lines_loses_the_rest_and_more_follow(
        h: Harness) -> None:
    write(h.log, 1, 2, 3)
    write(h.log, 4, commit=False)
    h.restart()
    assert seqs(h.reader().lines()) == [1, 2, 3]
    write(h.log, 4, 5)
    assert list(h.reader().lines()) == [(n, line(n)) for n in range(1, 6)]


# --- snapshots --------------------------------------------------------------------------


def test_a_snapshot_is_loaded_and_every_line_after_it_follows_in_order(h: Harness) -> None:
    write(h.log, 1, 2, 3)
    write(h.log, 4, commit=False)
    h.log.compact(snapshot(4), 4)  # commits line 4 first
    write(h.log, 5, 6)
    for restarted in (False, True):
        if restarted:
            h.restart()
        reader = h.reader()
        assert reader.load_snapshot() == snapshot(4)
        lines = list(reader.lines())
        after = seqs(iter(lines))
        assert after == sorted(after) and [s for s in after if s > 4] == [5, 6]
        assert [n for n, _ in lines] == list(range(1, len(lines) + 1))
        assert all("line" in reader.locate(n) for n, _ in lines)
        assert seqs(reader.history()) == [1, 2, 3, 4, 5, 6]


def test_the_newest_snapshot_is_the_one_loaded(h: Harness) -> None:
    write(h.log, 1, 2)
    h.log.compact(snapshot(2), 2)
    write(h.log, 3, 4)
    h.log.compact(snapshot(4), 4)
    write(h.log, 5)
    reader = h.reader()
    assert reader.load_snapshot() == snapshot(4)
    assert [s for s in seqs(reader.lines()) if s > 4] == [5]
    assert seqs(reader.history()) == [1, 2, 3, 4, 5]


def test_a_snapshot_of_an_empty_log_is_loaded_too(h: Harness) -> None:
    h.log.compact(snapshot(0), 0)
    reader = h.reader()
    assert reader.load_snapshot() == snapshot(0)
    assert list(reader.lines()) == []


# --- the store on top -------------------------------------------------------------------


def test_the_store_replays_to_the_same_state_through_every_log(h: Harness) -> None:
    store = Store(h.log)
    store.record(ev.InstanceUp("i1"), 0)
    store.record(ev.BatchAccepted(make_plan("a", frames=101)), 0)
    run_to_success(store, "a/H1", "i1", 1)
    store.commit()
    store.compact()
    store.record(ev.BatchAccepted(make_plan("b", frames=202)), 2)
    store.commit()
    h.restart()
    replayed = Store.open(h.reader())
    assert replayed.snapshot() == store.snapshot()
    assert replayed.seq == store.seq and replayed.snapshot_seq == store.snapshot_seq


# --- on disk, read-only -----------------------------------------------------------------


def test_a_torn_last_line_is_never_read(h: Harness) -> None:
    if not h.on_disk:
        pytest.skip("a torn write is a file's")
    write(h.log, 1, 2)
    with open(h.directory / "events.jsonl", "ab") as f:
        f.write(line(3)[:-9])  # a crash in the middle of the write
    if not h.read_only:
        h.restart()  # the writer cuts it when it opens the log
    assert seqs(h.reader().lines()) == [1, 2]


@pytest.mark.parametrize("kind", [k for k, make in KINDS.items() if make is ReaderHarness])
def test_a_read_only_log_refuses_every_write_and_changes_no_file(
        kind: str, tmp_path: Path) -> None:
    harness = KINDS[kind](tmp_path)
    try:
        write(harness.log, 1, 2)
        harness.log.compact(snapshot(2), 2)
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        reader = harness.reader()
        for attempt in (lambda: reader.append(line(3)), reader.commit,
                        lambda: reader.compact(snapshot(3), 3)):
            with pytest.raises(PermissionError):
                attempt()
        assert reader.load_snapshot() == snapshot(2)
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    finally:
        harness.close()
