"""Event types and their JSON codec.

Every change of a job, a batch or an instance's health is one of these frozen dataclasses.
The codec turns a recorded event (``seq``, ``ts``, the event) into one JSON object and
back; it knows nothing of files (that is ``statemachine.log``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, ClassVar

import orjson

from statemachine.errors import CorruptLog
from statemachine.plan import BatchPlan, upcast_v1

SCHEMA_VERSION = 2  # 2: batch_accepted records the plan's inputs; every record its crc
_CRC = b',"crc":'  # the last field of a record: crc32 of the bytes before it


@dataclass(frozen=True, slots=True)
class Event:
    """Base of all events. ``type`` is the tag written to the log."""

    type: ClassVar[str] = ""

    def to_fields(self) -> dict[str, Any]:
        names: tuple[str, ...] = self.__match_args__  # the subclass's fields; none on Event
        return {name: getattr(self, name) for name in names}


_HEADER = ("seq", "ts", "type", "v")  # the keys of a log record besides the event's fields
EVENT_TYPES: dict[str, type[Event]] = {}
Reader = Callable[[dict[str, Any]], Event]
_READERS: dict[str, tuple[int, Reader]] = {}  # tag -> (keys in its records, reader)


def _register(cls: type[Event]) -> type[Event]:
    EVENT_TYPES[cls.type] = cls
    _READERS[cls.type] = (len(_HEADER) + len(cls.__match_args__), _reader(cls))
    return cls


def _reader(cls: type[Event]) -> Reader:
    """Builds a ``cls`` from a decoded record: its ``from_fields`` if it has one, else the
    values of its fields by name. Replay calls this for every line, so the values are
    picked by a C-level ``itemgetter`` (a list comprehension costs 0.2 s per million)."""
    from_fields: Reader | None = getattr(cls, "from_fields", None)
    if from_fields is not None:
        return from_fields
    names: tuple[str, ...] = cls.__match_args__
    make: Callable[..., Event] = cls  # a subclass: it takes its fields in order
    pick = itemgetter(*names)
    if len(names) == 1:
        return lambda record: make(pick(record))
    return lambda record: make(*pick(record))


# --- batches -------------------------------------------------------------------------


@_register
@dataclass(frozen=True, slots=True)
class BatchAccepted(Event):
    """A prompt file became a batch. Carries the whole plan and the file's sha256."""

    type: ClassVar[str] = "batch_accepted"
    plan: BatchPlan

    @property
    def batch_id(self) -> str:
        return self.plan.batch_id

    def to_fields(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict()}

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Event:
        return cls(BatchPlan.from_dict(fields["plan"]))


@_register
@dataclass(frozen=True, slots=True)
class BatchStarted(Event):
    """The first job of the batch was dispatched."""

    type: ClassVar[str] = "batch_started"
    batch_id: str


@_register
@dataclass(frozen=True, slots=True)
class BatchGateOpened(Event):
    """The COMBINE gate opened: the batch's COMBINE jobs may become ready."""

    type: ClassVar[str] = "batch_gate_opened"
    batch_id: str


@_register
@dataclass(frozen=True, slots=True)
class BatchDone(Event):
    type: ClassVar[str] = "batch_done"
    batch_id: str


@_register
@dataclass(frozen=True, slots=True)
class BatchFailed(Event):
    type: ClassVar[str] = "batch_failed"
    batch_id: str
    reason: str


@_register
@dataclass(frozen=True, slots=True)
class BatchCancelled(Event):
    type: ClassVar[str] = "batch_cancelled"
    batch_id: str
    reason: str


@_register
@dataclass(frozen=True, slots=True)
class BatchRetried(Event):
    """A user asked to run a failed or cancelled batch again."""

    type: ClassVar[str] = "batch_retried"
    batch_id: str


# --- jobs ----------------------------------------------------------------------------


@_register
@dataclass(frozen=True, slots=True)
class JobReady(Event):
    """Dependencies (and, for COMBINE, the gate) are satisfied."""

    type: ClassVar[str] = "job_ready"
    job_id: str


@_register
@dataclass(frozen=True, slots=True)
class JobDispatchIntent(Event):
    """Written (and fsynced) before ``POST /prompt`` with this prompt_id is sent."""

    type: ClassVar[str] = "job_dispatch_intent"
    job_id: str
    instance_id: str
    prompt_id: str


@_register
@dataclass(frozen=True, slots=True)
class JobQueued(Event):
    """The server accepted the prompt."""

    type: ClassVar[str] = "job_queued"
    job_id: str
    prompt_id: str
    number: int | None  # None when re-attached after a restart (the server's number unknown)


@_register
@dataclass(frozen=True, slots=True)
class JobStarted(Event):
    type: ClassVar[str] = "job_started"
    job_id: str
    prompt_id: str


@_register
@dataclass(frozen=True, slots=True)
class JobSucceeded(Event):
    """The render finished; ``outputs`` is what the server reported, node by node."""

    type: ClassVar[str] = "job_succeeded"
    job_id: str
    prompt_id: str
    outputs: dict[str, Any]


