"""Fetching files from a server that wrote them (a finished video, a job's input), a few
times at most: a server that told on the stream that a job is done does not prove its
HTTP side answers (busy, failing for a while, restarting)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import structlog

from instances.artifacts import OutputFile, save_files
from statemachine.errors import ComfyDualError

log = structlog.get_logger("comfy_dual.instances")

FETCH_ATTEMPTS = 3  # tries to fetch a file (a finished video, a job's input) from a server
FETCH_RETRY_WAIT = 1.0  # seconds before the second try, twice that before the third


@dataclass(frozen=True, slots=True)
class Tries:
    """The tries of one fetch: FETCH_ATTEMPTS at most, none more once ``stopping``."""

    stopping: threading.Event

    @staticmethod
    def attempts() -> range:
        return range(1, FETCH_ATTEMPTS + 1)

    def again(self, attempt: int) -> bool:
        """After the failed try number ``attempt``, wait for the next one; False if there
        is none (that was the last try, or the agent is stopping)."""
        return attempt < FETCH_ATTEMPTS and not self.stopping.wait(FETCH_RETRY_WAIT * attempt)


class OutputFetcher:
    """Saves finished batches' files on the ``executor``'s threads, read with
    ``download``; ``drain`` waits for those still being saved."""

    def __init__(self, instance_id: str, download: Callable[[OutputFile], bytes],
                 executor: Executor, tries: Tries) -> None:
        self.instance_id = instance_id
        self._download = download
        self._executor = executor
        self._tries = tries
        self._lock = threading.Lock()
        self._fetching: set[futures.Future[None]] = set()  # finished videos being saved

    def fetch(self, batch_id: str, files: Sequence[OutputFile], outputs_dir: Path) -> None:
        """Save ``files`` under ``outputs_dir/<batch_id>/`` (on an executor thread)."""
        future = self._executor.submit(self._save, batch_id, files, outputs_dir)
        with self._lock:
            self._fetching = {f for f in self._fetching if not f.done()} | {future}

    def drain(self, timeout: float) -> None:
        """Wait (up to ``timeout`` seconds) for finished videos still being fetched."""
        with self._lock:
            pending = list(self._fetching)
        futures.wait(pending, timeout=timeout)

    def _save(self, batch_id: str, files: Sequence[OutputFile], outputs_dir: Path) -> None:
        for attempt in self._tries.attempts():
            try:
                saved = save_files(files, self._download, outputs_dir, batch_id)
            except (ComfyDualError, OSError) as exc:
                log.warning("⚠️ could not fetch the finished video", batch=batch_id,
                            instance=self.instance_id, attempt=attempt, error=str(exc),
                            on_server=[f.relative for f in files])
                if not self._tries.again(attempt):
                    return
                continue
            log.info("🎞️ finished video saved", batch=batch_id, files=[str(p) for p in saved])
            return
