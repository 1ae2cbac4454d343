"""Which ready job goes to which instance now: a pure function, no I/O, clock or randomness.

Rules, in the order they apply:

- FIFO by readiness (higher batch priority first), so jobs of different videos interleave
  and no ready job waits behind one that became ready after it; but where COMBINE chains
  run (below), by the video's place in line instead: the order its batch was accepted in
  (``video``) moved forward by one for every render it has left (``video -
  renders_left``), then by readiness. Videos still interleave (a video has one render
  ready at a time), but the earlier ones end first, so their COMBINE chains run while the
  others render instead of piling up at the end, and a long video is not left to render
  alone after the others (bench/makespan.py's W5, forty videos on eight servers, without
  latency: 55.4 units by readiness, 53.6 by video order alone, 48.8 so; W1 to W4 as
  before but W3, 0.9% longer). With one server for everything, readiness keeps jobs of one
  kind together: taken video by video, it would switch models at every job.
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
     their type; COMBINE work by no more than ``combine_concurrency`` of them; without
     the render a video has left of one kind more than of the other, which only waits
     its turn in the video's chain: ``statemachine.indexes.lead_of``) than the
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
- COMBINE standby, where more than two UP instances take COMBINE jobs: while a COMBINE is
  ready or coming (``combines_coming``: a batch's last renders are in flight), an
  instance that takes COMBINE jobs queues no render behind another one. Its second slot
  is kept for a COMBINE, which then waits only for the render that ends first among all
  those instances, not for a queued one too; its GPU idles for the daemon's reaction
  time between renders meanwhile. With two such instances it gains nothing (W1 without
  latency would end at 23.2, not 23).

Cost: a decision filters the ready jobs once, puts in order only those of kinds some
instance has room for (by ``line`` or ``fifo``, ints the store keeps per job), and stops
reading them once every such kind is placed or full: bench/core.py times it over 10,000
ready jobs with 8 and with 64 instances.
"""

from __future__ import annotations

import heapq
import operator
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
    @property
    def video(self) -> int: ...
    @property
    def renders_left(self) -> int: ...
    @property
    def ready_seq(self) -> int: ...
    @property
    def eligible_at(self) -> float: ...
    @property
    def line(self) -> int: ...  # ``line_of(job)``, set by the store when the job became ready
    @property
    def fifo(self) -> int: ...  # ``fifo_of(job)``, the same


_PLACE = 1 << 31  # a video's place in line, shifted to be >= 0 (fewer than 2**31 videos)


def line_of(job: ReadyJob) -> int:
    """Priority (higher first), then the video's place in line (``video - renders_left``),
    then readiness (``ready_seq``), packed in one int: ordering a backlog of ten thousand
    jobs then takes one C-level comparison per pair, and no Python call per job. It does
    not change while a job is ready: a video's renders are one chain, so no other render
    of its batch ends meanwhile."""
    place = job.video - job.renders_left + _PLACE
    return (((-job.priority << 32) + place) << 64) + job.ready_seq


def fifo_of(job: ReadyJob) -> int:
    """Priority (higher first), then readiness, packed in one int like ``line_of``."""
    return (-job.priority << 64) + job.ready_seq


_LINE = operator.attrgetter("line")
_FIFO = operator.attrgetter("fifo")


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
             costs: Costs | None = None, unfinished: Mapping[str, int] | None = None,
             combines_coming: bool = False) -> list[Assignment]:
    """Assign ready jobs to instances for this turn.

    ``costs`` and ``unfinished`` are what stealing and the cost-aware choice of instance
    go by; without them jobs go to the instance with the most free slots and nothing is
    stolen. ``unfinished`` counts, per kind, the jobs not ended yet (waiting, ready or in
    flight) that are coming: render jobs of open batches (less the videos' leads), and
    COMBINE jobs of batches whose gate is open (a closed gate's COMBINE jobs are not work
    anyone can plan on).
    ``combines_coming`` says that a COMBINE job is expected to become ready soon (a batch's
    last renders are in flight): see the standby rule in the module docstring.
    """
    if not any(i.up and i.in_flight < i.max_concurrent for i in instances):
        return []  # the usual case with a backlog: every server busy, nothing to sort
    chained = _chained(instances)
    ready = [job for job in ready if job.eligible_at <= now]
    kinds = {job.kind for job in ready}
    standby = (chained and (combines_coming or JobKind.COMBINE in kinds)
               and _standby_pays(instances))
    turn = _Turn(instances, costs or Costs(), unfinished or {}, combine_concurrency,
                 kinds if chained else set(), combines_in_flight, chained=chained,
                 standby=standby)
    combine_slots = combine_concurrency - combines_in_flight
    # JobKind is a StrEnum: a kind is its own name wherever a str is looked up
    targets = {kind: _targets(kind, instances, fallback) for kind in kinds}
    may_steal = turn.has_thief()
    # Only the jobs of a kind some instance has room for (or may steal) can be taken:
    # the others are not even put in order.
    wanted = {kind for kind in kinds if may_steal or turn.first_free(targets[kind][0], kind)}
    if JobKind.COMBINE in wanted and combine_slots <= 0:
        wanted.discard(JobKind.COMBINE)
    if not wanted:
        return []
    line = _in_line([j for j in ready if j.kind in wanted] if wanted != kinds else ready,
                    chained=chained)
    full: set[JobKind] = set()  # kinds no instance has room for any more this turn
    out: list[Assignment] = []
    waiting: list[ReadyJob] = []  # eligible, but no instance of their type is free
    for job in line:
        if not turn.has_room():
            break
        kind = job.kind
        if kind is JobKind.COMBINE and combine_slots <= 0:
            full.add(kind)  # no COMBINE may start any more this turn
        elif kind not in full:
            ids, via_fallback = targets[kind]
            best = turn.first_free(ids, kind)
            if best is not None:
                turn.take(best, kind, foreign=via_fallback)
                combine_slots -= kind is JobKind.COMBINE
                out.append(Assignment(job.job_id, best, via_fallback))
                continue
            full.add(kind)  # room only shrinks within a turn
            if may_steal:
                waiting.append(job)
        elif may_steal:
            waiting.append(job)
        if not may_steal and full >= wanted:
            break
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


