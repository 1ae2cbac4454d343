"""Which ready job goes to which instance now: a pure function, no I/O, clock or randomness.

Rules, in the order they apply:

- FIFO by readiness (higher batch priority first), so jobs of different videos interleave
  and no ready job waits behind one that became ready after it; but see COMBINE chains.
- A job waits out its retry backoff (``eligible_at``).
- Type affinity: a job goes to an UP instance whose ``job_types`` hold its kind and that
  has a free slot: the one where it is expected to start first, model switches counted
  (see ``Costs``), then the one with the most free slots, then the first in configuration
  order. Without estimates (the default ``Costs``) that is the one with the most free slots.
- Fallback: only when every instance of that type is DOWN (not merely busy) and
  ``fallback`` is on, any UP instance with a free slot takes it.
- Stealing: then an UP instance with a free slot, no foreign job in flight (one outside
  its ``job_types``: stolen or fallback) and the job's kind in its ``steal_types`` takes a
  ready job that no instance of its type could take this turn, the oldest first, if both

  1. the job is expected to start there sooner than on an instance of its type, by more
     than half its run time, counting the model switches the steal costs the thief (into
     the job's model, and back to its own afterwards unless it had to switch back
     anyway): a smaller gain is not worth the risk that the thief's own work, becoming
     ready meanwhile, waits for the stolen job; and
  2. the instances of the job's type have more unfinished work each (``unfinished``
     jobs, ready or not, times their expected durations, shared by the UP instances of
     their type; COMBINE work by no more than ``combine_concurrency`` of them) than the
     thief's own kinds (COMBINE too) leave it, even after it took this job and paid
     those switches: stealing evens out the work left; it never moves work to the
     server that has more of its own.

  The thief's own kinds were placed first, so it steals only when none of them is
  waiting, and it holds one stolen job at a time: its own work never waits for more
  than one. Nothing is stolen without ``unfinished`` counts, nor before ``costs`` lists
  a duration for the job's kind and for the thief's own render kinds.
- Capacity: at most ``max_concurrent`` jobs in flight per instance.
- COMBINE jobs: at most ``combine_concurrency`` in flight in total.
- COMBINE chains, where more than one UP instance takes COMBINE jobs: a COMBINE goes
  before the renders of its priority, to an idle instance (nothing in flight, none of its
  render kinds ready) if there is one, and while it is in flight the instance it went to
  (``last_kind``) takes nothing more. A batch's COMBINE jobs are a chain of short jobs run
  one at a time: queued behind renders, each waits for one, and the chains of the last
  batches end the run long after the renders (bench/makespan.py's W1: 24.2 units, 23.5
  with this rule; 23 is the least possible). Held free, the instance runs the chain back
  to back while the others render. With a single such instance nothing renders meanwhile:
  the order stays FIFO and nothing is held (holding would only idle it between jobs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from statemachine.plan import JobKind


class ReadyJob(Protocol):
    """What the scheduler reads of a ready job (``statemachine.job.Job`` has it)."""

    @property
    def job_id(self) -> str: ...
    @property
    def kind(self) -> JobKind: ...
    @property
    def priority(self) -> int: ...
    ready_seq: int
    eligible_at: float


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One configured instance as the scheduler sees it this turn.

    ``last_kind`` is the kind of the last job sent to it (what its queue ends with; None if
    unknown), ``busy_for`` the seconds its jobs in flight are still expected to take
    (``statemachine.estimates``), ``foreign_in_flight`` how many of those are outside
    ``job_types``.
    """

    instance_id: str
    job_types: frozenset[str]
    max_concurrent: int
    up: bool
    in_flight: int
    steal_types: frozenset[str] = frozenset()
    last_kind: str | None = None
    busy_for: float = 0.0
    foreign_in_flight: int = 0


@dataclass(frozen=True, slots=True)
class Costs:
    """What jobs are expected to cost, in seconds: a run time per kind (``default_duration``
    for kinds not listed) and the extra time a server takes to run a job of another kind
    than its previous one (loading that model). The defaults know nothing: every estimate
    is zero, so the scheduler places by free slots and never steals."""

    durations: Mapping[str, float] = field(default_factory=dict)
    switch_cost: float = 0.0
    default_duration: float = 0.0

    def duration(self, kind: str) -> float:
        return self.durations.get(kind, self.default_duration)

    def switch(self, before: str | None, after: str) -> float:
        return 0.0 if before == after else self.switch_cost


@dataclass(frozen=True, slots=True)
class Assignment:
    job_id: str
    instance_id: str
    fallback: bool = False
    stolen: bool = False


