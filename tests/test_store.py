"""Example tests of the store and its rules: the life of a batch as users see it."""

from __future__ import annotations

import orjson
import pytest
from support import dispatch, make_plan, run_to_success

from statemachine import events as ev
from statemachine.errors import CorruptLog, IllegalTransition
from statemachine.job import BatchState, JobState
from statemachine.log import MemoryLog
from statemachine.rules import Policy, cancel_batch, failure_event, missing_follow_ups, retry_batch
from statemachine.store import Store


def new_store(**policy) -> Store:
    return Store(MemoryLog(), Policy(**policy))


def test_accepting_a_batch_makes_only_the_first_high_job_ready():
    store = new_store()
    store.record(ev.BatchAccepted(make_plan("b1")), now=1.0)
    assert list(store.ready) == ["b1/H1"]
    assert store.batches["b1"].state is BatchState.ACCEPTED
    assert {j.state for j in store.jobs.values() if j.job_id != "b1/H1"} == {JobState.WAITING}


def test_a_batch_runs_its_chain_then_combines_then_is_done():
    store = new_store()
    store.record(ev.BatchAccepted(make_plan("b1", frames=202)), now=0)
    order = []
    while store.ready:
        job_id = next(iter(store.ready))
        order.append(job_id)
        run_to_success(store, job_id, "i1", now=len(order))
    assert order == ["b1/H1", "b1/L1", "b1/H2", "b1/L2", "b1/C1", "b1/C2"]
    assert store.batches["b1"].state is BatchState.DONE


def test_combine_waits_for_the_gate_even_when_its_own_chunk_is_rendered():
    store = new_store()
    store.record(ev.BatchAccepted(make_plan("b1", frames=202)), now=0)
    for job_id in ("b1/H1", "b1/L1"):
        run_to_success(store, job_id, "i1", now=1)
    assert "b1/C1" not in store.ready
    assert store.batches["b1"].state is BatchState.RENDERING


def test_global_gate_waits_for_every_batch_to_finish_rendering():
    store = new_store(combine_gate="global")
    store.record(ev.BatchAccepted(make_plan("a", frames=101)), now=0)
    store.record(ev.BatchAccepted(make_plan("b", frames=101)), now=0)
    run_to_success(store, "a/H1", "i1", 1)
    run_to_success(store, "a/L1", "i2", 2)
    assert store.batches["a"].state is BatchState.RENDERING
    run_to_success(store, "b/H1", "i1", 3)
    run_to_success(store, "b/L1", "i2", 4)
    assert store.batches["a"].state is BatchState.COMBINING
    assert set(store.ready) == {"a/C1", "b/C1"}


def test_failure_retries_with_doubling_backoff_then_fails_the_batch_only():
    store = new_store(max_retries=2, retry_delay=5)
    store.record(ev.BatchAccepted(make_plan("a")), now=0)
    store.record(ev.BatchAccepted(make_plan("b")), now=0)
    job = store.jobs["a/H1"]
    delays = []
    for now in (10, 100, 1000):
        dispatch(store, "a/H1", "i1", now)
        store.record(failure_event(job, "boom", permanent=False, now=now,
                                   policy=store.policy), now)
        if job.state is JobState.READY:
            delays.append(job.eligible_at - now)
    assert delays == [5, 10]
    assert job.state is JobState.FAILED and job.attempts == 3
    assert store.batches["a"].state is BatchState.FAILED
    assert {j.state for j in store.batches["a"].jobs} == {JobState.FAILED, JobState.CANCELLED}
    assert store.batches["b"].state is BatchState.ACCEPTED
    assert "b/H1" in store.ready


def test_a_permanent_error_fails_at_once():
    store = new_store()
    store.record(ev.BatchAccepted(make_plan("a")), now=0)
    dispatch(store, "a/H1", "i1", 1)
    store.record(failure_event(store.jobs["a/H1"], "node 3: bad", permanent=True, now=1,
                               policy=store.policy), 1)
    assert store.jobs["a/H1"].state is JobState.FAILED
    assert "node 3: bad" in str(store.batches["a"].reason)


