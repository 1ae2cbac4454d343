"""structlog set up once: readable lines on stderr, JSON lines in ``STATE_DIR/logs/``.

The stdlib loggers of the libraries (watchdog, urllib3, transitions, aiohttp) go through
the same formatters, so their warnings land in both streams too.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from typing import Any

import structlog
from structlog.typing import Processor

FLUSH_EVERY = 0.5  # seconds an INFO line may wait before it is written to the JSON file
_SHARED: list[Processor] = [
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
        if isinstance(handler, logging.FileHandler):
            handler.close()  # its file, and the thread writing to it
    root.addHandler(_handler(_Stderr(),
                             structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())))
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        root.addHandler(_handler(_BatchingFileHandler(log_dir / "comfy-dual.jsonl"),
                                 structlog.processors.format_exc_info,
                                 structlog.processors.JSONRenderer()))
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("transitions", "urllib3", "aiohttp.access", "websocket"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _handler(handler: logging.Handler, *processors: Processor) -> logging.Handler:
    """``handler`` rendering every record with ``processors`` (the last one renders)."""
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *processors],
    ))
    return handler


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a line is logged, not to the stream it was
    when logging was set up (a test capturing stderr, then closing it, left every later
    line to a closed file)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


class _BatchingFileHandler(logging.FileHandler):
    """Keeps lines below WARNING for a writer thread that writes them out every FLUSH_EVERY
    seconds (a WARNING or worse goes out at once, with what waited before it).

    The daemon's loop logs every dispatch and every finished job; a write per line released
    the GIL in the middle of its turn, and under load the loop then waited for another
    thread to give it back (measured at ~400 jobs/s: ~8% more jobs a second without those
    writes). Lines leave in order, whole; at exit ``logging.shutdown`` writes what is left.
    A killed process loses at most FLUSH_EVERY seconds of INFO lines (the event log, not
    this file, is the record).
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8")
        self._lines: list[str] = []
        self._failing = False
        self._stop = threading.Event()
        threading.Thread(target=self._write_periodically, daemon=True,
                         name="log writer").start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record) + self.terminator)
            if record.levelno >= logging.WARNING:
                self.flush()
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        """Write what waits. A disk that refuses it (full, read-only) loses those lines,
        which the console had too; it is said once on stderr, and the next write may pass."""
        with self.lock:  # type: ignore[union-attr]  # Handler.createLock made it
            lines, self._lines = self._lines, []
            try:
                if lines and self.stream is not None:
                    self.stream.write("".join(lines))
                super().flush()
            except OSError as exc:
                if not self._failing:
                    sys.stderr.write(f"comfy-dual: cannot write {self.baseFilename} "
                                     f"({exc.strerror or exc}); its lines are dropped until "
                                     "it can be written\n")
                self._failing = True
            else:
                self._failing = False

    def close(self) -> None:
        self._stop.set()
        super().close()  # writes what is left

    def _write_periodically(self) -> None:
        while not self._stop.wait(FLUSH_EVERY):
            self.flush()
