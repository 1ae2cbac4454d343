"""Taking files from the drop folder: scan ``incoming/`` (and ``incoming/force/``) for
complete files, hand them to the loop as :class:`Candidate` s, then move each to
``accepted/`` or ``rejected/`` as the loop decides.

All of it runs on the loop thread, the one writer. The spool refuses on its own what it
can see without the planner (directories, links, FIFOs and other special files, files
over 1 MiB, unreadable files, names that are not UTF-8 or too long); everything else is
the loop's call (``reject`` with the planner's reason, or a duplicate, or ``accept``).

A name starting with ``.`` is a writer's temporary file (rsync, editors): it is left
alone until it is renamed to its real name.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import structlog

from spool.layout import (
    FORCE_DIR,
    MAX_NAME_BYTES,
    REASON_SUFFIX,
    SpoolLayout,
    accepted_name,
    display,
    free_name,
)
from spool.reading import kind_refusal, read_at_most, size_refusal
from spool.settle import Ident, Settle, ident
from spool.watcher import SpoolHint
from statemachine.durable import fsync_dir, write_atomic
from statemachine.planner import MAX_FILE_BYTES

log = structlog.get_logger("comfy_dual.spool")

SCAN_LIMIT = 500
SCAN_BYTES = 32 * 1024 * 1024  # file data one scan may read (500 files of 1 MiB is too much)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A complete prompt file, read. ``name`` is its file name (what the plan records as
    ``source``); ``force`` is set for files from ``incoming/force/`` (skip the duplicate
    check)."""

    path: Path
    name: str
    data: bytes = field(repr=False)
    sha256: str
    force: bool
    ident: Ident = field(repr=False)  # the file as read: moved only if still the same


@dataclass(frozen=True, slots=True)
class _Entry:
    path: str
    name: str
    force: bool
    st: os.stat_result


class DropFolder:
    """The drop folder, seen from the loop thread.

    Per turn: ``note`` each :class:`SpoolHint` from the inbox; if ``due(now)``, ``scan``;
    decide each candidate and ``reject`` it, or ``accept_all`` once its batch is durably
    recorded. ``now`` is wall-clock time (``time.time()``): it is compared with mtimes.
    """

    def __init__(self, layout: SpoolLayout, *, settle: float = 0.5,
                 writer_timeout: float = 60.0, rescan_interval: float = 2.0,
                 max_bytes: int = MAX_FILE_BYTES, scan_bytes: int = SCAN_BYTES) -> None:
        self.layout = layout
        self.rescan_interval = rescan_interval
        self.max_bytes = max_bytes
        self.scan_bytes = scan_bytes
        self._settle = Settle(settle, writer_timeout)
        self._stuck: dict[str, Ident] = {}  # could not be moved: skipped until it changes
        self._dirty = True  # the start-up scan
        self._last_scan = -math.inf
        self._waiting_until = math.inf  # the first moment a waiting entry may be complete

    # --- when to scan --------------------------------------------------------------------

    def note(self, hint: SpoolHint) -> None:
        """Take in what the watcher saw; the next turn scans."""
        self._settle.note(hint)
        self._dirty = True

    @property
    def next_scan_at(self) -> float:
        """When ``scan`` next has something to do (``-inf``: now): after a hint, when the
        last scan stopped at its limit, when a waiting file may have settled, and every
        ``rescan_interval`` seconds in case events were lost. For the loop's wait."""
        if self._dirty:
            return -math.inf
        return min(self._waiting_until, self._last_scan + self.rescan_interval)

    def due(self, now: float) -> bool:
        return now >= self.next_scan_at or now < self._last_scan  # (or the clock went back)

    # --- scanning --------------------------------------------------------------------------

    def scan(self, now: float, *, limit: int = SCAN_LIMIT) -> list[Candidate]:
        """Complete files, oldest first (mtime, then name), at most ``limit`` of them
        (refusals count too). Each must be accepted or rejected before the next scan, or
        it is offered again."""
        entries = self._entries()
        self._forget_all_but({e.path for e in entries})
        self._dirty, self._last_scan, self._waiting_until = False, now, math.inf
        taken: list[Candidate] = []
        handled, budget = 0, self.scan_bytes
        for entry in entries:
            if handled >= limit or budget <= 0:
                self._dirty = True  # more may be complete: the next turn goes on
                break
            if self._ready(entry, now):
                handled += 1
                candidate = self._take(entry, now)
                if candidate is not None:
                    taken.append(candidate)
                    budget -= len(candidate.data)
        return taken

    def _entries(self) -> list[_Entry]:
        found = [*_listing(self.layout.incoming, force=False),
                 *_listing(self.layout.force, force=True)]
        found.sort(key=lambda e: (e.st.st_mtime_ns, e.name))
        return found

    def _forget_all_but(self, present: set[str]) -> None:
        self._settle.prune(present)
        for path in self._stuck.keys() - present:
            del self._stuck[path]

    def _ready(self, entry: _Entry, now: float) -> bool:
        if self._stuck.get(entry.path) == ident(entry.st):
            return False
        at = self._settle.ready_at(entry.path, entry.st, now)
        if at > now:
            self._waiting_until = min(self._waiting_until, at)
        return at <= now

    def _take(self, entry: _Entry, now: float) -> Candidate | None:
        """The entry read as a candidate, or None: refused (and moved), or changed or gone
        since it was listed (the next scan looks again)."""
        why = _refusal(entry, self.max_bytes)
        if why is None:
            try:
                return _read(entry)
            except FileNotFoundError:
                return None
            except OSError as exc:
                why = f"cannot be read: {exc.strerror or exc}"
        self._reject(entry.path, ident(entry.st), entry.force, why, now)
        return None

    # --- moving ----------------------------------------------------------------------------

    def accept_all(self, items: Iterable[tuple[Candidate, str]]) -> list[Path | None]:
        """Move each candidate to ``accepted/<batch_id>-<name>``, then fsync the
        directories once. Call it only once the batches are durably recorded. None for a
        file that changed since it was read (it is offered again) or could not be moved.

        After a crash between recording a batch and this move, the file is still in
        ``incoming/``: the loop finds it recorded (the same inode, size and mtime) and
        calls this for the recorded batch, recording nothing new."""
        named = [(c, accepted_name(batch_id, c.name)) for c, batch_id in items]
        moved = [self._move(str(c.path), c.ident, self.layout.accepted, name)
                 if _unchanged(c) else None for c, name in named]
        if any(moved):
            self._sync(self.layout.accepted, self.layout.incoming, self.layout.force)
        return moved

    def accept(self, candidate: Candidate, batch_id: str) -> Path | None:
        return self.accept_all([(candidate, batch_id)])[0]

    def reject(self, entry: Candidate | Path, reason: str, now: float) -> Path | None:
        """Move a candidate (or any entry of incoming/) to ``rejected/`` with a
        ``<name>.reason`` file saying why and when. None if it changed since it was read
        (it is offered again) or could not be moved."""
        if isinstance(entry, Candidate):
            if not _unchanged(entry):
                return None
            return self._reject(str(entry.path), entry.ident, entry.force, reason, now)
        try:
            key = ident(os.lstat(entry))
        except OSError:
            return None
        return self._reject(str(entry), key, entry.parent == self.layout.force, reason, now)

    def _reject(self, path: str, key: Ident, force: bool, reason: str, now: float
                ) -> Path | None:
        name = os.fsencode(os.path.basename(path))
        target = self._move(path, key, self.layout.rejected, name[:MAX_NAME_BYTES],
                            companion=REASON_SUFFIX)
        if target is None:
            return None
        where = f"incoming/{FORCE_DIR}/" if force else "incoming/"
        when = datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds")
        text = f"{reason}\nrejected {when} from {where}{display(name)}\n"
        try:
            write_atomic(Path(os.fsdecode(os.fsencode(target) + REASON_SUFFIX)),
                         text.encode())
        except OSError as exc:
            log.error("❌ cannot write the reason file", file=display(target.name),
                      error=str(exc))
        log.warning("🚫 prompt file rejected", file=display(name), reason=reason,
                    moved_to=display(target.name))
        return target

    def _move(self, path: str, key: Ident, directory: Path, name: bytes, *,
              companion: bytes = b"") -> Path | None:
        """Rename ``path`` into ``directory`` under a free variant of ``name``. A failure
        is logged and the entry left alone until it changes: a bad file never stops the
        daemon, and one that cannot be moved is not read again every turn."""
        try:
            final = free_name(directory, name, companion=companion)
            target = os.path.join(os.fsencode(directory), final)
            os.rename(path, target)
        except OSError as exc:
            self._stuck[path] = key
            log.error("❌ cannot move a spool file; left in place until it changes",
                      file=display(os.path.basename(path)), to=str(directory), error=str(exc))
            return None
        return Path(os.fsdecode(target))

    @staticmethod
    def _sync(*directories: Path) -> None:
        for directory in directories:
            try:
                fsync_dir(directory)
            except OSError as exc:
                log.error("❌ cannot fsync a spool directory", directory=str(directory),
                          error=str(exc))