def schedule(ready: Iterable[ReadyJob], instances: Sequence[InstanceView], *, now: float,
             fallback: bool, combine_concurrency: int, combines_in_flight: int,
             costs: Costs | None = None, unfinished: Mapping[str, int] | None = None
             ) -> list[Assignment]:
    """Assign ready jobs to instances for this turn.

    ``costs`` and ``unfinished`` are what stealing and the cost-aware choice of instance
    go by; without them jobs go to the instance with the most free slots and nothing is
    stolen. ``unfinished`` counts, per kind, the jobs not ended yet (waiting, ready or in
    flight) that are coming: render jobs of open batches, and COMBINE jobs of batches
    whose gate is open (a closed gate's COMBINE jobs are not work anyone can plan on).
    """
    if not any(i.up and i.in_flight < i.max_concurrent for i in instances):
        return []  # the usual case with a backlog: every server busy, nothing to sort
    chained = _chained(instances)
    if chained:  # whether an instance is idle depends on the kinds ready
        ready = [job for job in ready if job.eligible_at <= now]
    turn = _Turn(instances, costs or Costs(), unfinished or {}, combine_concurrency,
                 {job.kind for job in ready} if chained else set(), combines_in_flight,
                 chained=chained)
    combine_slots = combine_concurrency - combines_in_flight
    # JobKind is a StrEnum: a kind is its own name wherever a str is looked up
    targets = {kind: _targets(kind, instances, fallback) for kind in JobKind}
    may_steal = turn.has_thief()
    out: list[Assignment] = []
    waiting: list[ReadyJob] = []  # eligible, but no instance of their type is free
    for job in sorted(ready, key=_combines_first if chained else _fifo):
        if not turn.has_room():
            break
        kind = job.kind
        if job.eligible_at > now or (kind is JobKind.COMBINE and combine_slots <= 0):
            continue
        ids, via_fallback = targets[kind]
        best = turn.first_free(ids, kind)
        if best is None:
            if may_steal:
                waiting.append(job)
            continue
        turn.take(best, kind, foreign=via_fallback)
        combine_slots -= kind is JobKind.COMBINE
        out.append(Assignment(job.job_id, best, via_fallback))
    if waiting and turn.has_thief():
        out += _steals(waiting, turn, targets, combine_slots)
    return out


def _steals(waiting: Sequence[ReadyJob], turn: _Turn,
            targets: Mapping[JobKind, tuple[list[str], bool]],
            combine_slots: int) -> list[Assignment]:
    """Jobs worth moving to an instance that may steal them. Jobs not stolen queue up
    (in thought) on their own instances, so the later ones are expected to wait longer."""
    out: list[Assignment] = []
    for job in waiting:
        if not turn.has_thief():
            break
        kind = job.kind
        home_start = turn.expected_start(targets[kind][0], kind)
        thief = turn.best_thief(kind)
        blocked = kind is JobKind.COMBINE and combine_slots <= 0
        if thief is not None and not blocked and turn.worth_stealing(thief, kind, home_start):
            turn.take(thief, kind, foreign=True)
            combine_slots -= kind is JobKind.COMBINE
            out.append(Assignment(job.job_id, thief, stolen=True))
        else:
            turn.queue_up(targets[kind][0], kind)
    return out


def _fifo(job: ReadyJob) -> tuple[int, int]:
    return -job.priority, job.ready_seq


def _combines_first(job: ReadyJob) -> tuple[int, bool, int]:
    return -job.priority, job.kind is not JobKind.COMBINE, job.ready_seq


def _chained(instances: Sequence[InstanceView]) -> bool:
    """Whether COMBINE chains run back to back (module doc): more than one UP instance
    takes COMBINE jobs, so one can carry a chain while the others render."""
    return sum(1 for i in instances if i.up and JobKind.COMBINE.value in i.job_types) > 1


def _holds_chain(view: InstanceView, combines_in_flight: int) -> bool:
    """Its queue ends with a COMBINE not ended yet: the chain's next one must not wait
    behind a render."""
    return (combines_in_flight > 0 and view.in_flight > 0
            and view.last_kind == JobKind.COMBINE.value)


def _targets(kind: JobKind, instances: Sequence[InstanceView],
             fallback: bool) -> tuple[list[str], bool]:
    """The instances that may take ``kind`` now, and whether that is a fallback."""
    affine = [i.instance_id for i in instances if i.up and kind.value in i.job_types]
    if affine or not fallback:
        return affine, False
    return [i.instance_id for i in instances if i.up], True


def _home(job_types: frozenset[str]) -> frozenset[str]:
    """The models an instance is there for: the render kinds it takes (COMBINE is light
    work any server may do), or all of its kinds if it renders none."""
    renders = frozenset(k for k in job_types if JobKind(k).renders)
    return renders or job_types


def _work_left(costs: Costs, instances: Sequence[InstanceView],
               unfinished: Mapping[str, int], combine_concurrency: int) -> dict[str, float]:
    """Seconds of unfinished work of each kind per UP instance of that type that can work
    on it at once (inf if there is none): COMBINE work is spread over no more instances
    than ``combine_concurrency``."""
    left = {}
    for kind, count in unfinished.items():
        holders = sum(1 for i in instances if i.up and kind in i.job_types)
        if kind == JobKind.COMBINE.value:
            holders = min(holders, combine_concurrency)
        work = count * costs.duration(kind)
        left[kind] = work / holders if holders else (float("inf") if work else 0.0)
    return left


