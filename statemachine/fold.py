"""How each event changes the state: the jobs, the batches, their indexes, instance health
and the estimates.

``Fold.apply`` checks an event against the state machines (``statemachine.job``), has it
written ahead once it is found legal, then changes what it moves; ``Fold.replay`` applies
the lines of a log, which were checked when they were made. What follows from an event by
rule is not here: ``Store.record`` asks ``statemachine.rules``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from statemachine import events as ev
from statemachine import failpoints
from statemachine.errors import CorruptLog, IllegalTransition
from statemachine.estimates import Estimates
from statemachine.indexes import Indexes
from statemachine.instance_health import InstanceHealth
from statemachine.job import (
    BATCH_FINAL,
    BATCH_MACHINE,
    BATCH_MOVES,
    IN_FLIGHT,
    JOB_MACHINE,
    JOB_MOVES,
    Batch,
    BatchState,
    Job,
    JobState,
    fire,
    replay_move,
)
from statemachine.plan import BatchPlan

# batch event type -> trigger (job events: ``_JOB_EVENTS`` below); the other events move
# no state machine.
_BATCH_TRIGGERS: dict[type[ev.Event], str] = {
    ev.BatchStarted: "start", ev.BatchGateOpened: "open_gate", ev.BatchDone: "finish",
    ev.BatchFailed: "fail", ev.BatchCancelled: "cancel", ev.BatchRetried: "reset",
}


class Fold:
    """All jobs, batches and instance health, as folded from the event log."""

    def __init__(self, estimates: Estimates) -> None:
        self.seq = 0
        self.batches: dict[str, Batch] = {}
        self.jobs: dict[str, Job] = {}
        self.by_sha256: dict[str, str] = {}
        self.indexes = Indexes()
        self.health = InstanceHealth()
        self.estimates = estimates

    def apply(self, seq: int, ts: float, event: ev.Event,
              append: Callable[[], None] | None) -> Any:
        """Apply one event and return what it changed. ``append`` writes it ahead to the
        log once it is found legal; replay passes None: its events are in the log already
        and were checked when they were made."""
        kind = type(event)
        job_event = _JOB_EVENTS.get(kind)
        if job_event is not None:
            subject: Any = self._move_job(seq, ts, event, job_event, append)
        elif kind in _BATCH_TRIGGERS:
            subject = self._move_batch(ts, event, _BATCH_TRIGGERS[kind], append)
        elif isinstance(event, ev.BatchAccepted):
            subject = self.accept(ts, event, append)
        else:
            if append is not None:
                append()
            subject = self.health.apply(event)
        self.seq = seq
        return subject

    def replay(self, lines: Iterable[tuple[int, bytes]], locate: Callable[[int], str]) -> None:
        """Apply the lines after the snapshot, then line up the ready jobs. One loop, no
        call per line but the work: this runs a million times when a daemon restarts on a
        long log. ``locate`` names a line in an error."""
        line_no = 0
        try:
            for line_no, line in lines:
                if line_no % 64 == 0:
                    failpoints.hit("replay")
                seq, ts, event = ev.parse(line)
                if seq <= self.seq:  # already in the snapshot
                    continue
                if seq != self.seq + 1:
                    raise CorruptLog(f"sequence jumps from {self.seq} to {seq}")
                self.apply(seq, ts, event, None)
        except (CorruptLog, IllegalTransition) as exc:
            raise CorruptLog(f"{locate(line_no)}: {exc}") from None
        self.indexes.line_up()

    # --- jobs ------------------------------------------------------------------------

    def _move_job(self, seq: int, ts: float, event: Any, job_event: _JobEvent,
                  append: Callable[[], None] | None) -> Job:
        try:
            job = self.jobs[event.job_id]
        except KeyError:
            raise IllegalTransition(f"unknown job {event.job_id!r}") from None
        old = job.state
        if old in IN_FLIGHT and getattr(event, "prompt_id", job.prompt_id) != job.prompt_id:
            raise IllegalTransition(
                f"{job!r}: {event.type} for prompt {event.prompt_id}, in flight as {job.prompt_id}")
        sent_to, prompt_id = job.instance_id, job.prompt_id
        trigger, set_fields = job_event
        if append is None:
            replay_move(JOB_MOVES, job, trigger)
        else:
            fire(JOB_MACHINE, job, trigger, append, jobs=self.jobs, now=ts)
        set_fields(job, event, ts)
        take = self.estimates.takes.get(type(event))
        if take is not None:
            take(event, job, ts)
        self.indexes.moved(job, old, seq, live=append is not None)
        if old in IN_FLIGHT and job.state not in IN_FLIGHT and job.state is not \
                JobState.SUCCEEDED and sent_to is not None and prompt_id is not None:
            self.health.abandon(sent_to, prompt_id)
        return job

    # --- batches ---------------------------------------------------------------------

    def accept(self, ts: float, event: ev.BatchAccepted,
               append: Callable[[], None] | None) -> Batch:
        """A new batch and its jobs, all waiting (``append``: as in ``apply``)."""
        plan = event.plan
        _check_plan(plan, self.batches, self.jobs)
        if append is not None:
            append()
        batch = Batch(plan, ts, len(self.batches))
        for spec in plan.jobs:
            job = Job(spec, batch)
            batch.jobs.append(job)
            self.jobs[spec.job_id] = job
        for job in batch.jobs:
            for dep in job.spec.deps:
                self.jobs[dep].dependants.append(job)
        self.add_batch(batch)
        self.indexes.accepted(batch.jobs)
        return batch

    def add_batch(self, batch: Batch) -> None:
        self.batches[batch.batch_id] = batch
        self.by_sha256[batch.plan.sha256] = batch.batch_id  # the latest batch of that file

    def _move_batch(self, ts: float, event: Any, trigger: str,
                    append: Callable[[], None] | None) -> Batch:
        batch = self.batches.get(event.batch_id)
        if batch is None:
            raise IllegalTransition(f"unknown batch {event.batch_id!r}")
        if append is None:
            replay_move(BATCH_MOVES, batch, trigger)
        else:
            fire(BATCH_MACHINE, batch, trigger, append)
        batch.reason = getattr(event, "reason", None)  # why it is in its state, if it says
        batch.ended_at = ts if batch.state in BATCH_FINAL else None
        self.indexes.batch_moved(batch)
        if batch.state is BatchState.DONE:
            self.summarise(batch)
        return batch

    def summarise(self, batch: Batch) -> None:
        """A done batch is final: its jobs go, a summary stays (``Batch.summarise``). They
        still count as succeeded in ``state_counts``, as a user would count them."""
        for job in batch.summarise():
            del self.jobs[job.job_id]


def _check_plan(plan: BatchPlan, batches: dict[str, Batch], jobs: dict[str, Job]) -> None:
    if plan.batch_id in batches:
        raise IllegalTransition(f"batch {plan.batch_id!r} already exists")
    ids = {j.job_id for j in plan.jobs}
    if len(ids) != len(plan.jobs) or any(i in jobs for i in ids):
        raise IllegalTransition(f"batch {plan.batch_id!r}: job ids are not unique")
    seen: set[str] = set()
    for job in plan.jobs:
        if not set(job.deps) <= seen:
            raise IllegalTransition(f"{job.job_id}: dependencies must come earlier in the plan")
        seen.add(job.job_id)


# --- how each job event changes a job's fields (besides its state) ---------------------


def _on_ready(job: Job, e: Any, ts: float) -> None:
    job.eligible_at = ts


def _on_intent(job: Job, e: Any, ts: float) -> None:
    job.instance_id, job.prompt_id, job.number = e.instance_id, e.prompt_id, None


def _on_queued(job: Job, e: Any, ts: float) -> None:
    job.number = e.number


def _on_succeeded(job: Job, e: Any, ts: float) -> None:
    job.outputs = e.outputs


def _on_attempt_failed(job: Job, e: Any, ts: float) -> None:
    job.attempts += 1
    job.error, job.eligible_at = e.error, e.eligible_at
    job.instance_id = job.prompt_id = None


def _on_failed(job: Job, e: Any, ts: float) -> None:
    job.attempts += 1
    job.error = e.error


def _on_lost(job: Job, e: Any, ts: float) -> None:
    job.eligible_at = ts
    job.instance_id = job.prompt_id = None


def _on_cancelled(job: Job, e: Any, ts: float) -> None:
    job.error = e.reason  # instance and prompt stay: the daemon stops the render there


def _on_reset(job: Job, e: Any, ts: float) -> None:
    job.attempts, job.error, job.outputs = 0, None, None
    job.instance_id = job.prompt_id = None


def _unchanged(job: Job, e: Any, ts: float) -> None:
    return None


# job event type -> (the job's trigger, what else it changes in the job)
_JobEvent = tuple[str, Callable[[Job, Any, float], None]]
_JOB_EVENTS: dict[type[ev.Event], _JobEvent] = {
    ev.JobReady: ("promote", _on_ready), ev.JobDispatchIntent: ("dispatch", _on_intent),
    ev.JobQueued: ("accept", _on_queued), ev.JobStarted: ("start", _unchanged),
    ev.JobSucceeded: ("succeed", _on_succeeded),
    ev.JobAttemptFailed: ("retry_later", _on_attempt_failed), ev.JobFailed: ("fail", _on_failed),
    ev.JobLost: ("lose", _on_lost), ev.JobCancelled: ("cancel", _on_cancelled),
    ev.JobReset: ("reset", _on_reset),
}
