"""Job and Batch models and the one table of legal moves for each.

Jobs and batches are plain slotted objects that only carry ``.state``; one unbound
``transitions.Machine`` per kind checks and applies moves (binding a machine to each of
100,000 jobs would cost 0.6-4.6 GB). Live moves go through the machine, with its guards
and a write-ahead hook; replay applies recorded moves through ``MOVES``, a lookup table
compiled from the same machine, because a recorded move was already checked when it was
made and replay must be fast (the machine costs ~6 us a move, the table ~0.1 us).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import Enum, StrEnum
from typing import Any, Protocol, TypeVar, cast

from transitions import EventData, Machine, MachineError, Transition

from statemachine.errors import IllegalTransition
from statemachine.plan import BatchPlan, JobKind, JobSpec

logging.getLogger("transitions").setLevel(logging.WARNING)


class JobState(StrEnum):
    WAITING = "waiting"
    READY = "ready"
    DISPATCHING = "dispatching"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


IN_FLIGHT = frozenset({JobState.DISPATCHING, JobState.QUEUED, JobState.RUNNING})
JOB_FINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class BatchState(StrEnum):
    ACCEPTED = "accepted"
    RENDERING = "rendering"
    COMBINING = "combining"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


BATCH_FINAL = frozenset({BatchState.DONE, BatchState.FAILED, BatchState.CANCELLED})


class Job:
    """One job's live state. The immutable part (kind, deps, params) is its ``spec``."""

    __slots__ = ("attempts", "batch", "dependants", "eligible_at", "error", "fifo",
                 "instance_id", "job_id", "kind", "line", "number", "outputs", "prompt_id",
                 "ready_seq", "spec", "state")

    def __init__(self, spec: JobSpec, batch: Batch) -> None:
        self.spec = spec
        self.job_id = spec.job_id  # copies of the spec's, read on every move
        self.kind = spec.kind
        self.batch = batch
        self.state = JobState.WAITING
        self.dependants: list[Job] = []
        self.eligible_at = 0.0
        self.ready_seq = 0
        self.line = self.fifo = 0  # its place in the scheduler's orders, set when ready
        self.attempts = 0
        self.instance_id: str | None = None
        self.prompt_id: str | None = None
        self.number: int | None = None
        self.error: str | None = None
        self.outputs: dict[str, Any] | None = None

    @property
    def flying_prompt_id(self) -> str:
        """Its ``prompt_id`` while it is in flight, when it always has one."""
        assert self.prompt_id is not None, f"{self!r} is not in flight"
        return self.prompt_id

    @property
    def priority(self) -> int:
        return self.batch.plan.priority

    @property
    def video(self) -> int:
        """Where its batch came in: 0 for the first batch accepted, 1 for the next, ..."""
        return self.batch.number

    @property
    def renders_left(self) -> int:
        """Its batch's HIGH and LOW jobs not succeeded yet."""
        return self.batch.renders_left

    def __repr__(self) -> str:
        return f"<Job {self.job_id} {self.state.value}>"


@dataclass(frozen=True, slots=True)
class DoneSummary:
    """What is kept of a batch once it is done: done is final (only failed and cancelled
    batches run again), so its jobs are dropped and these stand for them."""

    jobs: int  # how many jobs it had, every one succeeded
    final_outputs: dict[str, Any] | None  # what the last COMBINE wrote: the whole video
    final_instance: str | None  # the server that wrote it

    def to_dict(self) -> dict[str, Any]:
        return {"jobs": self.jobs, "final_outputs": self.final_outputs,
                "final_instance": self.final_instance}


class Batch:
    """One video's live state: its plan, its jobs and counters the rules need often.

    A done batch keeps no jobs: ``summary`` stands for them and its plan is laid out no
    more (``plan.jobs`` is empty), so a long history costs neither memory nor restart
    time."""

    __slots__ = (
        "accepted_at",
        "combines_left",
        "ended_at",
        "jobs",
        "number",
        "plan",
        "reason",
        "renders_left",
        "state",
        "summary",
        "unended",
    )

    def __init__(self, plan: BatchPlan, accepted_at: float, number: int = 0) -> None:
        self.plan = plan
        self.number = number  # the order it was accepted in
        self.state = BatchState.ACCEPTED
        self.accepted_at = accepted_at
        self.ended_at: float | None = None
        self.reason: str | None = None
        self.jobs: list[Job] = []
        self.renders_left = sum(1 for j in plan.jobs if j.kind.renders)
        self.combines_left = len(plan.jobs) - self.renders_left
        # its render jobs not ended (succeeded, failed or cancelled), by kind
        self.unended: dict[JobKind, int] = dict(Counter(j.kind for j in plan.jobs
                                                        if j.kind.renders))
        self.summary: DoneSummary | None = None

    @property
    def batch_id(self) -> str:
        return self.plan.batch_id

    @property
    def job_count(self) -> int:
        return self.summary.jobs if self.summary is not None else len(self.jobs)

    @property
    def final_outputs(self) -> dict[str, Any] | None:
        """What the last COMBINE job wrote (the whole video), if it ran."""
        if self.summary is not None:
            return self.summary.final_outputs
        return self.jobs[-1].outputs if self.jobs else None

    @property
    def final_instance(self) -> str | None:
        if self.summary is not None:
            return self.summary.final_instance
        return self.jobs[-1].instance_id if self.jobs else None

    def summarise(self) -> list[Job]:
        """Keep a done batch as its summary; returns the jobs it dropped."""
        jobs, last = self.jobs, self.jobs[-1]
        self.summary = DoneSummary(len(jobs), last.outputs, last.instance_id)
        self.jobs = []
        self.plan = replace(self.plan, jobs=())
        self.unended = {}
        return jobs

    def __repr__(self) -> str:
        return f"<Batch {self.batch_id} {self.state.value}>"


