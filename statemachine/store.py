"""The one place state changes.

``Store.record(event, now)`` appends the event to the log, then applies it
(``statemachine.fold``), then records the events that follow from it by rule
(``statemachine.rules``); listeners hear of each event once it is applied. ``Store.open(log)``
rebuilds exactly that state from a snapshot (``statemachine.snapshot``) and the log. The
caller commits (one fsync per loop turn) with ``Store.commit()``.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import orjson

from statemachine import events as ev
from statemachine.errors import CorruptLog
from statemachine.estimates import Estimates
from statemachine.fold import Fold
from statemachine.job import BATCH_FINAL, Batch, Job, JobState
from statemachine.log import Log
from statemachine.rules import Policy, follow_ups
from statemachine.scheduler import InstanceView
from statemachine.snapshot import restore, snapshot_of

Listener = Callable[[ev.Recorded, Any], None]


class Store:
    """The state folded from the event log, and the only way to change it: ``record``."""

    def __init__(self, log: Log, policy: Policy | None = None) -> None:
        self.log = log
        self.policy = policy or Policy()
        self.fold = Fold(Estimates(self.policy.job_durations, self.policy.switch_cost))
        self.listeners: list[Listener] = []
        self.snapshot_seq = 0  # of the snapshot it opened from or last wrote (0: none)

    # --- recording -------------------------------------------------------------------

    def record(self, event: ev.Event, now: float) -> None:
        """Append and apply ``event``, then every event that follows from it by rule.

        Raises IllegalTransition (and records nothing) if the event is not allowed now.
        """
        rec = ev.Recorded(self.fold.seq + 1, now, event)
        subject = self.fold.apply(rec.seq, now, event, lambda: self.log.append(ev.encode(rec)))
        for listener in self.listeners:
            listener(rec, subject)
        for follow in follow_ups(self, event):
            self.record(follow, now)

    def commit(self) -> None:
        """Make everything recorded so far durable: one fsync (group commit)."""
        self.log.commit()

    # --- replay and snapshots --------------------------------------------------------

    @classmethod
    def open(cls, log: Log, policy: Policy | None = None) -> Store:
        """Rebuild the state from the snapshot (if any) and the log after it."""
        store = cls(log, policy)
        with _no_full_collections():
            snapshot = log.load_snapshot()
            if snapshot is not None:
                restore(store.fold, orjson.loads(snapshot))
                store.snapshot_seq = store.seq
            store.fold.replay(log.lines(), log.locate)
        return store

    def compact(self) -> None:
        """Make a snapshot of the current state durable and start a new log segment
        (commits first): a restart replays only what follows."""
        self.log.compact(orjson.dumps(self.snapshot()), self.seq)
        self.snapshot_seq = self.seq

    def snapshot(self) -> dict[str, Any]:
        """The whole state as plain data; equal snapshots mean equal stores."""
        return snapshot_of(self.fold)

    # --- what the rules, the loop and the reports read --------------------------------

    @property
    def seq(self) -> int:
        return self.fold.seq

    @property
    def jobs(self) -> dict[str, Job]:
        return self.fold.jobs

    @property
    def batches(self) -> dict[str, Batch]:
        return self.fold.batches

    @property
    def by_sha256(self) -> dict[str, str]:
        """The latest batch of each file, by the file's hash."""
        return self.fold.by_sha256

    @property
    def estimates(self) -> Estimates:
        return self.fold.estimates

    @property
    def ready(self) -> dict[str, Job]:
        """The ready jobs, in the order they became ready."""
        return self.fold.indexes.ready

    @property
    def in_flight(self) -> dict[str, Job]:
        return self.fold.indexes.in_flight

    @property
    def state_counts(self) -> Counter[JobState]:
        """Jobs in each state (a done batch's jobs count as succeeded)."""
        return self.fold.indexes.state_counts

    @property
    def unfinished_renders(self) -> int:
        return self.fold.indexes.unfinished_renders

    def coming_work(self) -> dict[str, int]:
        return self.fold.indexes.coming_work()

    def combines_coming(self) -> bool:
        return self.fold.indexes.combines_coming()

    def combines_in_flight(self) -> int:
        return self.fold.indexes.combines_in_flight()

    def open_batches(self) -> Iterable[Batch]:
        return (b for b in self.batches.values() if b.state not in BATCH_FINAL)

    @property
    def instance_up(self) -> dict[str, bool]:
        return self.fold.health.up

    @property
    def abandoned(self) -> dict[str, set[str]]:
        """Instance -> the prompts it may still run after the daemon gave up on them."""
        return self.fold.health.abandoned

    def instance_views(self, instances: Iterable[Any], *, now: float) -> list[InstanceView]:
        """Scheduler input for configured instances (``InstanceHealth.views``)."""
        return self.fold.health.views(instances, self.in_flight.values(), self.estimates, now)


@contextmanager
def _no_full_collections() -> Iterator[None]:
    """Replay makes millions of objects that all stay alive. Python's full collection
    walks the whole heap each time it has grown by a quarter, so replay would walk it
    again and again for garbage that is not there (measured: a quarter of the time to
    replay 1M events). Young collections still run: short-lived cycles are freed and the
    survivors reach the oldest generation in small steps. The next full collection walks
    the new heap once, as it would have anyway."""
    thresholds = gc.get_threshold()
    gc.set_threshold(thresholds[0], thresholds[1], 2**30)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


def read_records(log: Log) -> Iterator[ev.Recorded]:
    """Every committed event the log keeps, decoded (for reports and timelines): with
    every segment kept (``LOG_RETENTION = 0``), the whole history."""
    for line_no, line in log.history():
        try:
            yield ev.decode(line)
        except CorruptLog as exc:
            raise CorruptLog(f"{log.locate(line_no)}: {exc}") from None
