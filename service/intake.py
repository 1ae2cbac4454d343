"""Service-mode intake, run by the loop each turn: prompt files from the spool become
batches, command files from ``submit.py`` become events.

The spool package finds complete files and moves them; the rules for what a file means
(a new batch, a duplicate, a file already recorded before a crash) live here, next to the
loop that records the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from spool.commands import pending_commands, reply
from spool.intake import Candidate, Spool
from statemachine.errors import BadInput

if TYPE_CHECKING:
    from service.loop import Loop

log = structlog.get_logger("comfy_dual.intake")


class Intake:
    """The spool and the command folder, seen from the loop."""

    def __init__(self, spool: Spool, commands: Path) -> None:
        self.spool = spool
        self.commands = commands
        self._answering: set[Path] = set()  # run, reply waiting for the commit

    def turn(self, loop: Loop, now: float) -> None:
        if self.spool.due(now):
            accepted = [(c, batch_id) for c in self.spool.scan(now)
                        if (batch_id := self._decide(loop, c, now)) is not None]
            if accepted:  # moved only once the batches are durable
                loop.defer(lambda: self.spool.accept_all(accepted))
        self._run_commands(loop, now)

    def next_turn_in(self, now: float) -> float:
        """How long the loop may wait for messages before the spool needs a look."""
        return max(0.0, self.spool.next_scan_at - now)

    def _decide(self, loop: Loop, c: Candidate, now: float) -> str | None:
        """The batch id ``c`` belongs to (recording a new batch if needed), or None when it
        was rejected."""
        earlier = loop.batch_of(c.data)
        if earlier is not None and earlier.plan.file_id == c.ident:
            log.info("↩️ file recorded before a restart, filed now", file=c.name,
                     batch=earlier.batch_id)
            return earlier.batch_id  # recorded just before a crash, never moved
        if earlier is not None and not c.force:
            self.spool.reject(c, f"same content as batch {earlier.batch_id} "
                              f"({earlier.plan.name}, {earlier.state.value}); submit it "
                              "with --force (or drop it into incoming/force/) to render it "
                              "again", now)
            return None
        try:
            return loop.admit_file(c.data, c.name, now, file_id=c.ident)
        except BadInput as exc:
            self.spool.reject(c, str(exc), now)
            return None

    def _run_commands(self, loop: Loop, now: float) -> None:
        commands, unreadable = pending_commands(self.commands)
        for path, why in unreadable:
            reply(path, False, why)
        for command in commands:
            if command.path in self._answering:
                continue
            ok, message = loop.run_command(command.command, command.batch_id, now)
            log.info("🛠️ command", command=command.command, batch=command.batch_id, ok=ok,
                     message=message)
            self._answering.add(command.path)
            loop.defer(lambda p=command.path, o=ok, m=message: self._reply(p, o, m))

    def _reply(self, path: Path, ok: bool, message: str) -> None:
        reply(path, ok, message)
        self._answering.discard(path)
