"""What the scheduler expects jobs to cost, folded from the event log.

The scheduler (``statemachine.scheduler``) places jobs by when they are expected to start
and steals by how much work each server has left; this module works out those inputs
from what happened: how long runs took (``CostLearner``), the kind each server ran last,
when each running job started. The store folds every job event into its ``Estimates``
(``Estimates.takes``) live and on replay, and keeps them in its snapshot, so a restarted
daemon expects what the live one expected.
"""

from __future__ import annotations

import statistics
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from statemachine import events as ev
from statemachine.job import Job
from statemachine.scheduler import Costs

LEARN_WINDOW = 31  # observed runs per kind the running medians of ``CostLearner`` look at


def expected_busy(queue: Iterable[tuple[str, float | None]], *, now: float,
                  before: str | None, costs: Costs) -> float:
    """Seconds an instance's jobs in flight are still expected to take.

    ``queue`` holds them in the order they were sent, as (kind, started_at or None);
    ``before`` is the kind the instance ran before the first of them (None: unknown). A
    running job that overran its estimate counts as about to end.
    """
    total = 0.0
    previous = before
    for kind, started_at in queue:
        run = costs.switch(previous, kind) + costs.duration(kind)
        if started_at is not None:
            run = max(0.0, run - (now - started_at))
        total += run
        previous = kind
    return total


class CostLearner:
    """``Costs`` from observed runs: per kind, a running median of the runs that followed a
    job of the same kind on their server, and of those that followed another kind; the
    switch cost is the median gap between the two (unless configured).

    ``prior`` durations stand in for kinds not seen yet; a kind with neither is expected
    to take as long as the shortest kind seen (not zero: its first jobs would look free).
    """

    def __init__(self, prior: Mapping[str, float] | None = None,
                 switch_cost: float | None = None, window: int = LEARN_WINDOW) -> None:
        self.prior = dict(prior or {})
        self.configured_switch = switch_cost
        self.window = window
        self._same: defaultdict[str, deque[float]] = defaultdict(self._runs)
        self._switched: defaultdict[str, deque[float]] = defaultdict(self._runs)
        self._costs: Costs | None = None

    def _runs(self, seen: Iterable[float] = ()) -> deque[float]:
        return deque(seen, maxlen=self.window)

    def observe(self, kind: str, seconds: float, *, switched: bool) -> None:
        """One finished run of ``kind`` that took ``seconds`` from start to end."""
        (self._switched if switched else self._same)[kind].append(seconds)
        self._costs = None

    def costs(self) -> Costs:
        if self._costs is None:
            switch = self._switch_cost()
            durations = dict(self.prior)
            for kind in set(self._same) | set(self._switched):
                durations[kind] = self._duration(kind, switch)
            self._costs = Costs(durations, switch, min(durations.values(), default=0.0))
        return self._costs

    def _switch_cost(self) -> float:
        if self.configured_switch is not None:
            return self.configured_switch
        gaps = [statistics.median(self._switched[k]) - statistics.median(self._same[k])
                for k in self._same if self._switched.get(k)]
        return max(0.0, statistics.median(gaps)) if gaps else 0.0

    def _duration(self, kind: str, switch: float) -> float:
        if self._same.get(kind):
            return statistics.median(self._same[kind])
        return max(0.0, statistics.median(self._switched[kind]) - switch)

    def snapshot(self) -> dict[str, Any]:
        return {"same": {str(k): list(v) for k, v in sorted(self._same.items())},
                "switched": {str(k): list(v) for k, v in sorted(self._switched.items())}}

    def restore(self, saved: Mapping[str, Any]) -> None:
        for kind, seen in saved["same"].items():
            self._same[kind] = self._runs(seen)
        for kind, seen in saved["switched"].items():
            self._switched[kind] = self._runs(seen)
        self._costs = None


class Estimates:
    """Per instance, the kind of the last job sent there and the kinds of its last two
    runs; per running job, when it started and whether its server switched models for
    it; the learned costs."""

    def __init__(self, prior: Mapping[str, float] | None = None,
                 switch_cost: float | None = None) -> None:
        self.learner = CostLearner(prior, switch_cost)
        self.sent: dict[str, str] = {}  # instance -> kind of the last job sent there
        self.ran: dict[str, tuple[str | None, str]] = {}  # instance -> (kind before, last)
        self.started: dict[str, tuple[float, bool]] = {}  # job -> (started at, switched)
        # what a job event changes here, by its type: the store calls ``takes[type](event,
        # job, ts)`` after the job took the event in (replay passes every event through)
        self.takes: dict[type[ev.Event], Callable[[Any, Job, float], None]] = {
            ev.JobDispatchIntent: self._sent, ev.JobStarted: self._started,
            **dict.fromkeys((ev.JobSucceeded, ev.JobAttemptFailed, ev.JobFailed, ev.JobLost,
                             ev.JobCancelled, ev.JobReset), self._ended)}

    def _sent(self, event: ev.JobDispatchIntent, job: Job, ts: float) -> None:
        self.sent[event.instance_id] = job.kind

    def _started(self, event: ev.JobStarted, job: Job, ts: float) -> None:
        if job.instance_id is not None:
            kind = job.kind
            last = self.ran.get(job.instance_id, (None, None))[1]
            self.ran[job.instance_id] = (last, kind)
            self.started[job.job_id] = (ts, last != kind)

    def _ended(self, event: ev.Event, job: Job, ts: float) -> None:
        run = self.started.pop(job.job_id, None)
        if run is not None and isinstance(event, ev.JobSucceeded):
            started_at, switched = run
            self.learner.observe(job.kind, ts - started_at, switched=switched)

    def costs(self) -> Costs:
        return self.learner.costs()

    def busy_for(self, instance_id: str, in_flight: Sequence[tuple[str, str]],
                 now: float) -> float:
        """Seconds ``instance_id`` is expected to stay busy with ``in_flight``, its jobs
        as (job_id, kind) in the order they were sent."""
        queue = [(kind, self.started.get(job_id, (None,))[0]) for job_id, kind in in_flight]
        before, last = self.ran.get(instance_id, (None, None))
        running = bool(queue) and queue[0][1] is not None
        return expected_busy(queue, now=now, before=before if running else last,
                             costs=self.costs())

    def snapshot(self) -> dict[str, Any]:
        # kinds are held as JobKind (a str, spared Enum's .value on replay), saved as str
        return {"sent": {i: str(kind) for i, kind in sorted(self.sent.items())},
                "ran": {i: [k and str(k) for k in kinds] for i, kinds in sorted(self.ran.items())},
                "started": {j: list(s) for j, s in sorted(self.started.items())},
                "learned": self.learner.snapshot()}

    def restore(self, saved: Mapping[str, Any]) -> None:
        self.sent = dict(saved["sent"])
        self.ran = {i: (before, last) for i, (before, last) in saved["ran"].items()}
        self.started = {j: (at, switched) for j, (at, switched) in saved["started"].items()}
        self.learner.restore(saved["learned"])