# --- guards: called by the machine with the EventData of a live move ------------------


def deps_met(job: Job, jobs: Mapping[str, Job]) -> bool:
    """Every dependency succeeded; a COMBINE job also needs its batch's gate open."""
    if job.kind is JobKind.COMBINE and job.batch.state is not BatchState.COMBINING:
        return False
    return all(jobs[d].state is JobState.SUCCEEDED for d in job.spec.deps)


# transitions types a machine's model as ``object``: JOB_MACHINE only ever moves a Job and
# BATCH_MACHINE a Batch.
def _job(ev: EventData) -> Job:
    return cast(Job, ev.model)


def _batch(ev: EventData) -> Batch:
    return cast(Batch, ev.model)


def _deps_met(ev: EventData) -> bool:
    return deps_met(_job(ev), ev.kwargs["jobs"])


def _eligible(ev: EventData) -> bool:
    """The retry backoff is over and the batch is still live."""
    job = _job(ev)
    return job.eligible_at <= ev.kwargs["now"] and job.batch.state not in BATCH_FINAL


def _renders_done(ev: EventData) -> bool:
    return _batch(ev).renders_left == 0


def _combines_done(ev: EventData) -> bool:
    return _batch(ev).combines_left == 0


def _write_ahead(ev: EventData) -> None:
    """Runs after the guards pass and before the state changes: append the event to the
    log. If the append raises, the move is aborted and the state stays as it was."""
    ev.kwargs["write_ahead"]()


S, B = JobState, BatchState
_FLYING = [S.DISPATCHING, S.QUEUED, S.RUNNING]

JOB_TRANSITIONS: list[dict[str, Any]] = [
    {"trigger": "promote", "source": S.WAITING, "dest": S.READY, "conditions": _deps_met},
    {"trigger": "dispatch", "source": S.READY, "dest": S.DISPATCHING, "conditions": _eligible},
    {"trigger": "accept", "source": S.DISPATCHING, "dest": S.QUEUED},
    {"trigger": "start", "source": [S.DISPATCHING, S.QUEUED], "dest": S.RUNNING},
    {"trigger": "succeed", "source": _FLYING, "dest": S.SUCCEEDED},
    {"trigger": "retry_later", "source": _FLYING, "dest": S.READY},
    {"trigger": "lose", "source": _FLYING, "dest": S.READY},
    {"trigger": "fail", "source": _FLYING, "dest": S.FAILED},
    {"trigger": "cancel", "source": [S.WAITING, S.READY, *_FLYING], "dest": S.CANCELLED},
    {"trigger": "reset", "source": [S.FAILED, S.CANCELLED], "dest": S.WAITING},
]

BATCH_TRANSITIONS: list[dict[str, Any]] = [
    {"trigger": "start", "source": B.ACCEPTED, "dest": B.RENDERING},
    {"trigger": "open_gate", "source": [B.ACCEPTED, B.RENDERING], "dest": B.COMBINING,
     "conditions": _renders_done},
    {"trigger": "finish", "source": B.COMBINING, "dest": B.DONE, "conditions": _combines_done},
    {"trigger": "fail", "source": [B.ACCEPTED, B.RENDERING, B.COMBINING], "dest": B.FAILED},
    {"trigger": "cancel", "source": [B.ACCEPTED, B.RENDERING, B.COMBINING],
     "dest": B.CANCELLED},
    {"trigger": "reset", "source": [B.FAILED, B.CANCELLED], "dest": B.ACCEPTED},
]


def _machine(states: type[Enum], transitions: list[dict[str, Any]]) -> Machine:
    return Machine(model=None, states=list(states), transitions=transitions,
                   initial=next(iter(states)), auto_transitions=False, send_event=True,
                   before_state_change=_write_ahead)


JOB_MACHINE = _machine(JobState, JOB_TRANSITIONS)
BATCH_MACHINE = _machine(BatchState, BATCH_TRANSITIONS)


_S = TypeVar("_S", bound=Enum)


def _dest(transitions: list[Transition]) -> str:
    dest = transitions[0].dest
    if dest is None:  # an internal transition: none is declared above
        raise ValueError("a move without a destination")
    return dest


def _compile(machine: Machine, states: type[_S]) -> dict[str, dict[_S, _S]]:
    """``{trigger: {source: dest}}`` read from the machine itself, so there is one table."""
    return {name: {states[src]: states[_dest(ts)] for src, ts in event.transitions.items()}
            for name, event in machine.events.items()}


JOB_MOVES = _compile(JOB_MACHINE, JobState)
BATCH_MOVES = _compile(BATCH_MACHINE, BatchState)


def fire(machine: Machine, model: Job | Batch, trigger: str,
         write_ahead: Callable[[], None], **context: Any) -> None:
    """A live move: guards, then ``write_ahead`` (the log append), then the new state.

    Raises IllegalTransition when the move is not in the table or a guard refuses it.
    """
    try:
        moved = machine.events[trigger].trigger(model, write_ahead=write_ahead, **context)
    except MachineError as exc:
        raise IllegalTransition(f"{model!r}: {trigger} is not allowed ({exc.value})") from None
    if not moved:
        raise IllegalTransition(f"{model!r}: {trigger} refused by its guard")


class _Stated(Protocol[_S]):
    state: _S


def replay_move(moves: dict[str, dict[_S, _S]], model: _Stated[_S], trigger: str) -> None:
    """A recorded move: legal by the table, guards already checked when it was made."""
    try:
        model.state = moves[trigger][model.state]
    except KeyError:
        raise IllegalTransition(
            f"{model!r}: recorded {trigger} is not allowed from {model.state.value}"
        ) from None
