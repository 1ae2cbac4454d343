"""What the status page shows, built on the loop thread and handed to the web thread.

Each time the loop writes ``status.json`` it calls ``Publisher.publish``, which builds a
``Board``: plain, immutable data (JSON bytes, a chart of frozen copies, the gauges). The
web thread only ever reads the latest board; it never sees the store or the event log.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from service.metrics import Gauges, Metrics, reason_class
from service.report import Chart, chart
from statedir import StateDir
from statemachine import events as ev
from statemachine.errors import CorruptLog
from statemachine.job import BATCH_FINAL, Batch
from statemachine.log import LogFiles
from statemachine.plan import JobKind, job_id
from statemachine.store import Store
from statemachine.timeline import Timeline, TimelineFold

if TYPE_CHECKING:
    from service.loop import Loop

log = structlog.get_logger("comfy_dual.board")

GANTT_HOURS = 3.0  # the page's Gantt shows batches open or ended this recently
GANTT_BATCHES = 40  # ... at most this many, the latest
GRID_ENDED = 20  # the page's grid shows open batches and this many ended ones
REJECTED_SHOWN = 50  # the latest rejected files listed on the page
VIDEOS_SHOWN = 50  # the finished videos of this many latest batches
HISTORY_BYTES = 2 << 20  # the Gantt's past: this much of the log's end, read at its first chart
KINDS = tuple(kind.value for kind in JobKind)


@dataclass(frozen=True, slots=True)
class Board:
    """One published state of the farm. ``version`` grows with every publish."""

    version: int
    status: bytes  # the status view as JSON: the bytes status.json holds
    page: bytes  # what the page draws, as JSON
    chart: Chart | None  # the Gantt's data (frozen copies); None: nothing ran yet
    gauges: Gauges


class Grids:
    """Each batch's progress grid, rebuilt only when an event touched the batch."""

    def __init__(self) -> None:
        self._grids: dict[str, dict[str, Any]] = {}
        self._stale: set[str] = set()

    def touch(self, batch_id: str) -> None:
        self._stale.add(batch_id)

    def shown(self, store: Store) -> list[dict[str, Any]]:
        """Open batches and the latest GRID_ENDED ended ones, oldest first."""
        ended = [b for b in store.batches.values() if b.state in BATCH_FINAL][-GRID_ENDED:]
        keep = {b.batch_id for b in ended} | {b.batch_id for b in store.open_batches()}
        for batch_id in keep & (self._stale | (keep - self._grids.keys())):
            self._grids[batch_id] = grid(store.batches[batch_id])
        self._stale -= keep
        for batch_id in self._grids.keys() - keep:
            del self._grids[batch_id]
        return [self._grids[b] for b in store.batches if b in keep]


def grid(batch: Batch) -> dict[str, Any]:
    """A batch's jobs as rows of chunks: ``{"chunk": k, "HIGH": {...}, ...}``."""
    rows: dict[int, dict[str, Any]] = {}
    for job in batch.jobs:
        row = rows.setdefault(job.spec.chunk, {"chunk": job.spec.chunk})
        row[job.kind.value] = {"job_id": job.job_id, "state": job.state.value,
                               "instance_id": job.instance_id, "error": job.error}
    if batch.summary is not None:  # done: every job succeeded; only the last one's server is kept
        chunks = batch.summary.jobs // len(JobKind)
        for k in range(1, chunks + 1):
            rows[k] = {"chunk": k} | {kind.value: {
                "job_id": job_id(batch.batch_id, kind, k), "state": "succeeded",
                "instance_id": batch.final_instance if (kind, k) == (JobKind.COMBINE, chunks)
                else None, "error": None} for kind in JobKind}
    return {"batch_id": batch.batch_id, "name": batch.plan.name, "state": batch.state.value,
            "reason": batch.reason, "chunks": [rows[k] for k in sorted(rows)]}


