"""What the servers say about the jobs sent to them, turned into job events: accepted,
started, progress, finished, and the answers to "do you still have this prompt?" asked
after every (re)connection (reconciliation)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import structlog

from instances.artifacts import unwritten_artifacts
from instances.client import JobOutcome
from instances.messages import Checked, Finished, Posted, PostFailed, Progress, Started
from instances.workflow import Workflow
from service.agents import Agent, Defer
from statemachine import events as ev
from statemachine.errors import InstanceTrouble, PermanentDispatchError
from statemachine.job import Job, JobState
from statemachine.plan import JobKind
from statemachine.rules import failure_event
from statemachine.store import Store

log = structlog.get_logger("comfy_dual.loop")

JOB_ENDINGS = (ev.JobSucceeded, ev.JobAttemptFailed, ev.JobFailed, ev.JobLost,
               ev.JobCancelled)


def record_failure(store: Store, job: Job, error: str, now: float, *, permanent: bool
                   ) -> None:
    """The job's attempt failed: it waits for a retry, or fails for good."""
    store.record(failure_event(job, error, permanent=permanent, now=now,
                               policy=store.policy), now)


class Tracker:
    """Follows every job in flight by its prompt_id. ``repost`` posts a job again under
    the same prompt_id; ``instance_down`` marks an instance DOWN (a POST it refused with
    a problem of its own)."""

    def __init__(self, store: Store, agents: Mapping[str, Agent],
                 workflows: Mapping[JobKind, Workflow], defer: Defer, *,
                 repost: Callable[[Job, float], None],
                 instance_down: Callable[[str, str, float], None]) -> None:
        self.store = store
        self.agents = agents
        self.workflows = workflows
        self.defer = defer
        self.repost = repost
        self.instance_down = instance_down
        self.progress: dict[str, tuple[str, int, int]] = {}  # job -> (node, value, max)
        self.checking: set[str] = set()  # prompts asked about after a (re)connection
        store.listeners.append(self._forget_progress)

    def flying(self, prompt_id: str) -> Job | None:
        return next((j for j in self.store.in_flight.values() if j.prompt_id == prompt_id),
                    None)

    def reconcile(self, instance_id: str) -> None:
        """Ask an instance that is (back) up about every job it was given."""
        for job in list(self.store.in_flight.values()):
            if job.instance_id == instance_id:
                self.checking.add(job.flying_prompt_id)
                self.defer(partial(self.agents[instance_id].check, job.job_id,
                                   job.flying_prompt_id))

    def on_posted(self, m: Posted, now: float) -> None:
        job = self.flying(m.prompt_id)
        if job is not None and job.state is JobState.DISPATCHING:
            self.store.record(ev.JobQueued(job.job_id, m.prompt_id, m.number), now)

    def on_post_failed(self, m: PostFailed, now: float) -> None:
        job = self.flying(m.prompt_id)
        if job is None:
            return
        if isinstance(m.error, InstanceTrouble):
            # The server is unreachable or failing (HTTP 5xx): its trouble, not the job's.
            # The POST may or may not have arrived: ask again once the server is back.
            log.warning("⚠️ could not post to instance", job=job.job_id,
                        instance=m.instance_id, error=str(m.error))
            self.instance_down(m.instance_id, str(m.error), now)
            return
        record_failure(self.store, job, str(m.error), now,
                       permanent=isinstance(m.error, PermanentDispatchError))

    def on_started(self, m: Started, now: float) -> None:
        job = self.flying(m.prompt_id)
        if job is not None and job.state in (JobState.DISPATCHING, JobState.QUEUED):
            self.store.record(ev.JobStarted(job.job_id, m.prompt_id), now)

    def on_progress(self, m: Progress, now: float) -> None:
        job = self.flying(m.prompt_id)
        if job is not None:
            self.progress[job.job_id] = (m.node, m.value, m.max)

    def on_finished(self, m: Finished, now: float) -> None:
        job = self.flying(m.prompt_id)
        if job is not None:
            self._outcome(job, m.outcome, now)

    def on_checked(self, m: Checked, now: float) -> None:
        self.checking.discard(m.prompt_id)
        job = self.flying(m.prompt_id)
        if job is None:
            return
        if m.where == "history":
            self._outcome(job, m.outcome, now)
        elif m.where in ("queue", "running"):
            if job.state is JobState.DISPATCHING:
                self.store.record(ev.JobQueued(job.job_id, m.prompt_id, None), now)
            if m.where == "running":
                self.on_started(Started(m.instance_id, m.prompt_id), now)
            log.info("🔗 re-attached to job", job=job.job_id, instance=m.instance_id)
        elif job.state is JobState.DISPATCHING:
            log.info("📤 posting again under the same prompt_id (it never arrived)",
                     job=job.job_id, instance=m.instance_id, prompt_id=m.prompt_id)
            self.repost(job, now)
        else:
            self.store.record(ev.JobLost(job.job_id, m.prompt_id,
                                         "the server no longer knows it (restarted?)"), now)
            log.warning("♻️ instance forgot a job it had accepted; it will run again",
                        job=job.job_id, instance=m.instance_id)

    def _outcome(self, job: Job, outcome: JobOutcome | None, now: float) -> None:
        """A success must have written every file its workflow produces: ComfyUI runs the
        outputs of a partly invalid graph that are valid, and calls that a success."""
        if outcome is None or outcome.status != "success":
            error = ("answered without an outcome" if outcome is None
                     else outcome.error or f"ended {outcome.status} on the server")
            record_failure(self.store, job, error, now, permanent=False)
        elif unwritten := unwritten_artifacts(self.workflows[job.kind], outcome.outputs):
            record_failure(self.store, job, f"finished without writing {', '.join(unwritten)}"
                           ": the server ran only part of the graph (see 'prompt accepted "
                           "with invalid outputs' in the log)", now, permanent=True)
        else:
            self.store.record(ev.JobSucceeded(job.job_id, job.flying_prompt_id, outcome.outputs),
                              now)

    def _forget_progress(self, rec: ev.Recorded, subject: Any) -> None:
        if isinstance(rec.event, JOB_ENDINGS):
            self.progress.pop(rec.event.job_id, None)
