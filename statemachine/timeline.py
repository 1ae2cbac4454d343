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


_ENDINGS: dict[type[ev.Event], str] = {
    ev.JobSucceeded: "succeeded", ev.JobAttemptFailed: "retry", ev.JobFailed: "failed",
    ev.JobLost: "lost", ev.JobCancelled: "cancelled",
}
_BATCH_STATES: dict[type[ev.Event], str] = {
    ev.BatchStarted: "rendering", ev.BatchGateOpened: "combining", ev.BatchDone: "done",
    ev.BatchFailed: "failed", ev.BatchCancelled: "cancelled", ev.BatchRetried: "accepted",
}


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


def build_timeline(records: Iterable[ev.Recorded]) -> Timeline:
    tl = Timeline()
    kinds: dict[str, tuple[str, str]] = {}
    open_attempts: dict[str, Attempt] = {}
    for rec in records:
        e = rec.event
        if isinstance(e, ev.BatchAccepted):
            plan = e.plan
            tl.batches[plan.batch_id] = BatchSpan(plan.batch_id, plan.name, len(plan.jobs),
                                                  rec.ts)
            kinds.update({j.job_id: (j.kind.value, plan.batch_id) for j in plan.jobs})
        elif isinstance(e, ev.JobDispatchIntent):
            kind, batch_id = kinds[e.job_id]
            attempt = Attempt(e.job_id, kind, batch_id, e.instance_id, e.prompt_id, rec.ts)
            open_attempts[e.job_id] = attempt
            tl.attempts.append(attempt)
        elif isinstance(e, ev.JobStarted) and e.job_id in open_attempts:
            open_attempts[e.job_id].started_at = rec.ts
        elif type(e) in _ENDINGS and e.job_id in open_attempts:
            attempt = open_attempts.pop(e.job_id)
            attempt.ended_at, attempt.outcome = rec.ts, _ENDINGS[type(e)]
            if isinstance(e, ev.JobSucceeded):
                tl.batches[attempt.batch_id].succeeded += 1
        elif type(e) in _BATCH_STATES:
            span = tl.batches[e.batch_id]
            span.state = _BATCH_STATES[type(e)]
            span.ended_at = rec.ts if span.state in ("done", "failed", "cancelled") else None
            if isinstance(e, ev.BatchGateOpened):
                tl.gates[e.batch_id] = rec.ts
    return tl
