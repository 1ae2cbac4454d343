"""structlog set up once: readable lines on stderr, JSON lines in ``STATE_DIR/logs/``.

The stdlib loggers of the libraries (watchdog, urllib3, transitions, aiohttp) go through
the same formatters, so their warnings land in both streams too.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import structlog

_SHARED = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def setup_logging(log_dir: Path | None, *, verbose: bool = False) -> None:
    """Route every log record to the console and, with ``log_dir``, to a JSONL file."""
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_handler(logging.StreamHandler(sys.stderr),
                             structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())))
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        root.addHandler(_handler(logging.FileHandler(log_dir / "comfy-dual.jsonl",
                                                     encoding="utf-8"),
                                 structlog.processors.JSONRenderer()))
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("transitions", "urllib3", "aiohttp.access", "websocket"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _handler(handler: logging.Handler, renderer: object) -> logging.Handler:
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    return handler
