"""Who ran what, when: a fold of the event log into dispatch attempts and batch spans.

The run summary, ``submit.py report`` and the benchmarks read this; nothing here decides.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from statemachine import events as ev


@dataclass(slots=True)
class Attempt:
    """One dispatch of one job: an instance, a prompt_id, its times and how it ended."""

    job_id: str
    kind: str
    batch_id: str
    instance_id: str
    prompt_id: str
    dispatched_at: float
    started_at: float | None = None
    ended_at: float | None = None
    outcome: str | None = None  # succeeded, retry, failed, lost, cancelled

    @property
    def busy_from(self) -> float:
        return self.started_at if self.started_at is not None else self.dispatched_at


@dataclass(slots=True)
class BatchSpan:
    batch_id: str
    name: str
    jobs: int
    accepted_at: float
    ended_at: float | None = None
    state: str = "accepted"
    succeeded: int = 0


@dataclass(slots=True)
class Timeline:
    attempts: list[Attempt] = field(default_factory=list)
    batches: dict[str, BatchSpan] = field(default_factory=dict)
    gates: dict[str, float] = field(default_factory=dict)  # batch -> when its gate opened


# The events that end an attempt and those that move a batch, as tuples for isinstance (which
# tells the type checker that the event has a job_id, a batch_id), and what each one means.
_JOB_ENDINGS = (ev.JobSucceeded, ev.JobAttemptFailed, ev.JobFailed, ev.JobLost, ev.JobCancelled)
_ENDINGS: dict[type[ev.Event], str] = dict(
    zip(_JOB_ENDINGS, ("succeeded", "retry", "failed", "lost", "cancelled"), strict=True))
_BATCH_MOVES = (ev.BatchStarted, ev.BatchGateOpened, ev.BatchDone, ev.BatchFailed,
                ev.BatchCancelled, ev.BatchRetried)
_BATCH_STATES: dict[type[ev.Event], str] = dict(
    zip(_BATCH_MOVES, ("rendering", "combining", "done", "failed", "cancelled", "accepted"),
        strict=True))


def busy_seconds(attempts: Iterable[Attempt], instance_id: str, until: float) -> float:
    """Time the instance spent running jobs (overlapping attempts counted once)."""
    spans = sorted((a.busy_from, a.ended_at if a.ended_at is not None else until)
                   for a in attempts if a.instance_id == instance_id)
    total, reach = 0.0, float("-inf")
    for start, end in spans:
        start = max(start, reach)
        if end > start:
            total += end - start
            reach = end
    return total


class TimelineFold:
    """``build_timeline`` one record at a time, for a timeline kept up to date as events
    are recorded. Events of jobs and batches it never saw accepted (before a snapshot,
    or before it started) are left out."""

    def __init__(self) -> None:
        self.timeline = Timeline()
        self._kinds: dict[str, tuple[str, str]] = {}  # job -> (kind, batch)
        self._open: dict[str, Attempt] = {}  # job -> its attempt in flight

    def add(self, rec: ev.Recorded) -> None:
        e, tl = rec.event, self.timeline
        if isinstance(e, ev.BatchAccepted):
            plan = e.plan
            tl.batches[plan.batch_id] = BatchSpan(plan.batch_id, plan.name, len(plan.jobs),
                                                  rec.ts)
            self._kinds.update({j.job_id: (j.kind.value, plan.batch_id) for j in plan.jobs})
        elif isinstance(e, ev.JobDispatchIntent):
            known = self._kinds.get(e.job_id)
            if known is not None:
                attempt = Attempt(e.job_id, *known, e.instance_id, e.prompt_id, rec.ts)
                self._open[e.job_id] = attempt
                tl.attempts.append(attempt)
        elif isinstance(e, ev.JobStarted) and e.job_id in self._open:
            self._open[e.job_id].started_at = rec.ts
        elif isinstance(e, _JOB_ENDINGS) and e.job_id in self._open:
            attempt = self._open.pop(e.job_id)
            attempt.ended_at, attempt.outcome = rec.ts, _ENDINGS[type(e)]
            if isinstance(e, ev.JobSucceeded):
                tl.batches[attempt.batch_id].succeeded += 1
        elif isinstance(e, _BATCH_MOVES) and e.batch_id in tl.batches:
            span = tl.batches[e.batch_id]
            span.state = _BATCH_STATES[type(e)]
            span.ended_at = rec.ts if span.state in ("done", "failed", "cancelled") else None
            if isinstance(e, ev.BatchGateOpened):
                tl.gates[e.batch_id] = rec.ts

    def forget_ended_before(self, when: float) -> None:
        """Drop the batches that ended before ``when``, with their attempts and gates."""
        tl = self.timeline
        gone = {b for b, span in tl.batches.items()
                if span.ended_at is not None and span.ended_at < when}
        if not gone:
            return
        tl.attempts = [a for a in tl.attempts if a.batch_id not in gone]
        for batch_id in gone:
            del tl.batches[batch_id]
            tl.gates.pop(batch_id, None)
        self._kinds = {j: known for j, known in self._kinds.items() if known[1] not in gone}


def build_timeline(records: Iterable[ev.Recorded]) -> Timeline:
    fold = TimelineFold()
    for rec in records:
        fold.add(rec)
    return fold.timeline
