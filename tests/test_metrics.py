"""The metrics, without a daemon: a store in memory and the metrics that follow it, the
metered event log, the rejection classes, and the timeline the page's Gantt is drawn from."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import dispatch, make_plan, run_to_success

from service.board import Gantt, tail_records
from service.metrics import Metrics, events_since_last_snapshot, reason_class
from statemachine import events as ev
from statemachine.log import EventLog, MemoryLog
from statemachine.store import Store
from statemachine.timeline import TimelineFold


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.text().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# --- reasons --------------------------------------------------------------------------------


@pytest.mark.parametrize(("reason", "expected"), [
    ("same content as batch b0001 (sunset, done); submit it with --force", "duplicate"),
    ("file is empty: nothing to render", "empty"),
    ("3,145,728 bytes: larger than the limit of 1,048,576 bytes (MAX_FILE_BYTES)", "too_large"),
    ("file is not UTF-8 text: invalid byte 0xff at byte offset 0; save it as UTF-8",
     "not_utf8"),
    ("a FIFO (named pipe), not a regular file", "not_a_file"),
    ("a directory, not a prompt file", "not_a_file"),
    ("the frame count 200000 is above the limit of 100000 frames (MAX_FRAMES)", "over_limit"),
    ("the frame count (block 2) has 20 digits; a frame count has at most 12", "over_limit"),
    ("frames_per_chunk = 1 is out of range; use 5 to 100000", "over_limit"),
    ("found 1 block separated by blank lines; expected name, frame count, ...", "unparsable"),
    ("unknown key 'frams' (did you mean 'frames'?)", "unparsable"),
    ("cannot be planned: RecursionError: maximum recursion depth", "other"),
])
def test_each_rejection_reason_has_a_class(reason: str, expected: str) -> None:
    assert reason_class(reason) == expected


# --- counting from the store -------------------------------------------------------------


def test_counters_and_tallies_follow_the_events_the_store_records() -> None:
    metrics = Metrics()
    store = Store(MemoryLog())
    store.record(ev.BatchAccepted(make_plan("b0001", frames=202)), now=0.0)
    metrics.watch(store)  # after the first batch: it is taken from the store's state
    store.record(ev.BatchAccepted(make_plan("b0002", frames=101)), now=1.0)
    run_to_success(store, "b0001/H1", "gpu", now=2.0)
    prompt_id = dispatch(store, "b0001/L1", "gpu", now=3.0)
    store.record(ev.JobQueued("b0001/L1", prompt_id, 1), now=3.0)
    store.record(ev.JobStarted("b0001/L1", prompt_id), now=3.0)  # HIGH then LOW: a switch
    store.record(ev.JobAttemptFailed("b0001/L1", prompt_id, "boom", eligible_at=9.0), 4.0)
    metrics.gauges = metrics.gauges_of(store, {"gpu": 0}, busy_seconds={"gpu": 2.5},
                                       rejected={"empty": 2}, last_snapshot_seq=0)
    found = samples(metrics)

    by_state = {state: n for state, n in store.state_counts.items() if n}
    tallied: dict[str, float] = {}
    for (name, labels), value in found.items():
        if name == "comfy_dual_jobs" and value:
            state = dict(labels)["state"]
            tallied[state] = tallied.get(state, 0) + value
    assert tallied == {state.value: n for state, n in by_state.items()}
    assert found[("comfy_dual_jobs", (("kind", "LOW"), ("state", "ready")))] == 1
    assert found[("comfy_dual_jobs_ready", (("kind", "LOW"),))] == 1
    assert found[("comfy_dual_job_retries_total", (("kind", "LOW"),))] == 1
    assert found[("comfy_dual_model_switches_total", (("instance", "gpu"),))] == 1
    assert found[("comfy_dual_job_run_seconds_count", (("instance", "gpu"), ("kind", "HIGH")))] \
        == 1
    assert found[("comfy_dual_batches", (("state", "rendering"),))] == 1
    assert found[("comfy_dual_batches", (("state", "accepted"),))] == 1
    assert found[("comfy_dual_events_total", (("type", "batch_accepted"),))] == 1  # b0002
    assert found[("comfy_dual_rejected_files", (("reason", "empty"),))] == 2
    assert found[("comfy_dual_instance_busy_seconds_total", (("instance", "gpu"),))] == 2.5
    assert found[("comfy_dual_events_since_snapshot", ())] == store.seq


def test_the_metered_log_counts_durable_lines_and_knows_the_last_snapshot() -> None:
    metrics = Metrics()
    log = metrics.metered(MemoryLog())
    store = Store(log)
    store.record(ev.BatchAccepted(make_plan("b0001")), now=0.0)
    assert samples(metrics)[("comfy_dual_event_log_appends_total", ())] == 0  # not durable
    store.commit()
    found = samples(metrics)
    assert found[("comfy_dual_event_log_appends_total", ())] == store.seq
    assert found[("comfy_dual_event_log_fsync_seconds_count", ())] == 1
    store.commit()  # nothing pending: no write to time
    assert samples(metrics)[("comfy_dual_event_log_fsync_seconds_count", ())] == 1
    assert events_since_last_snapshot(store, log.snapshot_seq) == store.seq
    store.compact()
    taken = store.seq
    assert log.snapshot_seq == taken
    store.record(ev.InstanceUp("gpu"), now=1.0)
    assert events_since_last_snapshot(store, log.snapshot_seq) == 1
    reopened = metrics.metered(log._log)  # a restart on the same log
    Store.open(reopened)
    assert reopened.snapshot_seq == taken


def test_the_timeline_fold_skips_what_it_never_saw_accepted_and_forgets_old_batches() -> None:
    fold = TimelineFold()
    fold.add(ev.Recorded(1, 1.0, ev.JobDispatchIntent("b0000/H1", "gpu", "p0")))
    fold.add(ev.Recorded(2, 1.0, ev.BatchDone("b0000")))
    store = Store(MemoryLog())
    store.listeners.append(lambda rec, _: fold.add(rec))
    store.record(ev.BatchAccepted(make_plan("b0001", frames=101)), now=2.0)
    for job in ("b0001/H1", "b0001/L1", "b0001/C1"):
        run_to_success(store, job, "gpu", now=3.0)
    assert [a.job_id for a in fold.timeline.attempts] == ["b0001/H1", "b0001/L1", "b0001/C1"]
    assert fold.timeline.batches["b0001"].state == "done"
    fold.forget_ended_before(3.0)
    assert "b0001" in fold.timeline.batches
    fold.forget_ended_before(3.5)
    assert fold.timeline.batches == {} and fold.timeline.attempts == []


def test_the_gantt_starts_from_the_tail_of_the_log(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    store = Store(log)
    for n in range(1, 4):
        store.record(ev.BatchAccepted(make_plan(f"b{n:04d}", frames=101)), now=float(n))
        for job in (f"b{n:04d}/H1", f"b{n:04d}/L1", f"b{n:04d}/C1"):
            run_to_success(store, job, "gpu", now=float(n))
    store.commit()
    log.close()
    lines = (tmp_path / "events.jsonl").read_bytes().splitlines(keepends=True)
    third = next(i for i, line in enumerate(lines) if b'"b0003"' in line)
    tail = sum(len(line) for line in lines[third:])
    records = list(tail_records([tmp_path / "events.jsonl"], tail + 5))  # a cut line first
    assert records[0].seq == third + 1
    fold = TimelineFold()
    for rec in records:
        fold.add(rec)
    assert list(fold.timeline.batches) == ["b0003"]
    assert {a.job_id for a in fold.timeline.attempts} == {"b0003/H1", "b0003/L1", "b0003/C1"}


def test_the_gantt_reads_its_history_at_its_first_chart_and_keeps_the_order(tmp_path: Path):
    """Events recorded between the start and the first chart (the history is read then,
    not on the way to the first dispatch) come after the history, once each."""
    log = EventLog(tmp_path)
    store = Store(log)
    store.record(ev.BatchAccepted(make_plan("b0001", frames=101)), now=1.0)
    run_to_success(store, "b0001/H1", "gpu", now=2.0)
    store.commit()
    gantt = Gantt(tmp_path / "events.jsonl")
    store.listeners.append(lambda rec, subject: gantt.add(rec))
    run_to_success(store, "b0001/L1", "gpu", now=3.0)
    store.commit()  # in the file too: read once, from the history or from what was held
    assert gantt.chart(now=4.0) is not None
    attempts = [a.job_id for a in gantt.fold.timeline.attempts]
    assert attempts == ["b0001/H1", "b0001/L1"]


def test_after_a_snapshot_the_gantt_reads_its_past_from_the_last_segments(tmp_path: Path):
    """A clean stop takes a snapshot and leaves an empty live segment: the page's past
    is then in the closed segments before it."""
    log = EventLog(tmp_path)
    store = Store(log)
    store.record(ev.BatchAccepted(make_plan("b0001", frames=101)), now=1.0)
    run_to_success(store, "b0001/H1", "gpu", now=2.0)
    store.compact()
    store.record(ev.BatchAccepted(make_plan("b0002", frames=101)), now=3.0)
    store.compact()
    log.close()
    assert (tmp_path / "events.jsonl").read_bytes() == b""
    gantt = Gantt(tmp_path / "events.jsonl")
    assert gantt.chart(now=4.0) is not None
    assert list(gantt.fold.timeline.batches) == ["b0001", "b0002"]
    assert [a.job_id for a in gantt.fold.timeline.attempts] == ["b0001/H1"]
