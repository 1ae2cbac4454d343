"""Logging: structlog and stdlib records reach the JSON file, whole and in order, with the
traceback of an exception; INFO lines within FLUSH_EVERY, warnings at once, the rest when
the file is closed."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from support import wait_for

from service.logs import setup_logging


@pytest.fixture
def logs(tmp_path: Path) -> Iterator[Path]:
    """Logging set up for the test; as it was before afterwards (other tests read what
    structlog prints when nobody configured it)."""
    root = logging.getLogger()
    handlers, level, config = list(root.handlers), root.level, structlog.get_config()
    setup_logging(tmp_path / "logs")
    yield tmp_path / "logs" / "comfy-dual.jsonl"
    setup_logging(None)  # closes the file handlers it made
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    structlog.configure(**config)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _events(path: Path) -> list[object]:
    return [line["event"] for line in _lines(path)]


def test_info_lines_reach_the_file_in_order_within_a_moment(logs: Path) -> None:
    log = structlog.get_logger("comfy_dual.test")
    for n in range(100):
        log.info("📤 posted", job=f"b0001/H{n}")
    wait_for(lambda: len(_lines(logs)) == 100, "the lines written")
    lines = _lines(logs)
    assert [line["job"] for line in lines] == [f"b0001/H{n}" for n in range(100)]
    assert lines[0]["event"] == "📤 posted" and lines[0]["level"] == "info"
    assert "timestamp" in lines[0]


def test_a_warning_goes_out_at_once_with_what_waited_before_it(logs: Path) -> None:
    structlog.get_logger("comfy_dual.test").info("first")
    logging.getLogger("urllib3.connectionpool").warning("pool is full, discarding %s", "x")
    assert _events(logs) == ["first", "pool is full, discarding x"]  # no waiting


def test_an_exception_is_written_with_its_traceback(logs: Path) -> None:
    """It used to be only ``"exc_info": true`` in the file (the console had it all)."""
    try:
        raise ValueError("bad frame")
    except ValueError:
        structlog.get_logger("comfy_dual.test").exception("handler failed", url="ws://x")
    (line,) = _lines(logs)
    assert line["url"] == "ws://x" and "ValueError: bad frame" in line["exception"]


def test_setting_up_again_writes_out_and_closes_the_previous_file(logs: Path,
                                                                  tmp_path: Path) -> None:
    structlog.get_logger("comfy_dual.test").info("before")
    setup_logging(tmp_path / "other")
    assert _events(logs) == ["before"]
    structlog.get_logger("comfy_dual.test").info("after")
    setup_logging(None)
    assert _events(tmp_path / "other" / "comfy-dual.jsonl") == ["after"]
