"""When an entry of ``incoming/`` is complete, so it may be read without catching a writer
half-way.

An entry is complete

1. at once, when a ``COMPLETE`` hint (renamed in, or closed after writing) was seen for it
   and it has not changed since (same inode, size and mtime);
2. otherwise once it has been quiet for ``settle`` seconds: its mtime is that old, or
   (mtime in the future: clock trouble) the daemon has seen it unchanged that long. This
   covers files found by a scan with no hint: dropped while the daemon was down, or whose
   events were lost;
3. except a regular file being written in place (a ``WRITING`` hint and no close since):
   it waits for its close, or for ``writer_timeout`` quiet seconds if the close never
   comes (a writer holding the file open but silent, a lost event). So a person typing
   into ``cat > incoming/x`` is not cut off at their first pause.

The loop thread owns this object; the watcher's hints reach it through the loop's inbox.
"""

from __future__ import annotations

import math
import os
import stat

from spool.watcher import HintKind, SpoolHint

Ident = tuple[int, int, int]  # inode, size, mtime (ns): "the same file, unchanged"


def ident(st: os.stat_result) -> Ident:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class Settle:
    """The completeness rules above, with what the hints said about each path."""

    def __init__(self, settle: float, writer_timeout: float) -> None:
        self.settle = settle
        self.writer_timeout = writer_timeout
        self._complete: dict[str, Ident] = {}  # path -> the entry when it was complete
        self._writing: set[str] = set()
        self._seen: dict[str, tuple[Ident, float]] = {}  # path -> (entry, unchanged since)

    def note(self, hint: SpoolHint) -> None:
        if hint.kind is HintKind.RESCAN:
            self._writing.clear()  # their closes may be among the lost events
        elif hint.kind is HintKind.WRITING:
            self._writing.add(hint.path)
            self._complete.pop(hint.path, None)
        else:
            try:
                st = os.lstat(hint.path)
            except OSError:
                return  # gone already (taken by an earlier scan, or removed)
            self._writing.discard(hint.path)
            self._complete[hint.path] = ident(st)

    def ready_at(self, path: str, st: os.stat_result, now: float) -> float:
        """When the entry ``path`` (``st`` from lstat) is complete: ``<= now`` means now."""
        key = ident(st)
        if self._complete.get(path) == key:
            return -math.inf
        writing = path in self._writing and stat.S_ISREG(st.st_mode)
        return self._quiet_since(path, key, st.st_mtime, now) + (
            self.writer_timeout if writing else self.settle)

    def _quiet_since(self, path: str, key: Ident, mtime: float, now: float) -> float:
        if mtime <= now:
            return mtime
        seen = self._seen.get(path)
        if seen is None or seen[0] != key or seen[1] > now:
            seen = self._seen[path] = (key, now)
        return seen[1]

    def prune(self, present: set[str]) -> None:
        """Forget entries no longer in the spool."""
        for table in (self._complete, self._seen):
            for path in table.keys() - present:
                del table[path]
        self._writing &= present
