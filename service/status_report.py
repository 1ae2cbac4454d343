"""The daemon's status, published as it works: ``status.json`` (for ``submit.py status``)
and the status page, with each instance's busy share since start."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from service.status import BatchViews, BusyMeter, status_view, write_status_file
from service.tracking import JOB_ENDINGS
from statemachine import events as ev
from statemachine.job import Batch, Job
from statemachine.store import Store

log = structlog.get_logger("comfy_dual.loop")

STATUS_EVERY = 0.5  # seconds between status.json rewrites

Publish = Callable[[Mapping[str, Any], float], None]


class StatusReport:
    """``path`` None: no status.json (the view still goes to ``on_status``)."""

    def __init__(self, settings: Any, store: Store, *, start: float, outputs_dir: Path,
                 path: Path | None = None, daemon_info: Mapping[str, Any] | None = None
                 ) -> None:
        self.settings = settings
        self.store = store
        self.path = path
        self.daemon_info = daemon_info
        self.busy = BusyMeter(start)
        self.batch_views = BatchViews(outputs_dir)
        self.on_status: list[Publish] = []  # the status page
        self._written = float("-inf")
        self._error: str | None = None  # why status.json could not be written
        store.listeners.append(self._observe)

    def publish(self, now: float, *, progress: Mapping[str, tuple[str, int, int]],
                log_error: str | None, force: bool = False) -> None:
        """Rewrite ``status.json`` (at most every STATUS_EVERY seconds unless forced). Best
        effort: it is a view of the log, so a disk that refuses it is reported once and
        the next rewrite tries again."""
        if (self.path is None and not self.on_status) or (
                not force and now - self._written < STATUS_EVERY):
            return
        self._written = now
        view = status_view(self.store, self.settings.instances, now=now, progress=progress,
                           busy=self.busy.shares(now), daemon=self.daemon_info,
                           batches=self.batch_views)
        view["event_log_error"] = log_error
        for publish in self.on_status:  # the status page: even when the disk refuses
            publish(view, now)
        if self.path is None:
            return
        try:
            write_status_file(self.path, view)
        except OSError as exc:
            if self._error is None:
                log.warning("⚠️ cannot write status.json; trying again later",
                            error=str(exc))
            self._error = str(exc)
            return
        if self._error is not None:
            log.info("✅ status.json written again")
            self._error = None

    def _observe(self, rec: ev.Recorded, subject: Any) -> None:
        if isinstance(subject, Job | Batch):
            self.batch_views.touch(subject.batch_id if isinstance(subject, Batch)
                                   else subject.batch.batch_id)
        e = rec.event
        if isinstance(e, ev.JobStarted):
            self.busy.job_started(e.job_id, subject.instance_id, rec.ts)
        elif isinstance(e, JOB_ENDINGS):
            self.busy.job_ended(e.job_id, rec.ts)
