"""The watchdog side of the spool: turns file-system events on ``incoming/`` and
``incoming/force/`` into small :class:`SpoolHint` messages for the loop.

Everything here runs on watchdog's threads, so it only *posts*: it never reads, decides
or moves a file. Hints are hints: the loop's scans are the truth, and a lost event only
costs latency (the next periodic scan finds the file).

Which events say what (inotify, watchdog's "full events" mode):

* a move into the directory (``os.rename`` from ``tmp/``, or a rename inside it) is a
  ``FileMovedEvent`` with that destination: the file arrived whole -> ``COMPLETE``;
* a file created or modified in place -> ``WRITING``; its close after writing
  (``IN_CLOSE_WRITE``) -> ``COMPLETE``;
* the kernel queue overflowed (events lost; watchdog only logs a warning) -> ``RESCAN``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from types import TracebackType

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
    FileSystemMovedEvent,
)
from watchdog.observers.inotify import InotifyObserver

from spool.layout import SpoolLayout

OVERFLOW_LOGGER = "watchdog.observers.inotify_c"
OVERFLOW_MESSAGE = "Inotify queue overflowed"
# Only what a hint is made of: no open/close-without-write events (the daemon's own reads
# would wake it up), no deletions.
_EVENTS = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent,
           DirCreatedEvent, DirMovedEvent]


class HintKind(Enum):
    COMPLETE = "complete"  # arrived by rename, or closed after writing
    WRITING = "writing"    # created or modified in place: wait for its close
    RESCAN = "rescan"      # events were lost: look at everything again


@dataclass(frozen=True, slots=True)
class SpoolHint:
    """What the watcher saw; the loop hands it to ``DropFolder.note``."""

    kind: HintKind
    path: str = ""


def hint_for(event: FileSystemEvent) -> SpoolHint | None:
    """The hint a watchdog event gives, or None if it says nothing useful."""
    if isinstance(event, FileSystemMovedEvent):
        kind, path = HintKind.COMPLETE, os.fsdecode(event.dest_path)
    elif isinstance(event, FileClosedEvent):
        kind, path = HintKind.COMPLETE, os.fsdecode(event.src_path)
    elif isinstance(event, (FileCreatedEvent, FileModifiedEvent, DirCreatedEvent)):
        kind, path = HintKind.WRITING, os.fsdecode(event.src_path)
    else:
        return None
    # No destination: moved out. A dot name: a writer's temporary file, never taken.
    if not path or os.path.basename(path).startswith("."):
        return None
    return SpoolHint(kind, path)


class _EventHints(FileSystemEventHandler):
    """Hints for entries of the watched folders only (the watch covers all of spool/)."""

    def __init__(self, notify: Callable[[SpoolHint], None], folders: set[str]) -> None:
        self._notify = notify
        self._folders = folders

    def on_any_event(self, event: FileSystemEvent) -> None:
        hint = hint_for(event)
        if hint is not None and os.path.dirname(hint.path) in self._folders:
            self._notify(hint)


class _OverflowHints(logging.Handler):
    """watchdog reports a kernel queue overflow only as a log warning: listen for it."""

    def __init__(self, notify: Callable[[SpoolHint], None]) -> None:
        super().__init__(logging.WARNING)
        self._notify = notify

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(OVERFLOW_MESSAGE):
            self._notify(SpoolHint(HintKind.RESCAN))


class SpoolWatcher:
    """Watches the spool (inotify, Linux) and calls ``notify`` with a :class:`SpoolHint`
    for what happens in ``incoming/`` and ``incoming/force/``, from watchdog's threads.
    Start it before the first scan, so nothing that arrives during that scan goes
    unnoticed."""

    def __init__(self, layout: SpoolLayout, notify: Callable[[SpoolHint], None]) -> None:
        self._layout = layout
        self._notify = notify
        self._overflow = _OverflowHints(notify)
        self._observer: InotifyObserver | None = None

    def start(self) -> None:
        """Raises OSError if inotify cannot watch (e.g. the watch limit is reached); the
        loop's periodic scans still find every file then, only later."""
        observer = InotifyObserver(generate_full_events=True)
        folders = {str(self._layout.incoming), str(self._layout.force)}
        try:
            # One recursive watch on all of spool/, not one per folder: the daemon moves
            # files from incoming/ to accepted/, and a move whose destination is not in the
            # same watch arrives unpaired, which watchdog holds back for 0.5 s, delaying
            # every event queued behind it. In one watch the move pairs at once.
            observer.schedule(_EventHints(self._notify, folders), str(self._layout.root),
                              recursive=True, event_filter=_EVENTS)
            observer.start()
        except OSError:
            observer.stop()  # its inotify reader thread runs from construction
            raise
        self._observer = observer
        logger = logging.getLogger(OVERFLOW_LOGGER)
        logger.addHandler(self._overflow)
        if not logger.isEnabledFor(logging.WARNING):
            logger.setLevel(logging.WARNING)

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None
        logging.getLogger(OVERFLOW_LOGGER).removeHandler(self._overflow)

    def __enter__(self) -> SpoolWatcher:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