# --- helpers -------------------------------------------------------------------------------


def _listing(directory: Path, *, force: bool) -> Iterator[_Entry]:
    """The entries of one spool directory (lstat, never following links), minus dot names
    and, in incoming/, the force/ directory itself."""
    try:
        with os.scandir(directory) as found:
            for d in found:
                if d.name.startswith("."):
                    continue
                try:
                    st = d.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                force_dir = not force and d.name == FORCE_DIR and stat.S_ISDIR(st.st_mode)
                if not force_dir:
                    yield _Entry(d.path, d.name, force, st)
    except OSError as exc:
        log.error("❌ cannot list a spool directory", directory=str(directory),
                  error=str(exc))


def _refusal(entry: _Entry, max_bytes: int) -> str | None:
    """Why the spool refuses the entry without reading it, or None."""
    raw = os.fsencode(entry.name)
    why = kind_refusal(entry.st.st_mode)
    if why is not None:
        return why
    if not _is_utf8(raw):
        return "the file name is not valid UTF-8: rename it"
    if len(raw) > MAX_NAME_BYTES:
        return f"the file name is {len(raw)} bytes long, at most {MAX_NAME_BYTES}: shorten it"
    return size_refusal(entry.st.st_size, max_bytes)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _read(entry: _Entry) -> Candidate | None:
    """Read a regular file that was complete when listed; None if it is no longer that
    file, or changed while being read. Never blocks: O_NONBLOCK in case a FIFO took its
    place, O_NOFOLLOW in case a link did."""
    fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        before = os.fstat(fd)
        if kind_refusal(before.st_mode) or ident(before) != ident(entry.st):
            return None
        data = read_at_most(fd, before.st_size + 1)  # one more byte: a file still growing
        if len(data) != before.st_size or ident(os.fstat(fd)) != ident(before):
            return None
    finally:
        os.close(fd)
    return Candidate(Path(entry.path), entry.name, data, hashlib.sha256(data).hexdigest(),
                     entry.force, ident(before))


def _unchanged(c: Candidate) -> bool:
    """Whether ``c.path`` is still the file that was read (not replaced or rewritten)."""
    try:
        return ident(os.lstat(c.path)) == c.ident
    except OSError:
        return False
