"""The daemon's Prometheus metrics (``/metrics``), kept with ``prometheus_client``.

Three sources, none of which the web thread touches itself:

- a store listener on the loop thread counts the events recorded (by type), retries,
  lost jobs and model switches, observes job run times, and keeps the job and batch
  tallies by state;
- ``MeteredLog`` wraps the event log: lines made durable, and how long each group commit's
  durable write took;
- the gauges (jobs by kind and state, batches, instances, queue depth, rejected files,
  events since the last snapshot) are read from the last ``Gauges`` the loop published.

The registry is this daemon's own (not prometheus_client's global one), so several
daemons in one process (the tests) do not mix.
"""

from __future__ import annotations

import re
import time
from collections import Counter as Tally
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from statemachine import events as ev
from statemachine.job import Batch, BatchState, Job, JobState
from statemachine.log import Log
from statemachine.plan import JobKind, job_id
from statemachine.store import Store

RUN_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
WRITE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                 1.0)
disable_created_metrics()  # no *_created series: they only tell when the daemon started
_SNAPSHOT_SEQ = re.compile(rb'"seq"\s*:\s*(\d+)')

# What a rejection's reason says -> its class (the ``reason`` label); the first match wins.
REASON_CLASSES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern)) for name, pattern in (
        ("duplicate", r"^same content as batch"),
        ("empty", r"^file is empty"),
        ("too_large", r"larger than the limit"),
        ("not_utf8", r"not UTF-8"),
        ("not_a_file", r"^a (directory|symbolic link)|not a regular file"),
        ("bad_name", r"^the video name|file name"),
        ("over_limit", r"\blimit\b|MAX_\w+|has \d+ digits|out of range"),
        ("unparsable", r"block|TOML|unknown key|expected|not a positive integer|prompt"),
    ))


def reason_class(reason: str) -> str:
    """The class of a rejection reason (``duplicate``, ``over_limit``, ...; ``other``)."""
    return next((name for name, pattern in REASON_CLASSES if pattern.search(reason)), "other")


def snapshot_seq(snapshot: bytes | None) -> int:
    """The ``seq`` a snapshot holds the log up to (0: no snapshot). A snapshot starts with
    its version and seq, so only its head is searched."""
    if not snapshot:
        return 0
    found = _SNAPSHOT_SEQ.search(snapshot, 0, 200)
    return int(found.group(1)) if found else 0


def events_since_last_snapshot(store: Store, last_snapshot_seq: int) -> int:
    """Events recorded after the last snapshot: what a restart must replay line by line.
    The daemon takes one every SNAPSHOT_EVERY events (``MeteredLog.snapshot_seq``)."""
    return store.seq - last_snapshot_seq


class MeteredLog:
    """A ``statemachine.log.Log`` that reports to ``Metrics``: the lines each commit makes
    durable, how long the durable write took, and the seq of the last snapshot. Anything
    else (``close``, ``path``, ...) goes to the wrapped log."""

    def __init__(self, log: Log, metrics: Metrics) -> None:
        self._log = log
        self._metrics = metrics
        self._pending = 0
        self.snapshot_seq = 0

    def lines(self) -> Iterator[tuple[int, bytes]]:
        return self._log.lines()

    def history(self) -> Iterator[tuple[int, bytes]]:
        return self._log.history()

    def locate(self, line_no: int) -> str:
        return self._log.locate(line_no)

    def append(self, line: bytes) -> None:
        self._pending += 1
        self._log.append(line)

    def commit(self) -> None:
        if not self._pending:
            self._log.commit()
            return
        began = time.perf_counter()
        self._log.commit()  # raises, with the lines still pending, if it cannot write
        self._metrics.durable(self._pending, time.perf_counter() - began)
        self._pending = 0

    def compact(self, snapshot: bytes, seq: int) -> None:
        self.commit()
        self._log.compact(snapshot, seq)
        self.snapshot_seq = seq

    def load_snapshot(self) -> bytes | None:
        snapshot = self._log.load_snapshot()
        self.snapshot_seq = snapshot_seq(snapshot)
        return snapshot

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)


@dataclass(frozen=True, slots=True)
class Gauges:
    """The numbers behind the gauges, taken on the loop thread at one moment."""

    jobs: Mapping[tuple[str, str], int]  # (kind, state) -> jobs
    batches: Mapping[str, int]  # state -> batches
    instances: Mapping[str, tuple[bool | None, int]]  # id -> (up, jobs in flight)
    busy_seconds: Mapping[str, float]  # id -> seconds running a job since the start
    ready: Mapping[str, int]  # kind -> jobs ready and waiting for a server
    rejected: Mapping[str, int]  # reason class -> files in spool/rejected/
    events_since_snapshot: int
    seq: int