@_register
@dataclass(frozen=True, slots=True)
class JobAttemptFailed(Event):
    """An attempt failed and another is allowed from ``eligible_at`` on (the backoff)."""

    type: ClassVar[str] = "job_attempt_failed"
    job_id: str
    prompt_id: str
    error: str
    eligible_at: float


@_register
@dataclass(frozen=True, slots=True)
class JobFailed(Event):
    """No attempt left, or the failure is permanent (invalid workflow)."""

    type: ClassVar[str] = "job_failed"
    job_id: str
    prompt_id: str
    error: str


@_register
@dataclass(frozen=True, slots=True)
class JobLost(Event):
    """The job's instance lost it (restart, unreachable too long): ready again, no attempt
    used."""

    type: ClassVar[str] = "job_lost"
    job_id: str
    prompt_id: str
    reason: str


@_register
@dataclass(frozen=True, slots=True)
class JobCancelled(Event):
    type: ClassVar[str] = "job_cancelled"
    job_id: str
    reason: str


@_register
@dataclass(frozen=True, slots=True)
class JobReset(Event):
    """A failed or cancelled job goes back to waiting with its attempts reset."""

    type: ClassVar[str] = "job_reset"
    job_id: str


# --- instances -----------------------------------------------------------------------


@_register
@dataclass(frozen=True, slots=True)
class InstanceUp(Event):
    type: ClassVar[str] = "instance_up"
    instance_id: str


@_register
@dataclass(frozen=True, slots=True)
class InstanceDown(Event):
    type: ClassVar[str] = "instance_down"
    instance_id: str
    reason: str


@_register
@dataclass(frozen=True, slots=True)
class PromptsWithdrawn(Event):
    """The server showed none of these prompts queued or running any more: prompts of jobs
    that left it without succeeding (lost, timed out, failed, cancelled), which it might
    otherwise still render. Until then it gets no new work."""

    type: ClassVar[str] = "prompts_withdrawn"
    instance_id: str
    prompt_ids: tuple[str, ...]

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Event:
        return cls(fields["instance_id"], tuple(fields["prompt_ids"]))


# --- the recorded form ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Recorded:
    """An event as it stands in the log: its position and the time it was recorded."""

    seq: int
    ts: float
    event: Event


def encode(rec: Recorded) -> bytes:
    """One log line, newline included. Its last field, ``crc``, is the crc32 of the bytes
    before it: a byte changed anywhere in the record is found when it is read."""
    body = {"seq": rec.seq, "ts": rec.ts, "type": rec.event.type, "v": SCHEMA_VERSION}
    body.update(rec.event.to_fields())
    head = orjson.dumps(body)[:-1]
    return b"%b%b%d}\n" % (head, _CRC, zlib.crc32(head))


def _check_crc(line: bytes, crc: Any) -> None:
    """The record's bytes before its ``crc`` field (the last: nested objects come before
    it) against the crc. Costs ~0.3 us a line: no copy, one C call."""
    if crc is None:
        raise CorruptLog("no checksum (crc)")
    if zlib.crc32(memoryview(line)[: line.rfind(_CRC)]) != crc:
        raise CorruptLog("checksum mismatch: the record changed after it was written")


def _upcast(body: dict[str, Any], version: Any) -> dict[str, Any]:
    """A record of an older schema version in today's form."""
    if version != 1:
        raise CorruptLog(f"event schema version {version!r} is not supported")
    if body["type"] == BatchAccepted.type:
        try:
            body["plan"] = upcast_v1(body["plan"])
        except (KeyError, IndexError, TypeError) as exc:
            raise CorruptLog(f"bad version 1 plan ({exc!r})") from None
    return body


def decode(line: bytes) -> Recorded:
    """Parse one log line; anything unexpected is a ``CorruptLog`` (the caller adds where)."""
    return Recorded(*parse(line))


def parse(line: bytes) -> tuple[int, float, Event]:
    """``decode`` without the ``Recorded``: replay reads every line of the log and wants
    the three parts, so it is spared a million frozen wrappers (as the records are read
    in place rather than copied without their header)."""
    try:
        body = orjson.loads(line)
        seq, ts, tag, version = body["seq"], body["ts"], body["type"], body["v"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise CorruptLog(f"not an event record ({exc})") from None
    if version == SCHEMA_VERSION:
        _check_crc(line, body.pop("crc", None))
    else:
        body = _upcast(body, version)
    try:
        keys, read = _READERS[tag]
    except (KeyError, TypeError):
        raise CorruptLog(f"unknown event type {tag!r}") from None
    if len(body) != keys:
        expected = {*_HEADER, *EVENT_TYPES[tag].__match_args__}
        raise CorruptLog(f"bad fields for {tag}: missing {sorted(expected - body.keys())}, "
                         f"unexpected {sorted(body.keys() - expected)}")
    try:
        event = read(body)
    except (TypeError, KeyError, ValueError) as exc:
        raise CorruptLog(f"bad fields for {tag}: {exc}") from None
    return seq, ts, event
