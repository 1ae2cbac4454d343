"""Commands from ``submit.py`` to the daemon: JSON files in ``spool/commands/``.

``submit.py`` writes ``commands/tmp/<id>.json`` and renames it into ``commands/``; the
daemon executes it, writes ``commands/done/<id>.json`` (``id``, ``ok``, ``message``) and
removes the command. The daemon stays the only writer of the event log.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import orjson

from statemachine.log import write_atomic

COMMANDS = ("cancel", "retry")


@dataclass(frozen=True, slots=True)
class Command:
    path: Path
    id: str
    command: str
    batch_id: str


def pending_commands(directory: Path) -> tuple[list[Command], list[tuple[Path, str]]]:
    """Commands waiting in ``directory`` (oldest first), and unreadable files with why."""
    good: list[Command] = []
    bad: list[tuple[Path, str]] = []
    try:
        entries = sorted((e for e in os.scandir(directory)
                          if e.is_file(follow_symlinks=False) and e.name.endswith(".json")),
                         key=lambda e: (e.stat().st_mtime, e.name))
    except FileNotFoundError:
        return good, bad
    for entry in entries:
        path = Path(entry.path)
        try:
            body = orjson.loads(path.read_bytes())
            command = Command(path, str(body["id"]), body["command"], str(body["batch_id"]))
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
            bad.append((path, f"unreadable command file: {exc}"))
            continue
        if command.command not in COMMANDS:
            bad.append((path, f"unknown command {command.command!r}; known: cancel, retry"))
        else:
            good.append(command)
    return good, bad


def reply(path: Path, ok: bool, message: str) -> None:
    """Write ``done/<id>.json`` for the command at ``path``, then remove the command."""
    done = path.parent / "done"
    done.mkdir(exist_ok=True)
    write_atomic(done / path.name, orjson.dumps({"id": path.stem, "ok": ok,
                                                  "message": message}))
    path.unlink(missing_ok=True)