@dataclass(slots=True)
class _Tallies:
    """Jobs by (kind, state) and batches by state, kept per event instead of counted over
    every job at each publish (100,000 jobs took ~10 ms to count)."""

    jobs: Tally[tuple[str, str]] = field(default_factory=Tally)
    batches: Tally[str] = field(default_factory=Tally)
    job_state: dict[str, tuple[str, str]] = field(default_factory=dict)
    batch_state: dict[str, str] = field(default_factory=dict)

    def job(self, job: Job) -> None:
        now = (job.kind, job.state)  # StrEnums: equal to, and hashed as, their values
        before = self.job_state.get(job.job_id)
        if before != now:
            if before is not None:
                self.jobs[before] -= 1
            self.jobs[now] += 1
            self.job_state[job.job_id] = now

    def done(self, batch: Batch) -> None:
        """A done batch as the store keeps it (no jobs): each chunk's jobs succeeded."""
        chunks = batch.job_count // len(JobKind)
        for kind in JobKind:
            self.jobs[(kind, JobState.SUCCEEDED)] += chunks

    def forget_jobs(self, batch: Batch) -> None:
        """The store dropped a done batch's jobs: keep counting them, stop tracking them."""
        for k in range(1, batch.job_count // len(JobKind) + 1):
            for kind in JobKind:
                self.job_state.pop(job_id(batch.batch_id, kind, k), None)

    def batch(self, batch: Batch) -> None:
        before = self.batch_state.get(batch.batch_id)
        if before != batch.state:
            if before is not None:
                self.batches[before] -= 1
            self.batches[batch.state] += 1
            self.batch_state[batch.batch_id] = batch.state


class Metrics:
    """Every metric of one daemon, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter("comfy_dual_events", "Events recorded by this daemon, by type",
                              ["type"], registry=r)
        self.appends = Counter("comfy_dual_event_log_appends",
                               "Event-log lines made durable by this daemon", registry=r)
        self.write_seconds = Histogram(
            "comfy_dual_event_log_fsync_seconds",
            "Durable write of one group commit (the O_DSYNC write that fsync's role is in)",
            buckets=WRITE_BUCKETS, registry=r)
        self.run_seconds = Histogram(
            "comfy_dual_job_run_seconds", "Run time of succeeded jobs, from start to success",
            ["kind", "instance"], buckets=RUN_BUCKETS, registry=r)
        self.switches = Counter("comfy_dual_model_switches",
                                "Jobs that started on a server whose previous job was of "
                                "another kind (a model switch)", ["instance"], registry=r)
        self.retries = Counter("comfy_dual_job_retries",
                               "Failed attempts that will be retried", ["kind"], registry=r)
        self.lost = Counter("comfy_dual_jobs_lost",
                            "Jobs a server lost or that moved off an unreachable server",
                            ["kind"], registry=r)
        self.gauges: Gauges | None = None
        r.register(_GaugeCollector(self))
        self._tallies = _Tallies()
        self._started: dict[str, float] = {}  # job -> when it started running
        self._by_type: dict[str, Any] = {}  # event type -> its child of ``events``
        self._store: Store | None = None

    def metered(self, log: Log) -> MeteredLog:
        return MeteredLog(log, self)

    def durable(self, lines: int, seconds: float) -> None:
        self.appends.inc(lines)
        self.write_seconds.observe(seconds)

    def text(self) -> bytes:
        """The exposition, for ``/metrics`` (any thread)."""
        return generate_latest(self.registry)

    # --- the loop thread -------------------------------------------------------------

    def watch(self, store: Store) -> None:
        """Take the store's state as it is, then follow every event it records."""
        self._store = store
        for batch in store.batches.values():
            self._tallies.batch(batch)
            for job in batch.jobs:
                self._tallies.job(job)
            if batch.summary is not None:
                self._tallies.done(batch)
        self._started = {j: at for j, (at, _) in store.estimates.started.items()}
        store.listeners.append(self.on_event)

    def on_event(self, rec: ev.Recorded, subject: Any) -> None:
        e = rec.event
        counter = self._by_type.get(e.type)
        if counter is None:  # labels() costs a lookup under a lock: once per type
            counter = self._by_type[e.type] = self.events.labels(e.type)
        counter.inc()
        if isinstance(subject, Job):
            self._tallies.job(subject)
            self._job_event(e, subject, rec.ts)
        elif isinstance(subject, Batch):
            self._tallies.batch(subject)
            if isinstance(e, ev.BatchAccepted):
                for job in subject.jobs:
                    self._tallies.job(job)
            elif isinstance(e, ev.BatchDone):
                self._tallies.forget_jobs(subject)

    def _job_event(self, e: ev.Event, job: Job, ts: float) -> None:
        kind = job.kind.value
        if isinstance(e, ev.JobStarted):
            self._started[job.job_id] = ts
            if self._switched(job):
                self.switches.labels(str(job.instance_id)).inc()
            return
        started = self._started.pop(job.job_id, None)
        if isinstance(e, ev.JobSucceeded) and started is not None:
            self.run_seconds.labels(kind, str(job.instance_id)).observe(max(0.0, ts - started))
        elif isinstance(e, ev.JobAttemptFailed):
            self.retries.labels(kind).inc()
        elif isinstance(e, ev.JobLost):
            self.lost.labels(kind).inc()

    def _switched(self, job: Job) -> bool:
        """The store's estimates know the kind of the job that ran there before this one."""
        assert self._store is not None
        before, _ = self._store.estimates.ran.get(str(job.instance_id), (None, None))
        return before is not None and before != job.kind

    def gauges_of(self, store: Store, instances: Mapping[str, int], *,
                  busy_seconds: Mapping[str, float], rejected: Mapping[str, int],
                  last_snapshot_seq: int) -> Gauges:
        """The gauges now (loop thread); ``instances`` maps each configured id to its
        jobs in flight."""
        ready = Tally(job.kind.value for job in store.ready.values())
        return Gauges(
            jobs=dict(self._tallies.jobs), batches=dict(self._tallies.batches),
            instances={i: (store.instance_up.get(i), n) for i, n in instances.items()},
            busy_seconds=dict(busy_seconds), ready=dict(ready), rejected=dict(rejected),
            events_since_snapshot=events_since_last_snapshot(store, last_snapshot_seq),
            seq=store.seq)


class _GaugeCollector(Collector):
    """The gauges of the last ``Gauges`` published (nothing before the first)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        g = self._metrics.gauges
        if g is None:
            return
        jobs = GaugeMetricFamily("comfy_dual_jobs", "Jobs by kind and state",
                                 labels=["kind", "state"])
        for kind in JobKind:
            for job_state in JobState:
                jobs.add_metric([kind.value, job_state.value],
                                g.jobs.get((kind.value, job_state.value), 0))
        yield jobs
        batches = GaugeMetricFamily("comfy_dual_batches", "Batches by state", labels=["state"])
        for batch_state in BatchState:
            batches.add_metric([batch_state.value], g.batches.get(batch_state.value, 0))
        yield batches
        yield from self._instances(g)
        ready = GaugeMetricFamily("comfy_dual_jobs_ready",
                                  "Queue depth: jobs ready and waiting for a server",
                                  labels=["kind"])
        for kind in JobKind:
            ready.add_metric([kind.value], g.ready.get(kind.value, 0))
        yield ready
        rejected = GaugeMetricFamily("comfy_dual_rejected_files",
                                     "Prompt files in spool/rejected/, by reason class",
                                     labels=["reason"])
        for reason, count in sorted(g.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield GaugeMetricFamily("comfy_dual_events_since_snapshot",
                                "Events recorded since the last snapshot (replayed line by "
                                "line at a restart)", value=g.events_since_snapshot)
        yield GaugeMetricFamily("comfy_dual_event_log_seq", "Sequence number of the last "
                                "event recorded", value=g.seq)

    @staticmethod
    def _instances(g: Gauges) -> Iterator[Metric]:
        up = GaugeMetricFamily("comfy_dual_instance_up",
                               "1 if the server answers its health probes, 0 if it is DOWN "
                               "or not heard from yet", labels=["instance"])
        flying = GaugeMetricFamily("comfy_dual_jobs_in_flight",
                                   "Jobs posted to the server and not ended",
                                   labels=["instance"])
        busy = CounterMetricFamily("comfy_dual_instance_busy_seconds",
                                   "Seconds the server spent running at least one job since "
                                   "the daemon started", labels=["instance"])
        for instance_id, (is_up, in_flight) in g.instances.items():
            up.add_metric([instance_id], 1 if is_up else 0)
            flying.add_metric([instance_id], in_flight)
            busy.add_metric([instance_id], g.busy_seconds.get(instance_id, 0.0))
        return iter((up, flying, busy))
