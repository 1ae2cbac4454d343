"""Where the drop folder's directories are, and the rules for the names the daemon gives
the files it moves (``<batch_id>-<name>`` in ``accepted/``, ``<name>`` plus
``<name>.reason`` in ``rejected/``).

Names are handled as bytes: a file name on Linux is any bytes but ``/`` and NUL, not
necessarily UTF-8, and the daemon must never crash on one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from spool import commands
from statemachine.durable import fsync_dir

FORCE_DIR = "force"
REASON_SUFFIX = b".reason"
STALE_TMP_AGE = 3600.0  # seconds after which a file left in a tmp/ folder is a writer's leftover
# Longest name taken from incoming/: leaves room for "<batch_id>-" and ".<n>.reason" within
# the usual 255-byte limit of a file name.
MAX_NAME_BYTES = 200


@dataclass(frozen=True, slots=True)
class SpoolLayout:
    """The spool's directories under ``STATE_DIR/spool``: ``statedir.StateDir.spool``.

    Writers create a file in ``tmp/`` and rename it into ``incoming/`` (or
    ``incoming/force/`` to skip the duplicate check): all of it is one file system, so the
    rename is atomic.
    """

    root: Path

    @classmethod
    def under(cls, state_dir: Path) -> SpoolLayout:
        return cls(Path(os.path.abspath(state_dir)) / "spool")

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def force(self) -> Path:
        return self.incoming / FORCE_DIR

    @property
    def accepted(self) -> Path:
        return self.root / "accepted"

    @property
    def rejected(self) -> Path:
        return self.root / "rejected"

    @property
    def commands(self) -> Path:
        return self.root / "commands"

    def create(self) -> None:
        """Make every directory that is missing, durably (idempotent)."""
        for directory in (self.tmp, self.incoming, self.force, self.accepted, self.rejected,
                          self.commands):
            if not directory.is_dir():
                directory.mkdir(parents=True, exist_ok=True)
                fsync_dir(directory.parent)

    def sweep_tmp(self, now: float, older_than: float = STALE_TMP_AGE) -> list[str]:
        """Remove what writers left in ``tmp/`` and ``commands/tmp/`` (a ``submit.py``
        killed between writing and renaming, an abandoned copy) before ``now -
        older_than``; returns the removed paths, for the log. A file being written now is
        younger than that and stays."""
        removed: list[str] = []
        for directory in (self.tmp, self.commands / commands.TMP_DIR):
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                continue
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False) and \
                            entry.stat(follow_symlinks=False).st_mtime < now - older_than:
                        os.unlink(entry.path)
                        removed.append(display(entry.path))
                except FileNotFoundError:  # its writer renamed or removed it meanwhile
                    continue
        return removed


def display(name: str | bytes) -> str:
    """A file name as printable text: bytes that are not UTF-8 become ``\\xNN`` escapes, so
    the name can go into logs, reason files and JSON."""
    raw = os.fsencode(name)
    return raw.decode("utf-8", errors="backslashreplace")


def plain(name: bytes) -> bytes:
    """``name`` if it is one plain path component; raises ValueError otherwise, so a moved
    file can never land outside its directory."""
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise ValueError(f"not a plain file name: {name!r}")
    return name


def accepted_name(batch_id: str, name: str) -> bytes:
    """``<batch_id>-<name>``; ValueError if the batch id is not a plain name (a bug)."""
    return plain(os.fsencode(batch_id)) + b"-" + os.fsencode(name)


def free_name(directory: Path, name: bytes, *, companion: bytes = b"") -> bytes:
    """``name``, else ``name.1``, ``name.2``, ...: the first that is free in ``directory``
    (together with ``<it><companion>``, e.g. its ``.reason`` file). The daemon is the only
    writer of ``accepted/`` and ``rejected/``, so checking then renaming is safe."""
    base = os.fsencode(directory)
    plain(name)
    candidate, n = name, 0
    while any(os.path.lexists(os.path.join(base, candidate + extra))
              for extra in (b"", companion)):
        n += 1
        candidate = b"%s.%d" % (name, n)
    return candidate
