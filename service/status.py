"""The status view: what ``submit.py status`` shows, as plain JSON-ready data.

The daemon writes it to ``STATE_DIR/status.json`` (atomically) as it works; when the
daemon is down, ``submit.py`` builds the same view by replaying the event log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from instances.artifacts import final_files, local_path
from statemachine.durable import write_atomic
from statemachine.job import JobState
from statemachine.store import Store

STATUS_VERSION = 1


class BatchViews:
    """Each batch's status entry, rebuilt only after an event touched that batch: with
    thousands of batches in the log, rebuilding them all on every status write took the
    loop 146 ms (measured with 10,000 batches)."""

    def __init__(self, outputs_dir: Path | None = None) -> None:
        self.outputs_dir = outputs_dir
        self._views: dict[str, dict[str, Any]] = {}
        self._stale: set[str] = set()

    def touch(self, batch_id: str) -> None:
        self._stale.add(batch_id)

    def all(self, store: Store) -> list[dict[str, Any]]:
        for batch_id in self._stale | (store.batches.keys() - self._views.keys()):
            self._views[batch_id] = _batch(store.batches[batch_id], self.outputs_dir)
        self._stale.clear()
        return [self._views[b] for b in store.batches]


def status_view(store: Store, instances: Sequence[Any], *, now: float,
                progress: Mapping[str, tuple[str, int, int]] | None = None,
                busy: Mapping[str, float] | None = None,
                daemon: Mapping[str, Any] | None = None,
                batches: BatchViews | None = None) -> dict[str, Any]:
    """Batches (oldest first), jobs in flight with their progress, instances, counts.

    ``daemon`` is None when the view comes from a replay with no daemon running. With
    ``batches.outputs_dir``, a done batch lists where its finished video is saved locally.
    """
    progress = progress or {}
    busy = busy or {}
    return {
        "version": STATUS_VERSION,
        "updated_at": now,
        "daemon": dict(daemon) if daemon is not None else None,
        "batches": (batches or BatchViews()).all(store),
        "running": [_job(j, progress.get(j.job_id)) for j in store.in_flight.values()],
        "instances": [_instance(store, i, busy.get(i.instance_id)) for i in instances],
        "counts": {s.value: store.state_counts[s] for s in JobState},
    }


def _batch(batch: Any, outputs_dir: Path | None) -> dict[str, Any]:
    plan = batch.plan
    final = batch.final_outputs  # the last COMBINE's: the whole video
    done = batch.job_count if batch.summary is not None else sum(
        1 for j in batch.jobs if j.state is JobState.SUCCEEDED)
    return {
        "batch_id": batch.batch_id, "name": plan.name, "source": plan.source,
        "state": batch.state.value, "reason": batch.reason,
        "done": done, "total": batch.job_count, "accepted_at": batch.accepted_at,
        "ended_at": batch.ended_at, "priority": plan.priority,
        "failed_jobs": [{"job_id": j.job_id, "error": j.error} for j in batch.jobs
                        if j.state is JobState.FAILED],
        "final_outputs": final,
        "saved_outputs": [str(local_path(outputs_dir, batch.batch_id, f))
                          for f in final_files(final)] if outputs_dir else [],
    }


def _job(job: Any, progress: tuple[str, int, int] | None) -> dict[str, Any]:
    node, value, maximum = progress if progress else (None, 0, 0)
    return {"job_id": job.job_id, "batch_id": job.batch.batch_id, "kind": job.kind.value,
            "chunk": job.spec.chunk, "state": job.state.value,
            "instance_id": job.instance_id, "prompt_id": job.prompt_id,
            "attempt": job.attempts + 1,
            "progress": {"node": node, "value": value, "max": maximum} if progress else None}


def _instance(store: Store, inst: Any, busy: float | None) -> dict[str, Any]:
    flying = [j for j in store.in_flight.values() if j.instance_id == inst.instance_id]
    return {"instance_id": inst.instance_id, "url": inst.url,
            "job_types": sorted(inst.job_types), "max_concurrent": inst.max_concurrent,
            "up": store.instance_up.get(inst.instance_id), "in_flight": len(flying),
            "busy_share": busy}


def write_status_file(path: Path, view: Mapping[str, Any]) -> None:
    """Replace ``status.json`` atomically. No fsync: it is a view, rebuilt from the log.

    On a full disk the second copy that an atomic replace needs may not fit: then the
    file is rewritten in place, in the blocks it frees (a reader may catch it half
    written, and then replays the log instead)."""
    data = orjson.dumps(view)
    try:
        write_atomic(path, data, fsync=False)
    except OSError:  # write_atomic removed its tmp file
        with open(path, "r+b") as f:
            f.truncate(0)
            f.write(data)


class BusyMeter:
    """How much of the time since ``start`` each instance spent running at least one job."""

    def __init__(self, start: float) -> None:
        self.start = start
        self._running: dict[str, str] = {}  # job -> instance
        self._since: dict[str, float] = {}  # instance -> busy since
        self._total: dict[str, float] = {}

    def job_started(self, job_id: str, instance_id: str, now: float) -> None:
        if instance_id not in self._running.values():
            self._since[instance_id] = now
        self._running[job_id] = instance_id

    def job_ended(self, job_id: str, now: float) -> None:
        instance_id = self._running.pop(job_id, None)
        if instance_id is not None and instance_id not in self._running.values():
            since = self._since.pop(instance_id)
            self._total[instance_id] = self._total.get(instance_id, 0.0) + now - since

    def seconds(self, now: float) -> dict[str, float]:
        """Seconds each instance has been busy since ``start``."""
        busy = dict(self._total)
        for instance_id, since in self._since.items():
            busy[instance_id] = busy.get(instance_id, 0.0) + now - since
        return busy

    def shares(self, now: float) -> dict[str, float]:
        span = max(now - self.start, 1e-9)
        return {i: round(t / span, 4) for i, t in self.seconds(now).items()}
