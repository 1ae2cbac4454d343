"""Scratch directories of simulated servers: the input, output and temp directories a
simulator was not given live in one, named after the process that made it."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path

SCRATCH_PREFIX = "comfy-sim-"
_SCRATCH_NAME = re.compile(rf"{SCRATCH_PREFIX}(\d+)-")


class Scratch:
    """A simulator's scratch directory in the system temp directory, for the input, output
    and temp directories it was not given. ``remove()`` deletes it (so does garbage
    collection of its owner, or the interpreter's exit). Its name holds this process's id,
    so a simulator killed with SIGKILL leaves a directory the next simulator started on
    this machine recognises as an orphan and deletes (``sweep_orphans``)."""

    def __init__(self, owner: object) -> None:
        sweep_orphans()
        self.path = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
        self._finalizer = weakref.finalize(owner, shutil.rmtree, self.path, ignore_errors=True)

    def remove(self) -> None:
        self._finalizer()

    @property
    def removed(self) -> bool:
        return not self._finalizer.alive


def sweep_orphans(directory: Path | None = None) -> list[Path]:
    """Delete the scratch directories of simulator processes that are gone; returns them."""
    root = Path(directory or tempfile.gettempdir())
    removed = []
    for entry in root.glob(f"{SCRATCH_PREFIX}*"):
        match = _SCRATCH_NAME.match(entry.name)
        if match and entry.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