def test_a_lost_job_is_ready_again_without_using_an_attempt():
    store = new_store()
    store.record(ev.BatchAccepted(make_plan("a")), now=0)
    pid = dispatch(store, "a/H1", "i1", 1)
    store.record(ev.JobLost("a/H1", pid, "instance restarted"), 2)
    job = store.jobs["a/H1"]
    assert job.state is JobState.READY and job.attempts == 0 and job.prompt_id is None


def test_cancel_then_retry_puts_the_batch_back_to_work():
    store = new_store()
    store.record(ev.BatchAccepted(make_plan("a")), now=0)
    run_to_success(store, "a/H1", "i1", 1)
    dispatch(store, "a/L1", "i2", 2)
    for e in cancel_batch(store.batches["a"], "user asked"):
        store.record(e, 3)
    assert store.batches["a"].state is BatchState.CANCELLED
    assert not store.ready and not store.in_flight
    for e in retry_batch(store.batches["a"]):
        store.record(e, 4)
    assert store.batches["a"].state is BatchState.ACCEPTED
    assert list(store.ready) == ["a/L1"]
    assert store.jobs["a/H1"].state is JobState.SUCCEEDED


def test_illegal_transitions_raise_and_record_nothing():
    log = MemoryLog()
    store = Store(log, Policy())
    store.record(ev.BatchAccepted(make_plan("a")), now=0)
    before = log.pending[:]
    with pytest.raises(IllegalTransition):
        store.record(ev.JobSucceeded("a/H1", "nope", {}), 1)  # not in flight
    with pytest.raises(IllegalTransition):
        store.record(ev.JobReady("a/L1"), 1)  # dependency not met
    with pytest.raises(IllegalTransition):
        store.record(ev.BatchDone("a"), 1)
    with pytest.raises(IllegalTransition):
        store.record(ev.BatchAccepted(make_plan("a")), 1)  # twice
    assert log.pending == before


def test_messages_about_another_attempt_are_refused():
    store = new_store()
    store.record(ev.BatchAccepted(make_plan("a")), now=0)
    dispatch(store, "a/H1", "i1", 1)
    with pytest.raises(IllegalTransition, match="in flight as"):
        store.record(ev.JobSucceeded("a/H1", "old-attempt", {}), 2)


def test_backoff_guard_refuses_an_early_dispatch():
    store = new_store()
    store.record(ev.BatchAccepted(make_plan("a")), now=0)
    dispatch(store, "a/H1", "i1", 1)
    store.record(failure_event(store.jobs["a/H1"], "x", permanent=False, now=1,
                               policy=store.policy), 1)
    with pytest.raises(IllegalTransition, match="guard"):
        dispatch(store, "a/H1", "i1", 2)


def test_replay_and_snapshot_rebuild_the_same_state():
    log = MemoryLog()
    store = Store(log)
    store.record(ev.BatchAccepted(make_plan("a")), 0)
    store.record(ev.BatchAccepted(make_plan("b", priority=3)), 0)
    store.record(ev.InstanceUp("i1"), 0)
    run_to_success(store, "a/H1", "i1", 1)
    dispatch(store, "b/H1", "i1", 2)
    store.commit()
    assert Store.open(log).snapshot() == store.snapshot()
    store.compact()
    assert log.committed == []
    reopened = Store.open(log)
    assert reopened.snapshot() == store.snapshot()
    assert list(reopened.ready) == list(store.ready)
    run_to_success(store, "a/L1", "i1", 3)
    store.commit()
    assert Store.open(log).snapshot() == store.snapshot()


def test_replay_refuses_a_log_with_a_gap_naming_the_line():
    log = MemoryLog()
    store = Store(log)
    store.record(ev.BatchAccepted(make_plan("a")), 0)
    store.record(ev.InstanceUp("i1"), 0)
    store.record(ev.InstanceUp("i2"), 0)
    store.commit()
    del log.committed[2]
    with pytest.raises(CorruptLog, match="line 3: sequence jumps"):
        Store.open(log)


