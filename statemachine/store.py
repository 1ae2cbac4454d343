"""The one place state changes.

``Store.record(event, now)`` appends the event to the log, then applies it, then records
the events that follow from it by rule (``statemachine.rules``). ``Store.open(log)``
rebuilds exactly that state from a snapshot and the log. The caller commits (one fsync
per loop turn) with ``Store.commit()``.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import orjson

from statemachine import events as ev
from statemachine import failpoints
from statemachine.errors import CorruptLog, IllegalTransition
from statemachine.estimates import Estimates
from statemachine.job import (
    BATCH_FINAL,
    BATCH_MACHINE,
    BATCH_MOVES,
    IN_FLIGHT,
    JOB_FINAL,
    JOB_MACHINE,
    JOB_MOVES,
    Batch,
    BatchState,
    DoneSummary,
    Job,
    JobState,
    fire,
    replay_move,
)
from statemachine.log import Log
from statemachine.plan import BatchPlan, JobKind, upcast_v1
from statemachine.rules import Policy, follow_ups
from statemachine.scheduler import InstanceView, fifo_of, line_of

SNAPSHOT_VERSION = 3  # 2: plans in the form of event schema 2; 3: done batches summarised


Listener = Callable[[ev.Recorded, Any], None]

# batch event type -> trigger (job events: ``_JOB_EVENTS`` below); the other events move
# no state machine.
_BATCH_TRIGGERS: dict[type[ev.Event], str] = {
    ev.BatchStarted: "start", ev.BatchGateOpened: "open_gate", ev.BatchDone: "finish",
    ev.BatchFailed: "fail", ev.BatchCancelled: "cancel", ev.BatchRetried: "reset",
}


class Store:
    """All jobs, batches and instance health, as folded from the event log."""

    def __init__(self, log: Log, policy: Policy | None = None) -> None:
        self.log = log
        self.policy = policy or Policy()
        self.seq = 0
        self.batches: dict[str, Batch] = {}
        self.jobs: dict[str, Job] = {}
        self.ready: dict[str, Job] = {}  # insertion order is readiness order
        self.in_flight: dict[str, Job] = {}
        self.instance_up: dict[str, bool] = {}
        self.abandoned: dict[str, set[str]] = {}  # instance -> prompts it may still run
        self.by_sha256: dict[str, str] = {}
        self.combining: dict[str, Batch] = {}  # batches whose COMBINE gate is open
        self.unfinished: Counter[JobKind] = Counter()  # jobs not ended, by kind
        self.state_counts: Counter[JobState] = Counter()  # jobs in each state
        self.estimates = Estimates(self.policy.job_durations, self.policy.switch_cost)
        self.listeners: list[Listener] = []
        self.snapshot_seq = 0  # of the snapshot it opened from or last wrote (0: none)

    # --- recording -------------------------------------------------------------------

    def record(self, event: ev.Event, now: float) -> None:
        """Append and apply ``event``, then every event that follows from it by rule.

        Raises IllegalTransition (and records nothing) if the event is not allowed now.
        """
        rec = ev.Recorded(self.seq + 1, now, event)
        subject = self._apply(rec.seq, now, event, lambda: self.log.append(ev.encode(rec)))
        for listener in self.listeners:
            listener(rec, subject)
        for follow in follow_ups(self, event):
            self.record(follow, now)

    def commit(self) -> None:
        """Make everything recorded so far durable: one fsync (group commit)."""
        self.log.commit()

    def _apply(self, seq: int, ts: float, event: ev.Event,
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
        elif kind is ev.BatchAccepted:
            subject = self._accept(ts, event, append)
        else:
            subject = self._set_instance(event, append)
        self.seq = seq
        return subject

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
        self._reindex(job, old, seq, live=append is not None)
        if old in IN_FLIGHT and job.state not in IN_FLIGHT and job.state is not \
                JobState.SUCCEEDED and sent_to is not None:
            self.abandoned.setdefault(sent_to, set()).add(prompt_id)
        return job

    def _reindex(self, job: Job, old: JobState, seq: int, *, live: bool = False) -> None:
        """Keep the ready and in-flight indexes and the counters the rules use (a ready
        job's ``line`` and ``fifo`` only when ``live``: a replay sets them at its end)."""
        new = job.state
        self.state_counts[old] -= 1
        self.state_counts[new] += 1
        if old is JobState.READY:
            del self.ready[job.job_id]
        elif new is JobState.READY:
            job.ready_seq = seq
            if live:
                job.line, job.fifo = line_of(job), fifo_of(job)
            self.ready[job.job_id] = job
        if new in IN_FLIGHT:
            if old not in IN_FLIGHT:
                self.in_flight[job.job_id] = job
        elif old in IN_FLIGHT:
            del self.in_flight[job.job_id]
        if (old in JOB_FINAL) == (new in JOB_FINAL):
            return
        self.unfinished[job.kind] += -1 if new in JOB_FINAL else 1
        if new is JobState.SUCCEEDED:
            if job.kind.renders:
                job.batch.renders_left -= 1
            else:
                job.batch.combines_left -= 1

    # --- batches ---------------------------------------------------------------------

    def _accept(self, ts: float, event: ev.BatchAccepted,
                append: Callable[[], None] | None) -> Batch:
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
        self.batches[plan.batch_id] = batch
        self.by_sha256[plan.sha256] = plan.batch_id  # the latest batch of that file
        self.unfinished.update(job.kind for job in batch.jobs)
        self.state_counts[JobState.WAITING] += len(batch.jobs)
        return batch

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
        self._index_combining(batch)
        if batch.state is BatchState.DONE:
            self._summarise(batch)
        return batch

    def _summarise(self, batch: Batch) -> None:
        """A done batch is final: its jobs go, a summary stays (``Batch.summarise``). They
        still count as succeeded in ``state_counts``, as a user would count them."""
        for job in batch.summarise():
            del self.jobs[job.job_id]

    def _index_combining(self, batch: Batch) -> None:
        if batch.state is BatchState.COMBINING:
            self.combining[batch.batch_id] = batch
        else:
            self.combining.pop(batch.batch_id, None)

    # --- instances -------------------------------------------------------------------

    def _set_instance(self, event: Any, append: Callable[[], None] | None) -> str:
        if append is not None:
            append()
        if isinstance(event, ev.PromptsWithdrawn):
            left = self.abandoned.get(event.instance_id, set()) - set(event.prompt_ids)
            if left:
                self.abandoned[event.instance_id] = left
            else:
                self.abandoned.pop(event.instance_id, None)
        else:
            self.instance_up[event.instance_id] = isinstance(event, ev.InstanceUp)
        return event.instance_id

    # --- queries ---------------------------------------------------------------------

    def instance_views(self, instances: Iterable[Any], *, now: float) -> list[InstanceView]:
        """Scheduler input for configured instances (``instance_id``, ``job_types``,
        ``steal_types``, ``max_concurrent``), estimates included; an instance never
        reported UP counts as DOWN."""
        flying: dict[str, list[tuple[str, str]]] = {i.instance_id: [] for i in instances}
        for job in self.in_flight.values():
            if job.instance_id in flying:  # not an instance gone from the configuration
                flying[job.instance_id].append((job.job_id, job.kind.value))
        return [self._view(i, flying[i.instance_id], now) for i in instances]

    def _view(self, instance: Any, in_flight: Sequence[tuple[str, str]],
              now: float) -> InstanceView:
        instance_id = instance.instance_id
        job_types = frozenset(instance.job_types)
        # an instance that may still run prompts the daemon gave up on takes nothing new
        capacity = 0 if self.abandoned.get(instance_id) else instance.max_concurrent
        return InstanceView(
            instance_id, job_types, capacity,
            self.instance_up.get(instance_id, False), len(in_flight),
            steal_types=frozenset(instance.steal_types),
            last_kind=self.estimates.sent.get(instance_id),
            busy_for=self.estimates.busy_for(instance_id, in_flight, now),
            foreign_in_flight=sum(1 for _, kind in in_flight if kind not in job_types))

    @property
    def unfinished_renders(self) -> int:
        return sum(count for kind, count in self.unfinished.items() if kind.renders)

    def coming_work(self) -> dict[str, int]:
        """Jobs not ended per kind that someone can plan on: every render of an open
        batch, COMBINE jobs only behind an open gate (the scheduler's ``unfinished``)."""
        coming = {kind.value: n for kind, n in self.unfinished.items() if kind.renders and n}
        combines = sum(batch.combines_left for batch in self.combining.values())
        return coming | ({JobKind.COMBINE.value: combines} if combines else {})

    def combines_coming(self) -> bool:
        """Whether a COMBINE job is expected to become ready soon: a render of a batch
        with at most two renders left (its last chunk) is in flight. Reads only the jobs
        in flight."""
        return any(j.kind.renders and j.batch.renders_left <= 2
                   for j in self.in_flight.values())

    def combines_in_flight(self) -> int:
        return sum(1 for j in self.in_flight.values() if j.kind is JobKind.COMBINE)

    def open_batches(self) -> Iterable[Batch]:
        return (b for b in self.batches.values() if b.state not in BATCH_FINAL)

    # --- replay and snapshots --------------------------------------------------------

    @classmethod
    def open(cls, log: Log, policy: Policy | None = None) -> Store:
        """Rebuild the state from the snapshot (if any) and the log after it."""
        store = cls(log, policy)
        with _no_full_collections():
            snapshot = log.load_snapshot()
            if snapshot is not None:
                store._restore(orjson.loads(snapshot))
                store.snapshot_seq = store.seq
            store._replay(log.lines())
        store._line_up()
        return store

    def _line_up(self) -> None:
        """Set every ready job's ``line`` and ``fifo`` once the batches' counters are final
        (after a replay or a restore)."""
        for job in self.ready.values():
            job.line, job.fifo = line_of(job), fifo_of(job)

    def _replay(self, lines: Iterable[tuple[int, bytes]]) -> None:
        """Apply the lines after the snapshot. One loop, no call per line but the work:
        this runs a million times when a daemon restarts on a long log."""
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
                self._apply(seq, ts, event, None)
        except (CorruptLog, IllegalTransition) as exc:
            raise CorruptLog(f"{self.log.locate(line_no)}: {exc}") from None

    def compact(self) -> None:
        """Make a snapshot of the current state durable and start a new log segment
        (commits first): a restart replays only what follows."""
        self.log.compact(orjson.dumps(self.snapshot()), self.seq)
        self.snapshot_seq = self.seq

    def snapshot(self) -> dict[str, Any]:
        """The whole state as plain data; equal snapshots mean equal stores."""
        return {
            "version": SNAPSHOT_VERSION,
            "seq": self.seq,
            "instance_up": dict(sorted(self.instance_up.items())),
            "abandoned": {i: sorted(p) for i, p in sorted(self.abandoned.items())},
            "batches": [_batch_state(b) for b in self.batches.values()],
            "estimates": self.estimates.snapshot(),
        }

    def _restore(self, snap: dict[str, Any]) -> None:
        version = snap.get("version")
        if version not in (1, 2, SNAPSHOT_VERSION):
            raise CorruptLog(f"snapshot version {version!r} is not supported")
        for b in snap["batches"]:
            plan = upcast_v1(b["plan"]) if version == 1 else b["plan"]
            if "summary" in b:
                self._restore_summary(b, plan)
                continue
            batch = self._accept(b["accepted_at"],
                                 ev.BatchAccepted(BatchPlan.from_dict(plan)), None)
            batch.state, batch.reason = BatchState(b["state"]), b["reason"]
            batch.ended_at = b["ended_at"]
            self._index_combining(batch)
            for job, saved in zip(batch.jobs, b["jobs"], strict=True):
                _restore_job(job, saved)
                self._reindex(job, JobState.WAITING, job.ready_seq)
            if batch.state is BatchState.DONE:  # an older snapshot listed its jobs
                self._summarise(batch)
        self.ready = dict(sorted(self.ready.items(), key=lambda kv: kv[1].ready_seq))
        self._line_up()
        self.instance_up = dict(snap["instance_up"])
        self.abandoned = {i: set(p) for i, p in snap.get("abandoned", {}).items()}
        if "estimates" in snap:  # snapshots written before estimates were kept have none
            self.estimates.restore(snap["estimates"])
        self.seq = snap["seq"]

    def _restore_summary(self, saved: dict[str, Any], plan: dict[str, Any]) -> None:
        """A done batch from its summary: no jobs laid out, none made."""
        batch = Batch(BatchPlan.inputs_only(plan), saved["accepted_at"])
        batch.state, batch.reason = BatchState(saved["state"]), saved["reason"]
        batch.ended_at = saved["ended_at"]
        batch.summary = DoneSummary(**saved["summary"])
        self.batches[batch.batch_id] = batch
        self.by_sha256[batch.plan.sha256] = batch.batch_id
        self.state_counts[JobState.SUCCEEDED] += batch.summary.jobs


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

_JOB_SAVED = ("eligible_at", "ready_seq", "attempts", "instance_id", "prompt_id", "number",
              "error", "outputs")


def _batch_state(batch: Batch) -> dict[str, Any]:
    """A batch as plain data: with its jobs, or a done one with its summary instead."""
    state = {
        "plan": batch.plan.to_dict(), "state": batch.state.value, "reason": batch.reason,
        "accepted_at": batch.accepted_at, "ended_at": batch.ended_at,
    }
    if batch.summary is not None:
        return state | {"summary": batch.summary.to_dict()}
    return state | {"jobs": [{"state": j.state.value, **{k: getattr(j, k) for k in _JOB_SAVED}}
                             for j in batch.jobs]}


def _restore_job(job: Job, saved: dict[str, Any]) -> None:
    job.state = JobState(saved["state"])
    for key in _JOB_SAVED:
        setattr(job, key, saved[key])


def read_records(log: Log) -> Iterator[ev.Recorded]:
    """Every committed event the log keeps, decoded (for reports and timelines): with
    every segment kept (``LOG_RETENTION = 0``), the whole history."""
    for line_no, line in log.history():
        try:
            yield ev.decode(line)
        except CorruptLog as exc:
            raise CorruptLog(f"{log.locate(line_no)}: {exc}") from None