def _in_line(jobs: Sequence[ReadyJob], *, chained: bool) -> Iterable[ReadyJob]:
    """``jobs`` in the order they are taken: where COMBINE chains run, by ``line`` with a
    COMBINE before the renders of its priority (merged lazily: only the head of the line
    is ever read); elsewhere by ``fifo``."""
    if not chained:
        return sorted(jobs, key=_FIFO)
    combines = sorted((j for j in jobs if j.kind is JobKind.COMBINE), key=_LINE)
    if not combines:
        return sorted(jobs, key=_LINE)
    renders = sorted((j for j in jobs if j.kind is not JobKind.COMBINE), key=_LINE)
    return heapq.merge(combines, renders, key=_priority)  # ties: COMBINE, the first


def _priority(job: ReadyJob) -> int:
    return job.line >> 96


def _chained(instances: Sequence[InstanceView]) -> bool:
    """Whether COMBINE chains run back to back (module doc): more than one UP instance
    takes COMBINE jobs, so one can carry a chain while the others render."""
    return sum(1 for i in instances if i.up and JobKind.COMBINE.value in i.job_types) > 1


def _standby_pays(instances: Sequence[InstanceView]) -> bool:
    """Standby (module doc) where more than two UP instances take COMBINE jobs."""
    return sum(1 for i in instances if i.up and JobKind.COMBINE.value in i.job_types) > 2


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
                 ready_kinds: set[JobKind], combines_in_flight: int, *, chained: bool,
                 standby: bool = False) -> None:
        self.costs = costs
        self._left = (instances, unfinished, combine_concurrency)  # worked out on demand
        self._work_left: dict[str, float] | None = None
        self.order = {i.instance_id: n for n, i in enumerate(instances)}
        self.chained = chained
        self.free = {i.instance_id: 0 if self.chained and _holds_chain(i, combines_in_flight)
                     else i.max_concurrent - i.in_flight for i in instances if i.up}
        self.open = sum(1 for n in self.free.values() if n > 0)  # instances with room
        self.idle = {i.instance_id for i in instances if i.up and i.in_flight == 0
                     and not any(k.renders and k in i.job_types for k in ready_kinds)}
        self.ready_at = {i.instance_id: i.busy_for for i in instances}
        self.tail = {i.instance_id: i.last_kind for i in instances}
        self.job_types = {i.instance_id: i.job_types for i in instances}
        self.home = {i.instance_id: _home(i.job_types) for i in instances}
        self.steal_types = {i.instance_id: i.steal_types for i in instances}
        self.foreign = {i.instance_id: i.foreign_in_flight for i in instances}
        # standby: an instance that takes COMBINE queues no render behind another one
        self.queued = {i.instance_id: i.in_flight for i in instances
                       if standby and JobKind.COMBINE.value in i.job_types}

    def has_room(self) -> bool:
        return self.open > 0

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
        free = [i for i in ids if self._fits(i, kind)]
        if self.chained and kind == JobKind.COMBINE:
            free = [i for i in free if i in self.idle] or free
        if len(free) < 2:
            return free[0] if free else None
        return min(free, key=lambda i: (self.offer(i, kind), -self.free[i], self.order[i]))

    def _fits(self, instance_id: str, kind: str) -> bool:
        """A free slot for ``kind``; on standby, a render only into an empty queue."""
        return self.free[instance_id] > 0 and (
            kind == JobKind.COMBINE or self.queued.get(instance_id, 0) == 0)

    def best_thief(self, kind: str) -> str | None:
        thieves = [i for i in self.free if self._may_steal(i) and kind in self.steal_types[i]
                   and self._fits(i, kind)]
        return min(thieves, key=lambda i: (self.offer(i, kind), self.order[i]), default=None)

    def expected_start(self, ids: Sequence[str], kind: str) -> float:
        """When ``kind`` is expected to start on the earliest of ``ids`` (inf if none)."""
        return min((self._start(i, kind) for i in ids), default=float("inf"))

    def _start(self, instance_id: str, kind: str) -> float:
        return self.ready_at[instance_id] + self.costs.switch(self.tail[instance_id], kind)

    def take(self, instance_id: str, kind: str, *, foreign: bool) -> None:
        held = self.chained and kind == JobKind.COMBINE
        had = self.free[instance_id]
        self.free[instance_id] = 0 if held else had - 1
        self.open -= had > 0 and self.free[instance_id] <= 0
        self.idle.discard(instance_id)
        self.foreign[instance_id] += foreign
        if instance_id in self.queued:
            self.queued[instance_id] += 1
        self._append(instance_id, kind)

    def queue_up(self, ids: Sequence[str], kind: str) -> None:
        """Count a job that waits for one of ``ids`` in the one it is expected to get."""
        if ids:
            self._append(min(ids, key=lambda i: (self._start(i, kind), self.order[i])), kind)

    def _append(self, instance_id: str, kind: str) -> None:
        self.ready_at[instance_id] = self._start(instance_id, kind) + self.costs.duration(kind)
        self.tail[instance_id] = kind

