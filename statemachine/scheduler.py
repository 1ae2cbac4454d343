"""Which ready job goes to which instance now: a pure function, no I/O, clock or randomness.

Rules, in the order they apply:

- FIFO by readiness (higher batch priority first), so jobs of different videos interleave
  and no ready job waits behind one that became ready after it.
- A job waits out its retry backoff (``eligible_at``).
- Type affinity: a job goes to an UP instance whose ``job_types`` hold its kind, the one
  with the most free slots (first in configuration order on a tie).
- Fallback: only when every instance of that type is DOWN (not merely busy) and
  ``fallback`` is on, any UP instance with a free slot takes it.
- Capacity: at most ``max_concurrent`` jobs in flight per instance.
- COMBINE jobs: at most ``combine_concurrency`` in flight in total.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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
    instance_id: str
    job_types: frozenset[str]
    max_concurrent: int
    up: bool
    in_flight: int


@dataclass(frozen=True, slots=True)
class Assignment:
    job_id: str
    instance_id: str
    fallback: bool = False


def schedule(ready: Iterable[ReadyJob], instances: Sequence[InstanceView], *, now: float,
             fallback: bool, combine_concurrency: int, combines_in_flight: int
             ) -> list[Assignment]:
    """Assign ready jobs to instances for this turn."""
    free = {i.instance_id: i.max_concurrent - i.in_flight for i in instances if i.up}
    if not any(n > 0 for n in free.values()):
        return []  # the usual case with a backlog: every server busy, nothing to sort
    combine_slots = combine_concurrency - combines_in_flight
    targets = {kind: _targets(kind, instances, fallback) for kind in JobKind}
    out: list[Assignment] = []
    for job in sorted(ready, key=_fifo):
        if not any(n > 0 for n in free.values()):
            break
        if job.eligible_at > now or (job.kind is JobKind.COMBINE and combine_slots <= 0):
            continue
        ids, via_fallback = targets[job.kind]
        best = max(ids, key=lambda i: free[i], default=None)
        if best is None or free[best] <= 0:
            continue
        free[best] -= 1
        combine_slots -= job.kind is JobKind.COMBINE
        out.append(Assignment(job.job_id, best, via_fallback))
    return out


def _fifo(job: ReadyJob) -> tuple[int, int]:
    return -job.priority, job.ready_seq


def _targets(kind: JobKind, instances: Sequence[InstanceView],
             fallback: bool) -> tuple[list[str], bool]:
    """The instances that may take ``kind`` now, and whether that is a fallback."""
    affine = [i.instance_id for i in instances if i.up and kind.value in i.job_types]
    if affine or not fallback:
        return affine, False
    return [i.instance_id for i in instances if i.up], True
