"""The one way a prompt file's bytes become a batch plan, for every caller: the spool,
one-shot mode, ``--dry-run`` and ``submit.py submit``.

A file's bytes are hostile until planned. Whatever goes wrong on the way (a refusal of the
planner's, or an exception nobody foresaw: a parser's recursion limit, a number too long
to convert, a bug of ours) makes the file a rejected file with a one-line reason, never a
stopped daemon. And the plan's cost is bounded before anything is recorded: its
``batch_accepted`` line must fit in ``MAX_EVENT_BYTES``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from statemachine import events as ev
from statemachine.errors import BadInput
from statemachine.plan import BatchPlan
from statemachine.planner import PlanDefaults, plan_prompt_file

if TYPE_CHECKING:
    from statemachine.store import Store

MAX_EVENT_BYTES = 1 << 20  # no file makes a longer event-log line than this
MAX_REASON_CHARS = 300


def admit(data: bytes, filename: str, *, batch_id: str, settings: PlanDefaults) -> BatchPlan:
    """The plan of one prompt file, or BadInput saying in one line why there is none."""
    try:
        plan = plan_prompt_file(data, filename, batch_id=batch_id, settings=settings)
        size = len(ev.encode(ev.Recorded(0, 0.0, ev.BatchAccepted(plan))))
    except BadInput:
        raise
    except Exception as exc:  # anything a file's bytes can set off is the file's rejection
        raise BadInput(unexpected(exc)) from exc
    if size > MAX_EVENT_BYTES:
        raise BadInput(f"its plan would take {size:,} bytes in the event log, more than "
                       f"{MAX_EVENT_BYTES:,}: use shorter prompts or fewer chunks")
    return plan


def record_file(store: Store, settings: PlanDefaults, data: bytes, name: str, now: float,
                file_id: tuple[int, int, int] | None = None) -> BatchPlan:
    """Plan a prompt file as the store's next batch and record it (not yet committed).
    BadInput, and nothing recorded, when the file cannot be a batch, whatever the reason.
    This is the entry point of every file the daemon takes."""
    plan = admit(data, name, batch_id=f"b{len(store.batches) + 1:04d}", settings=settings)
    plan = replace(plan, file_id=file_id)
    try:
        store.record(ev.BatchAccepted(plan), now)
    except Exception as exc:  # raised before the append: nothing was recorded
        raise BadInput(unexpected(exc)) from exc
    return plan


def unexpected(exc: BaseException) -> str:
    """An exception as one line: its class and message, cut short, no traceback."""
    message = " ".join(str(exc).split())
    if len(message) > MAX_REASON_CHARS:
        message = message[: MAX_REASON_CHARS - 3] + "..."
    return f"cannot be planned: {type(exc).__name__}: {message}" if message else \
        f"cannot be planned: {type(exc).__name__}"
