"""The command-file protocol (spool.commands), both sides, with real files."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import orjson
import pytest

from spool import commands
from spool.commands import Reply, pending_commands, read_reply, reply, send, wait_for_reply


def test_a_sent_command_is_found_answered_and_its_reply_read(tmp_path: Path) -> None:
    folder = tmp_path / "commands"  # made by send
    command_id = send(folder, "cancel", "b0003")
    assert set(os.listdir(folder)) == {"tmp", f"{command_id}.json"}
    assert os.listdir(folder / "tmp") == []
    body = orjson.loads((folder / f"{command_id}.json").read_bytes())
    assert set(body) == {"id", "command", "batch_id", "requested_at"}
    assert read_reply(folder, command_id) is None
    [command], bad = pending_commands(folder)
    assert bad == [] and (command.id, command.command, command.batch_id) == (
        command_id, "cancel", "b0003")
    reply(command.path, True, "b0003 cancelled")
    assert pending_commands(folder) == ([], [])
    assert read_reply(folder, command_id) == Reply(True, "b0003 cancelled")
    assert orjson.loads((folder / "done" / f"{command_id}.json").read_bytes()) == {
        "id": command_id, "ok": True, "message": "b0003 cancelled"}


def test_commands_are_found_oldest_first(tmp_path: Path) -> None:
    first = send(tmp_path, "retry", "b1")
    os.utime(tmp_path / f"{first}.json", (1, 1))
    second = send(tmp_path, "cancel", "b2")
    assert [c.id for c in pending_commands(tmp_path)[0]] == [first, second]


def test_an_unknown_command_is_refused_before_it_is_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown command 'pause'"):
        send(tmp_path, "pause", "b1")
    assert os.listdir(tmp_path) == []


def test_waiting_for_a_reply_returns_it_once_written_or_none_after_the_timeout(
        tmp_path: Path) -> None:
    command_id = send(tmp_path, "cancel", "b1")
    began = time.monotonic()
    assert wait_for_reply(tmp_path, command_id, 0.1) is None
    assert time.monotonic() - began >= 0.1
    [command], _ = pending_commands(tmp_path)
    answer = threading.Timer(0.1, reply, (command.path, False, "b1 is done"))
    answer.start()
    try:
        assert wait_for_reply(tmp_path, command_id, 5) == Reply(False, "b1 is done")
    finally:
        answer.join()


def test_a_reply_that_is_not_an_object_is_no_reply(tmp_path: Path) -> None:
    (tmp_path / commands.REPLY_DIR).mkdir()
    (tmp_path / commands.REPLY_DIR / "x.json").write_bytes(b"[1]")
    (tmp_path / commands.REPLY_DIR / "y.json").write_bytes(b"{not json")
    assert read_reply(tmp_path, "x") is None and read_reply(tmp_path, "y") is None
