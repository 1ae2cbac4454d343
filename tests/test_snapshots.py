"""Snapshots and log segments on a real disk: rotation, a damaged snapshot, gaps,
retention, and the read-only reader of ``submit.py``."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from support import make_plan, run_to_success

from statemachine import events as ev
from statemachine.durable import write_atomic
from statemachine.errors import CorruptLog
from statemachine.job import JobState
from statemachine.log import EventLog, LogReader, snapshot_bytes
from statemachine.store import Store, read_records


def busy_store(directory: Path, *, retention: int = 0) -> Store:
    """A store on disk with a done batch, an open one and instance events."""
    store = Store(EventLog(directory, retention=retention))
    store.record(ev.InstanceUp("i1"), 0)
    store.record(ev.BatchAccepted(make_plan("a", frames=101)), 0)
    store.record(ev.BatchAccepted(make_plan("b", frames=202)), 0)
    for job_id in ("a/H1", "a/L1", "a/C1", "b/H1"):
        run_to_success(store, job_id, "i1", 1)
    store.commit()
    return store


def more(store: Store, n: int) -> None:
    for i in range(n):
        store.record(ev.InstanceUp(f"x{store.seq}-{i}"), 2)
    store.commit()


def snapshot_files(directory: Path) -> list[str]:
    return sorted(p.name for p in (directory / "snapshots").iterdir())


def segment_files(directory: Path) -> list[str]:
    return sorted(p.name for p in (directory / "segments").iterdir())


def test_a_snapshot_closes_the_live_segment_and_a_restart_reads_only_what_follows(tmp_path):
    store = busy_store(tmp_path)
    first = store.seq
    store.compact()
    assert snapshot_files(tmp_path) == [f"snapshot-{first:012d}.json"]
    assert segment_files(tmp_path) == ["events-000000000001.jsonl"]
    assert (tmp_path / "events.jsonl").read_bytes() == b""
    more(store, 3)
    log = EventLog(tmp_path)
    reopened = Store.open(log)
    assert reopened.snapshot() == store.snapshot()
    assert reopened.snapshot_seq == first
    assert len(list(log.lines())) == 3  # the closed segment is not read again
    assert [r.seq for r in read_records(log)] == list(range(1, store.seq + 1))  # history


def test_a_done_batch_is_kept_as_its_summary_live_after_replay_and_in_a_snapshot(tmp_path):
    store = busy_store(tmp_path)
    done = store.batches["a"]
    assert done.summary is not None and done.summary.jobs == 3 and not done.jobs
    assert done.final_instance == "i1" and done.final_outputs == {"9": {"images": []}}
    assert not any(j.startswith("a/") for j in store.jobs)
    assert store.state_counts[JobState.SUCCEEDED] == 4
    assert Store.open(EventLog(tmp_path)).snapshot() == store.snapshot()
    store.compact()
    assert Store.open(EventLog(tmp_path)).snapshot() == store.snapshot()


def test_a_damaged_newest_snapshot_is_ignored_with_a_warning_and_the_previous_one_used(
        tmp_path):
    store = busy_store(tmp_path)
    store.compact()
    more(store, 4)
    store.compact()
    more(store, 2)
    newest = tmp_path / "snapshots" / snapshot_files(tmp_path)[-1]
    data = bytearray(newest.read_bytes())
    data[-10] ^= 0x20
    newest.write_bytes(bytes(data))
    log = EventLog(tmp_path)
    reopened = Store.open(log)
    assert reopened.snapshot() == store.snapshot()
    [problem] = log.problems
    assert newest.name in problem and "checksum" in problem and "ignored" in problem


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_every_snapshot_damaged_means_a_full_replay_of_the_kept_segments(tmp_path, damage):
    store = busy_store(tmp_path)
    store.compact()
    more(store, 2)
    [name] = snapshot_files(tmp_path)
    path = tmp_path / "snapshots" / name
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"{not json\n" + data,
                      "empty": b""}[damage])
    log = EventLog(tmp_path)
    assert Store.open(log).snapshot() == store.snapshot()
    assert len(log.problems) == 1


def test_a_missing_segment_is_a_corrupt_log_naming_the_gap(tmp_path):
    store = busy_store(tmp_path)
    store.compact()
    more(store, 3)
    store.compact()
    more(store, 1)
    for name in snapshot_files(tmp_path):
        (tmp_path / "snapshots" / name).unlink()  # replay must start from seq 1
    (tmp_path / "segments" / segment_files(tmp_path)[0]).unlink()
    with pytest.raises(CorruptLog, match=r"sequence jumps from 0 to \d+"):
        Store.open(EventLog(tmp_path))


def test_a_bad_line_in_a_segment_names_the_segment_and_its_line(tmp_path):
    store = busy_store(tmp_path)
    store.compact()
    more(store, 1)
    for name in snapshot_files(tmp_path):
        (tmp_path / "snapshots" / name).unlink()
    segment = tmp_path / "segments" / segment_files(tmp_path)[0]
    lines = segment.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"seq":3', b'"seq":4')
    segment.write_bytes(b"".join(lines))
    with pytest.raises(CorruptLog, match=r"segment events-000000000001\.jsonl line 3"):
        Store.open(EventLog(tmp_path))


def test_retention_removes_only_segments_older_than_the_oldest_snapshot_kept(tmp_path):
    store = busy_store(tmp_path, retention=2)
    seqs = []
    for n in (3, 4, 5):
        store.compact()
        seqs.append(store.seq)
        more(store, n)
    store.compact()
    seqs.append(store.seq)
    assert snapshot_files(tmp_path) == [f"snapshot-{s:012d}.json" for s in seqs[-2:]]
    # the segments after the older snapshot kept, and none before it
    assert segment_files(tmp_path) == [f"events-{seqs[-2] + 1:012d}.jsonl"]
    assert Store.open(EventLog(tmp_path)).snapshot() == store.snapshot()


def test_without_retention_every_segment_and_the_two_newest_snapshots_stay(tmp_path):
    store = busy_store(tmp_path)
    seqs = [0]
    for n in (3, 4, 5):
        store.compact()
        seqs.append(store.seq)
        more(store, n)
    assert snapshot_files(tmp_path) == [f"snapshot-{s:012d}.json" for s in seqs[-2:]]
    assert segment_files(tmp_path) == [f"events-{s + 1:012d}.jsonl" for s in seqs[:-1]]
    log = EventLog(tmp_path)
    assert [r.seq for r in read_records(log)] == list(range(1, store.seq + 1))


def test_a_crash_between_the_snapshot_and_the_rotation_replays_consistently(tmp_path):
    store = busy_store(tmp_path)
    log = store.log
    log.commit()

    (tmp_path / "snapshots").mkdir()
    write_atomic(tmp_path / "snapshots" / f"snapshot-{store.seq:012d}.json",
                 snapshot_bytes(orjson.dumps(store.snapshot()), store.seq))
    more(store, 2)  # the live segment was never rotated: it still holds everything
    reopened = Store.open(EventLog(tmp_path))
    assert reopened.snapshot() == store.snapshot()
    reopened.compact()
    assert segment_files(tmp_path) == ["events-000000000001.jsonl"]
    assert Store.open(EventLog(tmp_path)).snapshot() == store.snapshot()


def test_submit_reads_snapshot_and_segments_without_writing(tmp_path):
    store = busy_store(tmp_path)
    store.compact()
    more(store, 2)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    reader = LogReader(tmp_path)
    try:
        assert Store.open(reader).snapshot() == store.snapshot()
        assert [r.seq for r in read_records(reader)] == list(range(1, store.seq + 1))
    finally:
        reader.close()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_the_reader_keeps_reading_the_live_segment_it_opened_when_it_is_rotated(tmp_path):
    store = busy_store(tmp_path)
    reader = LogReader(tmp_path)
    try:
        store.compact()  # after the reader opened events.jsonl: it is now a segment
        more(store, 2)
        assert [r.seq for r in read_records(reader)] == list(range(1, store.snapshot_seq + 1))
    finally:
        reader.close()
