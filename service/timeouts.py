"""Jobs a server sits on: a render running longer than JOB_TIMEOUT fails its attempt (and
is withdrawn: interrupted); a job queued longer than QUEUE_TIMEOUT goes back to ready
without using an attempt (and is withdrawn). A server can hang without saying so."""

from __future__ import annotations

from typing import Any

from service.tracking import JOB_ENDINGS, record_failure
from statemachine import events as ev
from statemachine.job import JobState
from statemachine.store import Store


class Timeouts:
    """When each job in flight was queued or started (jobs found in flight after a
    restart: from ``start``), kept from the events as they are recorded."""

    def __init__(self, settings: Any, store: Store, start: float) -> None:
        self.settings = settings
        self.store = store
        self.running_since = {j.job_id: start for j in store.in_flight.values()
                              if j.state is JobState.RUNNING}
        self.queued_since = {j.job_id: start for j in store.in_flight.values()
                             if j.state is JobState.QUEUED}
        store.listeners.append(self._observe)

    def expire(self, now: float) -> None:
        s = self.settings
        for job_id, since in list(self.running_since.items()):
            job = self.store.jobs[job_id]
            if now - since >= s.job_timeout and job.state is JobState.RUNNING:
                record_failure(self.store, job, f"ran longer than JOB_TIMEOUT "
                               f"({s.job_timeout:g} s); interrupted", now, permanent=False)
        for job_id, since in list(self.queued_since.items()):
            job = self.store.jobs[job_id]
            if now - since >= s.queue_timeout and job.state is JobState.QUEUED:
                self.store.record(ev.JobLost(
                    job.job_id, job.flying_prompt_id, f"queued on {job.instance_id} longer than "
                    f"QUEUE_TIMEOUT ({s.queue_timeout:g} s)"), now)

    def _observe(self, rec: ev.Recorded, subject: Any) -> None:
        e = rec.event
        if isinstance(e, ev.JobQueued):
            self.queued_since[e.job_id] = rec.ts
        elif isinstance(e, ev.JobStarted):
            self.queued_since.pop(e.job_id, None)
            self.running_since[e.job_id] = rec.ts
        elif isinstance(e, JOB_ENDINGS):
            self.queued_since.pop(e.job_id, None)
            self.running_since.pop(e.job_id, None)
