"""Ready jobs to servers: the scheduler picks, each pick is recorded as a dispatch intent,
and its POST leaves only after the turn's commit (a deferred effect)."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import structlog

from instances.artifacts import ArtifactMissing, Handoff, Upload, resolve_inputs
from instances.workflow import Workflow
from service.agents import Agent, Defer
from service.tracking import record_failure
from statemachine import events as ev
from statemachine import failpoints
from statemachine.errors import ComfyDualError
from statemachine.job import Job
from statemachine.plan import JobKind
from statemachine.scheduler import Assignment, schedule
from statemachine.store import Store

log = structlog.get_logger("comfy_dual.loop")

HANDOVER_WAIT = 0.0005  # seconds a turn waits at most for HTTP threads to take its POSTs

_PROMPT_IDS = random.Random()  # seeded from the kernel's random source; its own, so that
# nobody's random.seed() makes ids repeat


def new_prompt_id() -> str:
    """A random UUID4 for a dispatch. ``uuid.uuid4`` reads the kernel's random source, a
    system call that lets go of the GIL, and the loop waited ~0.1 ms to get it back under
    load; an id needs to be unique, not unpredictable, so a generator seeded from that
    source when the daemon started does."""
    return str(uuid.UUID(int=_PROMPT_IDS.getrandbits(128), version=4))


def extra_data(job: Job) -> dict[str, Any]:
    """Stored by ComfyUI with the prompt: lets a person (and the simulator) see which job
    a queue entry is."""
    return {"comfy_dual": {"job_id": job.job_id, "kind": job.kind.value,
                           "model": job.kind.value}}


class Dispatcher:
    """Sends ready jobs to the instances the scheduler picks for them."""

    def __init__(self, settings: Any, store: Store, agents: Mapping[str, Agent],
                 workflows: Mapping[JobKind, Workflow], defer: Defer) -> None:
        self.settings = settings
        self.store = store
        self.agents = agents
        self.workflows = workflows
        self.defer = defer
        self._taken: list[threading.Event] = []  # set when this turn's POSTs are taken

    def dispatch(self, now: float) -> list[Assignment]:
        """Record a dispatch intent for every job the scheduler places now."""
        s, store = self.settings, self.store
        if not store.ready:
            return []
        picks = schedule(store.ready.values(), store.instance_views(s.instances, now=now),
                         now=now, fallback=s.fallback,
                         combine_concurrency=s.combine_concurrency,
                         combines_in_flight=store.combines_in_flight(),
                         costs=store.estimates.costs(), unfinished=store.coming_work(),
                         combines_coming=store.combines_coming())
        for pick in picks:
            if pick.stolen:
                log.info(f"🤝 Instance {pick.instance_id} is out of its own work and takes "
                         f"{pick.job_id}: its own instances would start it later than "
                         f"a model switch costs", job=pick.job_id)
            job = store.jobs[pick.job_id]
            if job.kind is JobKind.COMBINE:
                failpoints.hit("dispatch_combine")
            store.record(ev.JobDispatchIntent(job.job_id, pick.instance_id, new_prompt_id()),
                         now)
            self.post(job, now)
        return picks

    def post(self, job: Job, now: float) -> None:
        """Name the files the job reads as its server will know them, render its workflow,
        and once this turn is committed copy those files over (if they must be) and post
        it. A job whose workflow cannot be rendered, or whose input file was never
        reported, fails for good (no attempt could do better)."""
        try:
            resolved = resolve_inputs(job, (self.store.jobs[d] for d in job.spec.deps),
                                      self.workflows, target=str(job.instance_id),
                                      transfer=self.settings.artifact_transfer)
            graph = self.workflows[job.kind].render(resolved.params)
            handoffs = [self._handoff(upload) for upload in resolved.uploads]
        except ComfyDualError as exc:
            record_failure(self.store, job, f"cannot prepare the workflow: {exc}", now,
                           permanent=True)
            return
        self.defer(partial(self._submit, partial(
            self.agents[str(job.instance_id)].submit, job.job_id, str(job.prompt_id), graph,
            extra_data(job), handoffs)))

    def hand_over(self) -> None:
        """Wait, HANDOVER_WAIT at most, until HTTP threads have taken this turn's POSTs.

        They need the GIL, which the loop would otherwise keep through its next turn: a
        POST would start only at the loop's next system call (measured: 0.45 ms after the
        hand-over, p50, instead of 0.07 ms). One wait for the turn, not one per POST: the
        second POST is handed over before the first thread has built its request."""
        deadline = time.monotonic() + HANDOVER_WAIT
        for event in self._taken:
            event.wait(max(0.0, deadline - time.monotonic()))
        self._taken.clear()

    def _submit(self, submit: Callable[[], threading.Event | None]) -> None:
        taken = submit()
        if taken is not None:
            self._taken.append(taken)

    def _handoff(self, upload: Upload) -> Handoff:
        source = self.agents.get(upload.source)
        if source is None:
            raise ArtifactMissing(f"{upload.file.relative} is on {upload.source}, which is no "
                                  "longer configured")
        return Handoff(upload, partial(source.download, upload.file))