class Rejected:
    """The files in ``spool/rejected/`` with their reasons, read again only when the
    directory changed, and only the reason files not read before."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._seen: dict[str, dict[str, Any]] = {}
        self._mtime: int | None = None

    def refresh(self) -> None:
        try:
            mtime = os.stat(self.directory).st_mtime_ns
        except OSError:
            return
        if mtime == self._mtime:
            return
        self._mtime = mtime
        names = {e.name for e in os.scandir(self.directory) if e.name.endswith(".reason")}
        for name in names - self._seen.keys():
            entry = self._read(self.directory / name)
            if entry is not None:
                self._seen[name] = entry
        for name in self._seen.keys() - names:
            del self._seen[name]

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            with open(path, "rb") as f:
                text = f.read(4096).decode(errors="replace")
            when = os.stat(path).st_mtime
        except OSError:
            return None
        reason = text.split("\n", 1)[0]
        return {"file": path.name.removesuffix(".reason"), "reason": reason,
                "class": reason_class(reason), "at": when}

    def counts(self) -> dict[str, int]:
        return dict(Counter(e["class"] for e in self._seen.values()))

    def latest(self) -> list[dict[str, Any]]:
        return sorted(self._seen.values(), key=lambda e: e["at"], reverse=True)[:REJECTED_SHOWN]


class Gantt:
    """The timeline of recent batches, folded from the events as they are recorded."""

    def __init__(self, history: Path | None) -> None:
        self.fold = TimelineFold()
        self.changed = True
        self._pruned = float("-inf")
        self._history = history
        self._since_start: list[ev.Recorded] | None = []  # held until the history is read

    def add(self, rec: ev.Recorded) -> None:
        if self._since_start is not None:
            self._since_start.append(rec)
        else:
            self.fold.add(rec)
        self.changed = True

    def _load(self) -> None:
        """Start from the last HISTORY_BYTES of the event log: the batches accepted there
        (a restart reads a bounded amount whatever the log's length). Read at the first
        chart, not at start: reading it delayed a restarted daemon's first dispatch by a
        third of a second; the events recorded since the start follow it in order."""
        held, self._since_start = self._since_start or [], None
        seen = held[0].seq if held else None
        try:
            past = history_files(self._history) if self._history else []
            for rec in tail_records(past, HISTORY_BYTES):
                if seen is not None and rec.seq >= seen:
                    break
                self.fold.add(rec)
        except (OSError, CorruptLog) as exc:
            log.warning("⚠️ the page's Gantt starts now: cannot read the event log's past",
                        error=str(exc))
        for rec in held:
            self.fold.add(rec)

    def chart(self, now: float) -> Chart | None:
        """A chart of frozen copies of the batches shown, ended at ``now``."""
        if self._since_start is not None:
            self._load()
        if now - self._pruned > 60:
            self.fold.forget_ended_before(now - GANTT_HOURS * 3600)
            self._pruned = now
        tl = self.fold.timeline
        ids = [b for b, span in tl.batches.items()
               if span.ended_at is None or span.ended_at >= now - GANTT_HOURS * 3600]
        ids = ids[-GANTT_BATCHES:]
        if not ids:
            return None
        mine = set(ids)
        copy = Timeline(
            attempts=[dataclasses.replace(a) for a in tl.attempts if a.batch_id in mine],
            batches={b: dataclasses.replace(tl.batches[b]) for b in ids},
            gates={b: t for b, t in tl.gates.items() if b in mine})
        self.changed = False
        return chart(copy, ids, now)


class Publisher:
    """Builds a ``Board`` each time the loop writes its status, and keeps the last one."""

    def __init__(self, loop: Loop, metrics: Metrics, last_snapshot_seq: Any) -> None:
        self.loop = loop
        self.metrics = metrics
        self.last_snapshot_seq = last_snapshot_seq  # () -> int
        self.board: Board | None = None
        self.grids = Grids()
        self.rejected = Rejected(StateDir(loop.settings.state_dir).spool.rejected)
        self.gantt = Gantt(getattr(loop.store.log, "path", None))
        self._chart: Chart | None = None
        self._failing = False
        loop.store.listeners.append(self._on_event)

    def _on_event(self, rec: ev.Recorded, subject: Any) -> None:
        self.gantt.add(rec)
        batch_id = getattr(rec.event, "batch_id", None) or getattr(
            getattr(subject, "batch", None), "batch_id", None)
        if batch_id is not None:
            self.grids.touch(batch_id)

    def publish(self, view: Mapping[str, Any], now: float) -> None:
        """Called by the loop (its thread) with the status view it just wrote. Whatever
        goes wrong here is logged and the page stays as it was: it never stops the loop."""
        try:
            self._publish(view, now)
        except Exception as exc:  # the page is not worth a render farm
            if not self._failing:
                log.exception("❌ cannot update the status page; rendering goes on",
                              error=str(exc))
            self._failing = True
        else:
            self._failing = False

    def _publish(self, view: Mapping[str, Any], now: float) -> None:
        loop = self.loop
        self.rejected.refresh()
        flying = Counter(j.instance_id for j in loop.store.in_flight.values())
        gauges = self.metrics.gauges_of(
            loop.store, {i.instance_id: flying[i.instance_id] for i in loop.settings.instances},
            busy_seconds=loop.busy.seconds(now), rejected=self.rejected.counts(),
            last_snapshot_seq=self.last_snapshot_seq())
        if self.gantt.changed or loop.store.in_flight or self._chart is None:
            self._chart = self.gantt.chart(now)
        version = self.board.version + 1 if self.board is not None else 1
        page = {"version": version, "updated_at": now, "status": view,
                "grids": self.grids.shown(loop.store),
                "videos": videos(view["batches"], loop.outputs_dir),
                "rejected": self.rejected.latest(), "rejected_counts": self.rejected.counts(),
                "gantt": self._chart is not None}
        self.metrics.gauges = gauges
        self.board = Board(version, orjson.dumps(view), orjson.dumps(page), self._chart,
                           gauges)


def videos(batches: Iterable[Mapping[str, Any]], outputs_dir: Path) -> list[dict[str, Any]]:
    """The finished videos saved here, newest batch first, as links under /outputs/."""
    found = []
    done = [b for b in batches if b["state"] == "done"]
    for batch in done[-VIDEOS_SHOWN:]:
        for saved in batch.get("saved_outputs", []):
            path = Path(saved)
            if path.is_file():
                found.append({"batch_id": batch["batch_id"], "name": batch["name"],
                              "file": path.name,
                              "url": "/outputs/" + path.relative_to(outputs_dir).as_posix()})
    return found[::-1]


def tail_records(paths: Sequence[Path], limit: int) -> Iterator[ev.Recorded]:
    """The records of the last ``limit`` bytes of a log kept in ``paths`` (its segments,
    oldest first, then the live one): from the first whole line there, to the last line
    that ends in a newline."""
    parts: list[tuple[Path, int]] = []
    for path in reversed(paths):
        size = path.stat().st_size
        parts.append((path, max(0, size - limit)))
        limit -= size
        if limit <= 0:
            break
    for path, start in reversed(parts):
        with open(path, "rb") as f:
            if start > 0:
                f.seek(start - 1)
                f.readline()  # the end of a line begun before the tail
            for line in f:
                if line.endswith(b"\n"):
                    yield ev.decode(line)


def history_files(live: Path) -> list[Path]:
    """The event log's closed segments, oldest first, then its live segment: after a
    snapshot (each clean stop takes one) the recent past is in the last segment."""
    return [path for _, path in LogFiles(live.parent, live).segments()] + [live]
