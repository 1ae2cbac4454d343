"""What follows from what: the rules that turn one recorded event into the next ones.

``follow_ups`` is a generator read lazily by ``Store.record``: each event it yields is
computed against the state left by everything recorded before it, so a rule never acts
on a stale view (two rules cannot both open the same gate).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from statemachine import events as ev
from statemachine.job import (
    BATCH_FINAL,
    IN_FLIGHT,
    JOB_FINAL,
    Batch,
    BatchState,
    Job,
    JobState,
    deps_met,
)


@dataclass(frozen=True, slots=True)
class Policy:
    """The rules' knobs, taken from the settings, and what the estimates start from:
    run times per kind until runs are seen, the switch cost (None: learned)."""

    max_retries: int = 3
    retry_delay: float = 5.0
    retry_delay_max: float = 300.0
    combine_gate: str = "batch"
    job_durations: Mapping[str, float] = field(default_factory=dict)
    switch_cost: float | None = None


class StoreView(Protocol):
    """What the rules read of the state (``statemachine.store.Store`` is one)."""

    @property
    def policy(self) -> Policy: ...

    @property
    def jobs(self) -> Mapping[str, Job]: ...

    @property
    def batches(self) -> Mapping[str, Batch]: ...

    @property
    def unfinished_renders(self) -> int: ...

    def open_batches(self) -> Iterable[Batch]: ...


def follow_ups(store: StoreView, event: ev.Event) -> Iterator[ev.Event]:
    rule = _RULES.get(type(event))
    return rule(store, event) if rule else iter(())


def _promote(store: StoreView, jobs: Iterable[Job]) -> Iterator[ev.Event]:
    for job in jobs:
        if job.state is JobState.WAITING and deps_met(job, store.jobs):
            yield ev.JobReady(job.job_id)


def _gates(store: StoreView, batch: Batch) -> Iterator[ev.Event]:
    """Open the COMBINE gate of every batch whose turn it is.

    "batch": a batch's gate opens once all its render jobs succeeded. "global": gates
    open only when no render job of any batch is unfinished.
    """
    if store.policy.combine_gate == "batch":
        candidates: Iterable[Batch] = (batch,)
    elif store.unfinished_renders == 0:
        candidates = list(store.open_batches())
    else:
        return
    for b in candidates:
        if b.state in (BatchState.ACCEPTED, BatchState.RENDERING) and b.renders_left == 0:
            yield ev.BatchGateOpened(b.batch_id)


def _after_accepted(store: StoreView, e: ev.BatchAccepted) -> Iterator[ev.Event]:
    yield from _promote(store, store.batches[e.batch_id].jobs)


def _after_intent(store: StoreView, e: ev.JobDispatchIntent) -> Iterator[ev.Event]:
    batch = store.jobs[e.job_id].batch
    if batch.state is BatchState.ACCEPTED:
        yield ev.BatchStarted(batch.batch_id)


def _after_succeeded(store: StoreView, e: ev.JobSucceeded) -> Iterator[ev.Event]:
    job = store.jobs[e.job_id]
    yield from _promote(store, job.dependants)
    if job.kind.renders:
        yield from _gates(store, job.batch)
    elif job.batch.combines_left == 0 and job.batch.state is BatchState.COMBINING:
        yield ev.BatchDone(job.batch.batch_id)


def _after_failed(store: StoreView, e: ev.JobFailed) -> Iterator[ev.Event]:
    yield from _fail_batch(store, store.jobs[e.job_id], e.error)


def _fail_batch(store: StoreView, job: Job, error: str) -> Iterator[ev.Event]:
    """A failed job cancels the rest of its batch and fails it; other batches go on."""
    for other in job.batch.jobs:
        if other.state not in JOB_FINAL:
            yield ev.JobCancelled(other.job_id, f"{job.job_id} failed")
    if job.batch.state not in BATCH_FINAL:
        yield ev.BatchFailed(job.batch.batch_id, f"{job.job_id} failed: {error}")
    if job.kind.renders:
        yield from _gates(store, job.batch)


def _after_cancelled(store: StoreView, e: ev.JobCancelled) -> Iterator[ev.Event]:
    job = store.jobs[e.job_id]
    if job.kind.renders:
        yield from _gates(store, job.batch)


def _after_gate(store: StoreView, e: ev.BatchGateOpened) -> Iterator[ev.Event]:
    yield from _promote(store, store.batches[e.batch_id].jobs)


def _after_reset(store: StoreView, e: ev.JobReset) -> Iterator[ev.Event]:
    yield from _promote(store, (store.jobs[e.job_id],))


def _after_batch_retried(store: StoreView, e: ev.BatchRetried) -> Iterator[ev.Event]:
    yield from _gates(store, store.batches[e.batch_id])


_RULES: dict[type[ev.Event], Callable[[Any, Any], Iterator[ev.Event]]] = {
    ev.BatchAccepted: _after_accepted, ev.JobDispatchIntent: _after_intent,
    ev.JobSucceeded: _after_succeeded, ev.JobFailed: _after_failed,
    ev.JobCancelled: _after_cancelled, ev.BatchGateOpened: _after_gate,
    ev.JobReset: _after_reset, ev.BatchRetried: _after_batch_retried,
}


def missing_follow_ups(store: StoreView) -> Iterator[ev.Event]:
    """Every follow-up that is due but missing from the log, after a replay.

    A crash can leave part of a turn on disk (a torn write keeps its first lines): an
    event can then survive without the events that follow from it by rule. Nothing of that
    turn reached a server (effects wait for the whole turn's fsync), so recording the
    missing follow-ups now gives the state the turn would have ended in. Lazy, like
    ``follow_ups``: each event is computed against the state left by the previous one.
    """
    for batch in list(store.open_batches()):
        failed = next((j for j in batch.jobs if j.state is JobState.FAILED), None)
        if failed is not None:
            yield from _fail_batch(store, failed, failed.error or "")
            continue
        if batch.state is BatchState.ACCEPTED and any(j.state in IN_FLIGHT for j in batch.jobs):
            yield ev.BatchStarted(batch.batch_id)
        yield from _gates(store, batch)
        yield from _promote(store, batch.jobs)
        if batch.state is BatchState.COMBINING and batch.combines_left == 0:
            yield ev.BatchDone(batch.batch_id)


# --- decisions the daemon asks for ---------------------------------------------------


def failure_event(job: Job, error: str, *, permanent: bool, now: float,
                  policy: Policy) -> ev.Event:
    """Retry after a backoff while attempts remain (``MAX_RETRIES`` retries after the
    first attempt, the delay doubling from ``RETRY_DELAY``), else fail the job."""
    assert job.prompt_id is not None, f"{job!r} is not in flight"
    if permanent or job.attempts >= policy.max_retries:
        return ev.JobFailed(job.job_id, job.prompt_id, error)
    delay = min(policy.retry_delay * 2 ** job.attempts, policy.retry_delay_max)
    return ev.JobAttemptFailed(job.job_id, job.prompt_id, error, now + delay)


def cancel_batch(batch: Batch, reason: str) -> Iterator[ev.Event]:
    """Cancel every unfinished job, then the batch. Record the events one by one."""
    for job in batch.jobs:
        if job.state not in JOB_FINAL:
            yield ev.JobCancelled(job.job_id, reason)
    if batch.state not in BATCH_FINAL:
        yield ev.BatchCancelled(batch.batch_id, reason)


def retry_batch(batch: Batch) -> Iterator[ev.Event]:
    """Put a failed or cancelled batch back to work: its failed and cancelled jobs wait
    again with fresh attempts."""
    yield ev.BatchRetried(batch.batch_id)
    for job in batch.jobs:
        if job.state in (JobState.FAILED, JobState.CANCELLED):
            yield ev.JobReset(job.job_id)
