"""The log lines that tell a person what each recorded event means."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import structlog

from statemachine import events as ev
from statemachine.store import Store

log = structlog.get_logger("comfy_dual.loop")


class Narrator:
    """Listens to the store. Its INFO lines wait until the turn's POSTs are handed over
    (``flush``): rendered before them, a job's two lines made ready-to-POST a tenth longer
    (p50 1.82 ms against 1.64 ms, four videos at once). Warnings and errors go at once."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._said: list[Callable[[], object]] = []
        store.listeners.append(self._narrate)

    def flush(self) -> None:
        said, self._said = self._said, []
        for line in said:
            line()

    def _say(self, message: str, **fields: Any) -> None:
        self._said.append(partial(log.info, message, **fields))

    def _narrate(self, rec: ev.Recorded, subject: Any) -> None:
        e = rec.event
        if isinstance(e, ev.JobDispatchIntent):
            job = self.store.jobs[e.job_id]
            self._say(f"🔄 Executing {job.kind.value} job {job.spec.chunk} on instance "
                      f"{e.instance_id}", job=e.job_id, video=job.batch.plan.name)
        elif isinstance(e, ev.JobSucceeded):
            self._say("✔️ job done", job=e.job_id, instance=subject.instance_id)
        elif isinstance(e, ev.JobAttemptFailed):
            log.warning("🔁 job failed, will retry", job=e.job_id, error=e.error,
                        retry_in_s=round(e.eligible_at - rec.ts, 1))
        elif isinstance(e, ev.JobFailed):
            log.error("❌ job failed", job=e.job_id, error=e.error)
        elif isinstance(e, ev.BatchGateOpened):
            self._say("🚪 COMBINE gate open", batch=e.batch_id)
        elif isinstance(e, ev.BatchDone):
            self._say("🏁 batch done", batch=e.batch_id, video=subject.plan.name)
        elif isinstance(e, (ev.BatchFailed, ev.BatchCancelled)):
            log.error(f"🏁 batch {subject.state.value}", batch=e.batch_id,
                      video=subject.plan.name, reason=subject.reason)
