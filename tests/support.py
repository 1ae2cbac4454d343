"""Helpers shared by the core tests: small plans and a driver that plays the daemon's part."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from statemachine import events as ev
from statemachine.log import LogFiles
from statemachine.plan import BatchPlan, JobKind
from statemachine.planner import PromptSpec, plan_batch
from statemachine.scheduler import fifo_of, line_of


@dataclass
class Ready:
    """A ready job as the scheduler reads it."""

    job_id: str
    kind: JobKind
    ready_seq: int
    priority: int = 0
    eligible_at: float = 0.0
    video: int = 0
    renders_left: int = 0

    @property
    def line(self) -> int:
        return line_of(self)

    @property
    def fifo(self) -> int:
        return fifo_of(self)


@dataclass(frozen=True)
class Inst:
    """A configured instance as ``Store.instance_views`` reads it."""

    instance_id: str
    job_types: frozenset[str]
    max_concurrent: int = 2
    steal_types: frozenset[str] = frozenset()


def make_plan(batch_id: str, frames: int = 303, chunk: int = 101, priority: int = 0
              ) -> BatchPlan:
    spec = PromptSpec(name=f"video {batch_id}", frames=frames, positive="a test",
                      priority=priority)
    sha = hashlib.sha256(f"{batch_id}:{frames}".encode()).hexdigest()
    return plan_batch(spec, batch_id=batch_id, sha256=sha, source=f"{batch_id}.txt",
                      frames_per_chunk=chunk, width=832, height=480)


def log_lines(state_dir: Path) -> list[bytes]:
    """Every line the event log in ``state_dir`` keeps: its closed segments (a snapshot
    closes one, at each clean stop too), then the live ``events.jsonl``."""
    files = LogFiles(state_dir, state_dir / "events.jsonl")
    return [line for _, line in files.history() if line.endswith(b"\n")]


def logged(state_dir: Path, type_: str) -> list[Any]:
    """The events of ``type_`` committed so far (of the class of that type); safe to call
    while a daemon writes the log (it only reads, and a line is read only once it is
    whole)."""
    tag = f'"{type_}"'.encode()
    found = (ev.decode(line).event for line in log_lines(state_dir) if tag in line)
    return [event for event in found if event.type == type_]


def planned_jobs(state_dir: Path, batch_id: str) -> list[str]:
    """The job ids the log's ``batch_accepted`` of ``batch_id`` lays out."""
    for line in log_lines(state_dir):
        if b'"batch_accepted"' in line:
            event = ev.decode(line).event
            if isinstance(event, ev.BatchAccepted) and event.plan.batch_id == batch_id:
                return [job.job_id for job in event.plan.jobs]
    raise KeyError(batch_id)


def dispatch(store, job_id: str, instance_id: str, now: float) -> str:
    prompt_id = str(uuid.uuid4())
    store.record(ev.JobDispatchIntent(job_id, instance_id, prompt_id), now)
    return prompt_id


def run_to_success(store, job_id: str, instance_id: str, now: float) -> None:
    prompt_id = dispatch(store, job_id, instance_id, now)
    store.record(ev.JobQueued(job_id, prompt_id, 1), now)
    store.record(ev.JobStarted(job_id, prompt_id), now)
    store.record(ev.JobSucceeded(job_id, prompt_id, {"9": {"images": []}}), now)


def wait_for(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """The first truthy result of ``check``, polled; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
