"""The loop's side of the event log: one group commit per turn, a pause while the disk
refuses it, and a snapshot every SNAPSHOT_EVERY events."""

from __future__ import annotations

import time

import structlog

from statemachine.errors import LogWriteError
from statemachine.store import Store

log = structlog.get_logger("comfy_dual.loop")


class Journal:
    def __init__(self, store: Store, snapshot_every: int) -> None:
        self.store = store
        self.snapshot_every = snapshot_every
        self.error: str | None = None  # why the event log cannot be written, if so
        self._next_snapshot = store.snapshot_seq + snapshot_every

    def commit(self) -> bool:
        """Group commit. While the log cannot be written (disk full, read-only), keep the
        events pending and say so (once); False until it works again."""
        try:
            self.store.commit()
        except LogWriteError as exc:
            if self.error is None:
                log.error("🛑 cannot write the event log: dispatch stopped until it can",
                          error=str(exc))
            self.error = str(exc)
            return False
        if self.error is not None:
            log.info("✅ event log writable again: dispatch resumes")
            self.error = None
        return True

    def snapshot_if_due(self) -> None:
        if self.store.seq >= self._next_snapshot:
            self.snapshot()

    def snapshot(self) -> None:
        """Write a snapshot and start a new log segment (between turns, never inside a
        group commit). A disk that refuses it is reported and the snapshot tried again
        after a tenth of SNAPSHOT_EVERY more events: the log itself still holds it all."""
        every = self.snapshot_every
        began = time.perf_counter()
        try:
            self.store.compact()
        except (LogWriteError, OSError) as exc:
            log.warning("⚠️ cannot write a snapshot of the event log; a restart replays "
                        "more until one is written", error=str(exc))
            self._next_snapshot = self.store.seq + max(1, every // 10)
            return
        self._next_snapshot = self.store.seq + every
        log.info("📸 snapshot written, new event-log segment", seq=self.store.seq,
                 ms=round((time.perf_counter() - began) * 1000, 1))
