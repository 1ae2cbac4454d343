"""Commands from ``submit.py`` to the daemon: JSON files in ``spool/commands/``, the whole
protocol on both sides.

``send`` (``submit.py``) writes ``commands/tmp/<id>.json`` (``id``, ``command``,
``batch_id``, ``requested_at``) and renames it into ``commands/``; the daemon finds it
with ``pending_commands``, executes it and calls ``reply``, which writes
``commands/done/<id>.json`` (``id``, ``ok``, ``message``) and removes the command;
``wait_for_reply`` (``submit.py``) reads that answer. The daemon stays the only writer
of the event log.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import orjson
import structlog

from spool.reading import read_prompt_file
from statemachine.durable import write_atomic

log = structlog.get_logger("comfy_dual.commands")

COMMANDS = ("cancel", "retry")
MAX_COMMAND_BYTES = 64 * 1024
TMP_DIR = "tmp"  # in the commands folder: where a command is written before its rename
REPLY_DIR = "done"  # in the commands folder: the daemon's answers
SUFFIX = ".json"
POLL_SECONDS = 0.05

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Command:
    path: Path
    id: str
    command: str
    batch_id: str


@dataclass(frozen=True, slots=True)
class Reply:
    ok: bool
    message: str


# --- submit.py's side -----------------------------------------------------------------


def send(directory: Path, command: str, batch_id: str) -> str:
    """Queue ``command`` for ``batch_id`` in the commands folder ``directory``, durably
    and whole (made if missing); returns the command's id."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; known: {', '.join(COMMANDS)}")
    command_id = uuid.uuid4().hex
    body = {"id": command_id, "command": command, "batch_id": batch_id,
            "requested_at": time.time()}
    name = command_id + SUFFIX
    write_atomic(directory / name, orjson.dumps(body), tmp=directory / TMP_DIR / name,
                 make_dirs=True)
    return command_id


def read_reply(directory: Path, command_id: str) -> Reply | None:
    """The daemon's answer to the command ``command_id``, or None while there is none."""
    try:
        body = orjson.loads(_reply_path(directory, command_id).read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    return Reply(bool(body.get("ok")), str(body.get("message") or ""))


def wait_for_reply(directory: Path, command_id: str, timeout: float) -> Reply | None:
    """The daemon's answer, waited for at most ``timeout`` seconds (None: none came)."""
    return poll(lambda: read_reply(directory, command_id), timeout)


def poll(probe: Callable[[], T | None], timeout: float) -> T | None:
    """Call ``probe`` until it returns something or ``timeout`` seconds have passed: how
    a writer of the spool waits for what the daemon leaves there."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found is not None or time.monotonic() >= deadline:
            return found
        time.sleep(POLL_SECONDS)


# --- the daemon's side ----------------------------------------------------------------


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
            bad.append((path, f"unknown command {command.command!r}; known: "
                              f"{', '.join(COMMANDS)}"))
        else:
            good.append(command)
    return good, bad


def _listing(directory: Path) -> list[Path]:
    found = []
    try:
        with os.scandir(directory) as entries:
            for e in entries:
                if e.name.endswith(SUFFIX) and not e.is_dir(follow_symlinks=False):
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
    target = path.parent / REPLY_DIR / path.name
    try:
        target.parent.mkdir(exist_ok=True)
        write_atomic(target, orjson.dumps({"id": path.stem, "ok": ok, "message": message}))
    except OSError as exc:
        log.error("❌ cannot write a command's reply", command=path.name, error=str(exc))
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.error("❌ cannot remove a command file", command=path.name, error=str(exc))


def _reply_path(directory: Path, command_id: str) -> Path:
    return directory / REPLY_DIR / (command_id + SUFFIX)