def test_replay_refuses_an_impossible_recorded_move():
    log = MemoryLog()
    store = Store(log)
    store.record(ev.BatchAccepted(make_plan("a")), 0)
    store.commit()
    log.committed.append(ev.encode(ev.Recorded(store.seq + 1, 1, ev.BatchDone("a"))))
    with pytest.raises(CorruptLog, match=f"line {len(log.committed)}:.*finish"):
        Store.open(log)


@pytest.mark.parametrize(("fields", "says"), [
    ({}, r"missing \['job_id'\], unexpected \[\]"),
    ({"job_id": "a/H1", "note": 1}, r"missing \[\], unexpected \['note'\]"),
    ({"jobid": "a/H1"}, "'job_id'"),
    ({"job_id": "a/H1", "prompt_id": "p"}, "unexpected"),
])
def test_replay_names_the_fields_a_record_has_wrong(fields, says):
    log = MemoryLog()
    Store(log).record(ev.InstanceUp("i1"), 0)
    log.commit()
    log.committed.append(orjson.dumps({"seq": 2, "ts": 1, "type": "job_ready", "v": 1, **fields}))
    with pytest.raises(CorruptLog, match=f"line 2: bad fields for job_ready: .*{says}"):
        Store.open(log)


def _turn_with(event_for, frames: int, done: list[str]):
    """A store whose jobs in ``done`` succeeded, the next job in flight, all committed."""
    log = MemoryLog()
    store = Store(log, Policy(max_retries=0))
    store.record(ev.BatchAccepted(make_plan("a", frames=frames)), 0)
    for job_id in done:
        run_to_success(store, job_id, "i1", 1)
    job_id = next(iter(store.ready))
    dispatch(store, job_id, "i1", 2)
    store.commit()
    return log, store, event_for(store.jobs[job_id])


@pytest.mark.parametrize("event_for, frames, done", [
    (lambda j: ev.JobSucceeded(j.job_id, j.prompt_id, {}), 202, ["a/H1"]),  # L1: next H2
    (lambda j: ev.JobSucceeded(j.job_id, j.prompt_id, {}), 101, ["a/H1"]),  # L1: gate
    (lambda j: ev.JobSucceeded(j.job_id, j.prompt_id, {}), 101, ["a/H1", "a/L1"]),  # done
    (lambda j: ev.JobFailed(j.job_id, j.prompt_id, "boom"), 202, []),  # fails the batch
])
def test_missing_follow_ups_complete_a_turn_torn_after_its_first_event(event_for, frames, done):
    log, store, event = _turn_with(event_for, frames, done)
    store.record(event, 3)
    whole_turn = store.snapshot()
    assert len(log.pending) > 1, "the event should have follow-ups"
    log.crash(torn=1)  # only the event itself reached the disk
    reopened = Store.open(log, store.policy)
    assert reopened.snapshot() != whole_turn
    for follow_up in missing_follow_ups(reopened):
        reopened.record(follow_up, 3)
    assert reopened.snapshot() == whole_turn
    assert list(missing_follow_ups(reopened)) == []


def test_a_retried_batch_says_no_more_why_it_was_cancelled():
    store = new_store()
    store.record(ev.BatchAccepted(make_plan("b1", frames=101)), now=0.0)
    batch = store.batches["b1"]
    for event in list(cancel_batch(batch, "cancelled by a user")):
        store.record(event, now=1.0)
    assert batch.reason == "cancelled by a user"
    for event in list(retry_batch(batch)):
        store.record(event, now=2.0)
    assert batch.reason is None
    for job_id in ("b1/H1", "b1/L1", "b1/C1"):
        run_to_success(store, job_id, "i", now=3.0)
    assert (batch.state, batch.reason) == (BatchState.DONE, None)
