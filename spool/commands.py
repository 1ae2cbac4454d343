"""Commands from ``submit.py`` to the daemon: JSON files in ``spool/commands/``.

``submit.py`` writes ``commands/tmp/<id>.json`` and renames it into ``commands/``; the
daemon executes it, writes ``commands/done/<id>.json`` (``id``, ``ok``, ``message``) and
removes the command. The daemon stays the only writer of the event log.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import orjson
import structlog

from spool.reading import read_prompt_file
from statemachine.durable import write_atomic

log = structlog.get_logger("comfy_dual.commands")

COMMANDS = ("cancel", "retry")
MAX_COMMAND_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Command:
    path: Path
    id: str
    command: str
    batch_id: str


def pending_commands(directory: Path) -> tuple[list[Command], list[tuple[Path, str]]]:
    """Commands waiting in ``directory`` (oldest first), and unreadable files with why.
    A command file is read like a prompt file (a regular file, at most 64 KiB); whatever
    is wrong with one is its reply, never the daemon's trouble."""
    good: list[Command] = []
    bad: list[tuple[Path, str]] = []
    for path in _listing(directory):
        try:
            command = _read(path)
        except Exception as exc:  # a hostile file: its reply says why
            bad.append((path, f"unreadable command file: {type(exc).__name__}: {exc}"))
            continue
        if command.command not in COMMANDS:
            bad.append((path, f"unknown command {command.command!r}; known: cancel, retry"))
        else:
            good.append(command)
    return good, bad


def _listing(directory: Path) -> list[Path]:
    found = []
    try:
        with os.scandir(directory) as entries:
            for e in entries:
                if e.name.endswith(".json") and not e.is_dir(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        found.append((e.stat(follow_symlinks=False).st_mtime, e.name, e.path))
    except FileNotFoundError:
        return []
    return [Path(p) for _, _, p in sorted(found)]


def _read(path: Path) -> Command:
    body = orjson.loads(read_prompt_file(path, MAX_COMMAND_BYTES))
    return Command(path, str(body["id"]), str(body["command"]), str(body["batch_id"]))


def reply(path: Path, ok: bool, message: str) -> None:
    """Write ``done/<id>.json`` for the command at ``path``, then remove the command (even
    when the reply cannot be written: a command runs once)."""
    done = path.parent / "done"
    try:
        done.mkdir(exist_ok=True)
        write_atomic(done / path.name, orjson.dumps({"id": path.stem, "ok": ok,
                                                      "message": message}))
    except OSError as exc:
        log.error("❌ cannot write a command's reply", command=path.name, error=str(exc))
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.error("❌ cannot remove a command file", command=path.name, error=str(exc))
