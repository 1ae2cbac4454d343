"""``daemon.lock``: one daemon per state directory, enforced by flock."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from statemachine.errors import ComfyDualError


class StateLocked(ComfyDualError):
    """Another daemon owns this state directory."""


class StateLock:
    """Held for the life of the daemon; the kernel drops it if the process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> StateLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateLocked(f"another comfy-dual daemon (pid {holder}) is using "
                              f"{self.path.parent}; stop it or choose another STATE_DIR"
                              ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
