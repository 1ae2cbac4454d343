"""Files that appear whole: write aside, rename into place, and (when it must survive a
power cut) fsync the file and its directory.

Every file comfy-dual replaces or publishes goes through ``write_atomic``: snapshots,
command files and replies, reason files, prompt files handed to the spool, reports,
``status.json`` and fetched outputs. What each needs:

* durable (``fsync=True``, the default): the bytes are on disk before the rename, and the
  rename is on disk before this returns. Snapshots, the spool and command files.
* atomic only (``fsync=False``): a reader sees the old file or the new one, whole, but a
  crash may lose the new one. ``status.json`` (rebuilt from the log) and fetched outputs
  (fetched again if missing).
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a created, renamed or removed name in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, tmp: Path | None = None, fsync: bool = True,
                 make_dirs: bool = False) -> None:
    """Write ``data`` to ``tmp`` (default ``.<name>.tmp`` beside ``path``), then rename it
    to ``path``: readers see no file or the old one, or the new one whole.

    ``tmp`` may be in another directory of the same file system (a spool's ``tmp/``, so
    that a watcher of ``path``'s directory sees only whole files); its name must be the
    caller's own: a file there is overwritten, and removed if the write fails.
    ``fsync``: make the file and the rename durable before returning (see the module).
    ``make_dirs``: create the directories of ``tmp`` and ``path`` first if missing."""
    tmp = path.with_name(f".{path.name}.tmp") if tmp is None else tmp
    if make_dirs:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, path)  # replaces an existing ``path`` atomically (POSIX)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)
