"""What an instance agent reports to the loop (``post``): one frozen dataclass a kind of
news, which the loop, the single writer, turns into events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from instances.client import JobOutcome
from statemachine.errors import ComfyDualError


@dataclass(frozen=True, slots=True)
class Health:
    instance_id: str
    up: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Validated:
    """The workflows were checked against the server's ``/object_info`` on (re)connection,
    before its Health(up); ``problems`` is empty when they fit."""

    instance_id: str
    problems: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Posted:
    instance_id: str
    job_id: str
    prompt_id: str
    number: int


@dataclass(frozen=True, slots=True)
class PostFailed:
    instance_id: str
    job_id: str
    prompt_id: str
    error: ComfyDualError


@dataclass(frozen=True, slots=True)
class Started:
    instance_id: str
    prompt_id: str


@dataclass(frozen=True, slots=True)
class Progress:
    instance_id: str
    prompt_id: str
    node: str
    value: int
    max: int


@dataclass(frozen=True, slots=True)
class Finished:
    instance_id: str
    prompt_id: str
    outcome: JobOutcome


@dataclass(frozen=True, slots=True)
class Withdrawn:
    """The server shows none of ``prompt_ids`` queued or running (any more)."""

    instance_id: str
    prompt_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Checked:
    """Where a prompt stands on its server: finished (``outcome``), still queued, or gone
    (in neither history nor queue: never arrived, or the server restarted and forgot it)."""

    instance_id: str
    job_id: str
    prompt_id: str
    where: Literal["history", "running", "queue", "gone"]
    outcome: JobOutcome | None = None
