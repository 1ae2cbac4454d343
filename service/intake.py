"""Intake: prompt files become batches, command files from ``submit.py`` become events.

Files come from the command line (``SubmitFile`` messages, one-shot mode) or from the
spool, which finds complete files and moves them. The rule for a file whose bytes were
recorded before lives here, once:

- the same file (inode, size, mtime) that a crash left in ``incoming/`` after recording
  it is that batch, filed now;
- otherwise a file with the bytes of an earlier batch is that batch in one-shot mode (run
  the same command again and it resumes or reports), and is rejected from the spool (a
  second copy dropped by mistake); ``force`` (``--force``, ``incoming/force/``) records
  a new batch either way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import structlog

from service.agents import Defer
from spool.commands import pending_commands, reply
from spool.folder import Candidate, DropFolder
from spool.reading import read_prompt_file
from spool.watcher import SpoolHint
from statemachine.admission import record_file
from statemachine.errors import BadInput
from statemachine.job import BATCH_FINAL, Batch, BatchState
from statemachine.rules import cancel_batch, retry_batch
from statemachine.store import Store

log = structlog.get_logger("comfy_dual.intake")


@dataclass(frozen=True, slots=True)
class SubmitFile:
    """The ``index``-th prompt file named on the command line, to plan and record as a
    batch (a path named twice is two files)."""

    index: int
    path: Path
    force: bool = False


class Intake:
    """Records batches and runs commands; effects (moving a file, a reply) are deferred
    until the turn's events are durable. Without a spool, files come only as messages."""

    def __init__(self, settings: Any, store: Store, defer: Defer, *,
                 spool: DropFolder | None = None, commands: Path | None = None) -> None:
        self.settings = settings
        self.store = store
        self.defer = defer
        self.spool = spool
        self.commands = commands
        self.submitted: dict[int, str | None] = {}  # SubmitFile.index -> batch id or None
        self._answering: set[Path] = set()  # run, reply waiting for the commit

    def turn(self, now: float) -> None:
        spool = self.spool
        if spool is not None and spool.due(now):
            accepted = [(c, batch_id) for c in spool.scan(now)
                        if (batch_id := self._from_spool(spool, c, now)) is not None]
            if accepted:  # moved only once the batches are durable
                self.defer(lambda: spool.accept_all(accepted))
        if self.commands is not None:
            self._run_commands(self.commands, now)

    def next_turn_in(self, now: float, longest: float) -> float:
        """How long the loop may wait for messages before the spool needs a look."""
        if self.spool is None:
            return longest
        return min(longest, max(0.0, self.spool.next_scan_at - now))

    def on_spool_hint(self, hint: SpoolHint, now: float) -> None:
        if self.spool is not None:
            self.spool.note(hint)

    def on_file(self, message: SubmitFile, now: float) -> None:
        try:
            data = read_prompt_file(message.path, self.settings.max_file_bytes)
            earlier = self.batch_of(data)
            if earlier is not None and not message.force:
                log.info("↩️ same file as an earlier batch: taking that one",
                         file=str(message.path), batch=earlier.batch_id,
                         state=earlier.state.value)
                batch_id: str | None = earlier.batch_id
            else:
                batch_id = self._admit(data, message.path.name, now)
        except BadInput as exc:
            log.error("❌ prompt file refused", file=str(message.path), reason=str(exc))
            batch_id = None
        self.submitted[message.index] = batch_id

    def batch_of(self, data: bytes) -> Batch | None:
        """The latest batch recorded from a file of exactly these bytes, if any."""
        sha256 = hashlib.sha256(data).hexdigest()
        return self.store.batches.get(self.store.by_sha256.get(sha256, ""))

    def run_command(self, command: str, batch_id: str, now: float) -> tuple[bool, str]:
        """``cancel``: stop and cancel every unfinished job; ``retry``: failed and
        cancelled jobs wait again with fresh attempts. Returns (ok, message)."""
        batch = self.store.batches.get(batch_id)
        if batch is None:
            return False, f"no batch {batch_id!r}"
        if command == "cancel":
            if batch.state in BATCH_FINAL:
                return False, f"{batch_id} already ended ({batch.state.value})"
            events = cancel_batch(batch, "cancelled by a user")
        elif batch.state in (BatchState.FAILED, BatchState.CANCELLED):
            events = retry_batch(batch)
        else:
            return False, f"{batch_id} is {batch.state.value}: only failed or cancelled " \
                          "batches can be retried"
        for event in events:
            self.store.record(event, now)
        return True, f"{batch_id} {'cancelled' if command == 'cancel' else 'retried'}"

    def _from_spool(self, spool: DropFolder, c: Candidate, now: float) -> str | None:
        """The batch id ``c`` belongs to (recording a new batch if needed), or None when it
        was rejected."""
        earlier = self.batch_of(c.data)
        if earlier is not None and earlier.plan.file_id == c.ident:
            log.info("↩️ file recorded before a restart, filed now", file=c.name,
                     batch=earlier.batch_id)
            return earlier.batch_id  # recorded just before a crash, never moved
        if earlier is not None and not c.force:
            spool.reject(c, f"same content as batch {earlier.batch_id} "
                              f"({earlier.plan.name}, {earlier.state.value}); submit it "
                              "with --force (or drop it into incoming/force/) to render it "
                              "again", now)
            return None
        try:
            return self._admit(c.data, c.name, now, file_id=c.ident)
        except BadInput as exc:
            spool.reject(c, str(exc), now)
            return None

    def _admit(self, data: bytes, name: str, now: float,
               file_id: tuple[int, int, int] | None = None) -> str:
        """Plan and record a prompt file as the next batch; returns its id. BadInput, and
        nothing recorded, when the file cannot be a batch, whatever the reason."""
        plan = record_file(self.store, self.settings, data, name, now, file_id)
        log.info("📥 batch accepted", batch=plan.batch_id, video=plan.name, file=plan.source,
                 chunks=len(plan.jobs) // 3, frames=plan.total_frames)
        return plan.batch_id

    def _run_commands(self, folder: Path, now: float) -> None:
        commands, unreadable = pending_commands(folder)
        for path, why in unreadable:
            reply(path, False, why)
        for command in commands:
            if command.path in self._answering:
                continue
            ok, message = self.run_command(command.command, command.batch_id, now)
            log.info("🛠️ command", command=command.command, batch=command.batch_id, ok=ok,
                     message=message)
            self._answering.add(command.path)
            self.defer(partial(self._reply, command.path, ok, message))

    def _reply(self, path: Path, ok: bool, message: str) -> None:
        reply(path, ok, message)
        self._answering.discard(path)