class _Turn:
    """The instances as this turn's assignments leave them: free slots, when each is
    expected to be free (``ready_at``, seconds from now), the kind its queue ends with,
    and (``idle``) which have nothing to do: nothing in flight, none of their render kinds
    among ``ready_kinds``."""

    def __init__(self, instances: Sequence[InstanceView], costs: Costs,
                 unfinished: Mapping[str, int], combine_concurrency: int,
                 ready_kinds: set[JobKind], combines_in_flight: int, *, chained: bool) -> None:
        self.costs = costs
        self._left = (instances, unfinished, combine_concurrency)  # worked out on demand
        self._work_left: dict[str, float] | None = None
        self.order = {i.instance_id: n for n, i in enumerate(instances)}
        self.chained = chained
        self.free = {i.instance_id: 0 if self.chained and _holds_chain(i, combines_in_flight)
                     else i.max_concurrent - i.in_flight for i in instances if i.up}
        self.idle = {i.instance_id for i in instances if i.up and i.in_flight == 0
                     and not any(k.renders and k in i.job_types for k in ready_kinds)}
        self.ready_at = {i.instance_id: i.busy_for for i in instances}
        self.tail = {i.instance_id: i.last_kind for i in instances}
        self.job_types = {i.instance_id: i.job_types for i in instances}
        self.home = {i.instance_id: _home(i.job_types) for i in instances}
        self.steal_types = {i.instance_id: i.steal_types for i in instances}
        self.foreign = {i.instance_id: i.foreign_in_flight for i in instances}

    def has_room(self) -> bool:
        return any(n > 0 for n in self.free.values())

    def has_thief(self) -> bool:
        return any(self._may_steal(i) for i in self.free)

    def _may_steal(self, instance_id: str) -> bool:
        return (self.free.get(instance_id, 0) > 0 and self.foreign[instance_id] == 0
                and bool(self.steal_types[instance_id]))

    def offer(self, instance_id: str, kind: str) -> float:
        """When ``kind`` would start there, plus the switch back to its own models that
        running it would add (zero if it has to switch back anyway)."""
        c = self.costs
        home = self.home[instance_id]
        tail = self.tail[instance_id]
        back = c.switch_cost * ((kind not in home) - (tail not in home))
        return self.ready_at[instance_id] + c.switch(tail, kind) + back

    def worth_stealing(self, thief: str, kind: str, home_start: float) -> bool:
        """Rules 1 and 2 of stealing (see the module docstring), judged only once the
        durations of ``kind`` and of the thief's own models are known."""
        known = self.costs.durations
        if kind not in known or not self.home[thief] <= known.keys():
            return False
        offer = self.offer(thief, kind)
        left = self.work_left()
        own = sum(left.get(k, 0.0) for k in self.job_types[thief])
        cost = offer - self.ready_at[thief]
        run = self.costs.duration(kind)
        return offer + run / 2 < home_start and own + cost + run < left.get(kind, 0.0)

    def work_left(self) -> dict[str, float]:
        if self._work_left is None:
            self._work_left = _work_left(self.costs, *self._left)
        return self._work_left

    def first_free(self, ids: Sequence[str], kind: str) -> str | None:
        """The instance with a free slot where ``kind`` costs least, most free slots next;
        a chained COMBINE takes an idle one if there is one."""
        free = [i for i in ids if self.free[i] > 0]
        if self.chained and kind == JobKind.COMBINE:
            free = [i for i in free if i in self.idle] or free
        if len(free) < 2:
            return free[0] if free else None
        return min(free, key=lambda i: (self.offer(i, kind), -self.free[i], self.order[i]))

    def best_thief(self, kind: str) -> str | None:
        thieves = [i for i in self.free if self._may_steal(i) and kind in self.steal_types[i]]
        return min(thieves, key=lambda i: (self.offer(i, kind), self.order[i]), default=None)

    def expected_start(self, ids: Sequence[str], kind: str) -> float:
        """When ``kind`` is expected to start on the earliest of ``ids`` (inf if none)."""
        return min((self._start(i, kind) for i in ids), default=float("inf"))

    def _start(self, instance_id: str, kind: str) -> float:
        return self.ready_at[instance_id] + self.costs.switch(self.tail[instance_id], kind)

    def take(self, instance_id: str, kind: str, *, foreign: bool) -> None:
        held = self.chained and kind == JobKind.COMBINE
        self.free[instance_id] = 0 if held else self.free[instance_id] - 1
        self.idle.discard(instance_id)
        self.foreign[instance_id] += foreign
        self._append(instance_id, kind)

    def queue_up(self, ids: Sequence[str], kind: str) -> None:
        """Count a job that waits for one of ``ids`` in the one it is expected to get."""
        if ids:
            self._append(min(ids, key=lambda i: (self._start(i, kind), self.order[i])), kind)

    def _append(self, instance_id: str, kind: str) -> None:
        self.ready_at[instance_id] = self._start(instance_id, kind) + self.costs.duration(kind)
        self.tail[instance_id] = kind
