"""The append-only event log: bytes lines on disk (or in memory for tests), group commit,
torn-tail repair, and snapshots with the segments between them. It knows nothing of
event types; ``events`` does.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

import orjson

from statemachine import failpoints
from statemachine.durable import fsync_dir, write_atomic
from statemachine.errors import LogWriteError

READ_BUFFER = 1 << 20  # bytes read at a time when the log is read through

# The names in a log directory (``LogFiles`` describes them).
LIVE_SEGMENT = "events.jsonl"
SEGMENT_DIR = "segments"
SNAPSHOT_DIR = "snapshots"
LEGACY_SNAPSHOT = "snapshot.json"


class Log(Protocol):
    """What the store needs from a log. ``append`` buffers; ``commit`` makes it durable.

    ``load_snapshot`` chooses the snapshot a replay starts from (the newest whole one);
    ``lines`` are then the committed lines that may follow it, ``history`` every line the
    log still keeps (for reports), and ``locate`` names where a line number of either is.
    ``compact(snapshot, seq)`` makes a snapshot of everything up to ``seq`` durable and
    starts a new segment.

    Implemented by ``EventLog`` (on disk), ``LogReader`` (read-only: writes raise
    PermissionError), ``MemoryLog`` and ``service.metrics.MeteredLog`` (a wrapper);
    tests/test_log_contract.py runs the same tests against each."""

    def lines(self) -> Iterator[tuple[int, bytes]]: ...
    def history(self) -> Iterator[tuple[int, bytes]]: ...
    def locate(self, line_no: int) -> str: ...
    def append(self, line: bytes) -> None: ...
    def commit(self) -> None: ...
    def compact(self, snapshot: bytes, seq: int) -> None: ...
    def load_snapshot(self) -> bytes | None: ...


class LogFiles:
    """The read side of a log directory, shared by the daemon's ``EventLog`` and the
    read-only ``LogReader``::

        events.jsonl                      the live segment (appended to)
        segments/events-<first seq>.jsonl older segments, closed at a snapshot
        snapshots/snapshot-<seq>.json     a header line (seq, size, crc32) and the state
        snapshot.json                     a snapshot written before segments (no header)

    ``load_snapshot`` takes the newest snapshot that passes its checksum; each one that
    does not is skipped and described in ``problems`` (the caller logs them), and the
    replay starts from an older one, or from the first segment. ``lines`` are then the
    segments that may hold events after it, in seq order, and the live one; the store
    skips what the snapshot holds and names any gap in the seqs.

    A reader (``live_fd`` given) opens the live segment before it lists anything: a
    snapshot taken meanwhile renames that very file into ``segments/``, where it is then
    recognised by its inode and read once.
    """

    def __init__(self, directory: Path, live: Path) -> None:
        self.directory = directory
        self.live = live
        self.snapshot_dir = directory / SNAPSHOT_DIR
        self.segment_dir = directory / SEGMENT_DIR
        self.problems: list[str] = []  # snapshots skipped, and why
        self.snapshot_seq = 0  # of the snapshot ``load_snapshot`` returned (0: none)
        self._spans: list[tuple[int, str]] = []  # (first line number, file) as read

    # --- what is on disk -------------------------------------------------------------

    def snapshots(self) -> list[tuple[int, Path]]:
        """(seq, path) of each snapshot, newest first; the legacy one last."""
        found = sorted(_numbered(self.snapshot_dir, "snapshot-", ".json"), reverse=True)
        legacy = self.directory / LEGACY_SNAPSHOT
        return found + ([(-1, legacy)] if legacy.exists() else [])

    def segments(self) -> list[tuple[int, Path]]:
        """(first seq, path) of each closed segment, oldest first."""
        return sorted(_numbered(self.segment_dir, "events-", ".jsonl"))

    # --- reading ---------------------------------------------------------------------

    def load_snapshot(self) -> bytes | None:
        for seq, path in self.snapshots():
            try:
                body, seq = read_snapshot(path) if seq >= 0 else _read_legacy(path)
            except FileNotFoundError:
                continue  # removed by retention while we looked
            except SnapshotDamaged as exc:
                self.problems.append(f"{path.relative_to(self.directory)}: {exc}; ignored, "
                                     "replaying the segments before it instead")
                continue
            self.snapshot_seq = seq
            return body
        self.snapshot_seq = 0
        return None

    def lines(self, live_file: BinaryIO | None = None) -> Iterator[tuple[int, bytes]]:
        """The committed lines that may follow the chosen snapshot, numbered across the
        files they come from (``locate`` names the file and line)."""
        return self._read(self._after(self.snapshot_seq), live_file)

    def history(self, live_file: BinaryIO | None = None) -> Iterator[tuple[int, bytes]]:
        """Every line the log keeps, oldest first."""
        return self._read(self.segments(), live_file)

    def locate(self, line_no: int) -> str:
        for first, name in reversed(self._spans):
            if line_no >= first:
                return f"{name} line {line_no - first + 1}"
        return f"event log line {line_no}"

    def _after(self, seq: int) -> list[tuple[int, Path]]:
        """The segments that hold events after ``seq``: each up to the one before the
        first that starts after ``seq + 1``."""
        segments = self.segments()
        later = [first for first, _ in segments[1:]]
        kept = [s for s, nxt in zip(segments, later, strict=False) if nxt > seq + 1]
        if segments and _last_seq(segments[-1][1]) > seq:  # the last: read its last line
            kept.append(segments[-1])
        return kept

    def _read(self, segments: list[tuple[int, Path]], live_file: BinaryIO | None
              ) -> Iterator[tuple[int, bytes]]:
        self._spans = []
        live_ino = os.fstat(live_file.fileno()).st_ino if live_file is not None else None
        number = 0
        for _, path in segments:
            try:
                f = open(path, "rb", buffering=READ_BUFFER)  # noqa: SIM115 - closed below
            except FileNotFoundError:
                continue  # retention removed it; a gap, if one, is the store's to name
            with f:
                if os.fstat(f.fileno()).st_ino == live_ino:
                    continue  # the live segment this reader opened, renamed since
                self._spans.append((number + 1, f"event log segment {path.name}"))
                last = number
                for last, line in enumerate(f, start=number + 1):
                    yield last, line
                number = last
        self._spans.append((number + 1, "event log"))
        if live_file is not None:
            yield from enumerate(live_file, start=number + 1)
            return
        try:
            f = open(self.live, "rb", buffering=READ_BUFFER)  # noqa: SIM115
        except FileNotFoundError:
            return
        with f:
            yield from enumerate(f, start=number + 1)


class SnapshotDamaged(Exception):
    """A snapshot file that is not whole (its checksum or size disagrees, or no header)."""


def snapshot_bytes(body: bytes, seq: int) -> bytes:
    """A snapshot file: one header line (seq, size and crc32 of the body), then the body."""
    header = b'{"snapshot":1,"seq":%d,"bytes":%d,"crc32":%d}\n' % (seq, len(body),
                                                                  zlib.crc32(body))
    return header + body


def read_snapshot(path: Path) -> tuple[bytes, int]:
    """The body and seq of a snapshot file; SnapshotDamaged unless it is whole."""
    data = path.read_bytes()
    end = data.find(b"\n")
    try:
        if end <= 0:
            raise SnapshotDamaged("no snapshot header")
        header = orjson.loads(data[:end])
        seq, size, crc = header["seq"], header["bytes"], header["crc32"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        raise SnapshotDamaged("no snapshot header") from None
    body = memoryview(data)[end + 1:]
    if len(body) != size:
        raise SnapshotDamaged(f"{len(body):,} bytes where its header says {size:,}")
    if zlib.crc32(body) != crc:
        raise SnapshotDamaged("checksum mismatch: the file changed after it was written")
    return bytes(body), seq


def _read_legacy(path: Path) -> tuple[bytes, int]:
    """``snapshot.json`` as ``compact`` wrote it before segments: the state alone."""
    body = path.read_bytes()
    try:
        return body, int(orjson.loads(body)["seq"])
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError):
        raise SnapshotDamaged("not a snapshot") from None


def _numbered(directory: Path, prefix: str, suffix: str) -> list[tuple[int, Path]]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        number = name[len(prefix):-len(suffix)]
        if name.startswith(prefix) and name.endswith(suffix) and number.isdigit():
            found.append((int(number), directory / name))
    return found


class EventLog:
    """The log directory of ``LogFiles``, written: ``events.jsonl`` appended to, and at
    each ``compact`` a snapshot plus a new segment.

    Opening repairs a torn tail (a last chunk without its newline, left by a crash in the
    middle of a write) and records how many bytes it cut in ``repaired_bytes``.

    The file is written with ``O_DSYNC``: a write returns once its bytes, and the file size
    that makes them readable, are on disk, as after ``fdatasync``. A commit is one write,
    so one system call: the daemon's loop lets go of the GIL once per commit instead of
    three times (write, fsync, and the seek that ``tell`` made), and under load each of
    those cost it a wait to get the GIL back.

    ``retention``: 0 keeps every segment (and the two newest snapshots); n >= 2 keeps the
    n newest snapshots and only the segments after the oldest of them.
    """

    def __init__(self, directory: Path, name: str = LIVE_SEGMENT, *,
                 retention: int = 0) -> None:
        self.path = directory / name
        self.directory = directory
        self.retention = retention
        self.files = LogFiles(directory, self.path)
        directory.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self._fd = _open_for_appends(self.path)
        if created:
            fsync_dir(directory)
        self.repaired_bytes = self._repair_tail()
        self._durable_size = os.fstat(self._fd).st_size
        self._pending: list[bytes] = []

    @property
    def problems(self) -> list[str]:
        return self.files.problems

    def _repair_tail(self) -> int:
        """Cut whatever follows the last line end, however long (a crash in the middle of
        a large write); returns the bytes cut."""
        size = os.fstat(self._fd).st_size
        end = _last_line_end(self.path, size)
        if end == size:
            return 0
        os.ftruncate(self._fd, end)
        os.fsync(self._fd)
        return size - end

    def lines(self) -> Iterator[tuple[int, bytes]]:
        """Every committed line that may follow the snapshot ``load_snapshot`` chose, with
        its number (read 1 MiB at a time: with the default 8 KiB, reading took 0.25 s of a
        1M-line replay instead of 0.15 s)."""
        return self.files.lines()

    def history(self) -> Iterator[tuple[int, bytes]]:
        return self.files.history()

    def locate(self, line_no: int) -> str:
        return self.files.locate(line_no)

    def load_snapshot(self) -> bytes | None:
        return self.files.load_snapshot()

    def append(self, line: bytes) -> None:
        self._pending.append(line)

    def commit(self) -> None:
        """Write what was appended since the last commit, durably, in one write (group
        commit).

        On failure the file is cut back to its last durable size and the lines stay
        pending, so a later commit can succeed without a torn or doubled record.
        """
        if not self._pending:
            return
        data = b"".join(self._pending)
        try:
            if failpoints.armed():
                self._write(data[: len(data) // 2])
                failpoints.hit("mid_append")
                self._write(data[len(data) // 2:])
            else:
                self._write(data)
        except OSError as exc:
            self._roll_back()
            raise LogWriteError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        self._pending.clear()
        self._durable_size += len(data)

    def _write(self, data: bytes) -> None:
        """All of ``data``; a write may take only part of it (a disk filling up): the rest
        goes in the next one, which then meets the error."""
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def _roll_back(self) -> None:
        # If the disk refuses even a truncate, reopening on the next start repairs the tail.
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._durable_size)

    def compact(self, snapshot: bytes, seq: int) -> None:
        """Make ``snapshot`` (the state after ``seq``, everything committed) durable, then
        close the live segment into ``segments/`` and start a new one; then apply the
        retention. Each step is durable before the next: a crash anywhere leaves a
        snapshot and every line after it (a live segment renamed but not yet replaced is
        created empty at the next open)."""
        self.commit()
        self.files.snapshot_dir.mkdir(exist_ok=True)
        write_atomic(self.files.snapshot_dir / f"snapshot-{seq:012d}.json",
                     snapshot_bytes(snapshot, seq))
        failpoints.hit("after_snapshot")
        if self._durable_size:
            self._rotate()
        self._prune()

    def _rotate(self) -> None:
        """The live segment into ``segments/``, a new empty one in its place. The new file
        is made first: whatever fails before the renames leaves the live one as it was."""
        first = _first_seq(self.path)
        self.files.segment_dir.mkdir(exist_ok=True)
        fresh = self.path.with_name(f".{self.path.name}.new")
        fd = _open_for_appends(fresh)
        try:
            os.rename(self.path, self.files.segment_dir / f"events-{first:012d}.jsonl")
        except OSError:
            os.close(fd)
            raise
        os.rename(fresh, self.path)
        fsync_dir(self.files.segment_dir)
        fsync_dir(self.directory)
        os.close(self._fd)
        self._fd, self._durable_size = fd, 0

    def _prune(self) -> None:
        """Snapshots beyond the retention, and segments that only hold events before the
        oldest snapshot kept. Called once the newest snapshot is durable."""
        snapshots = [(s, p) for s, p in self.files.snapshots() if s >= 0]
        keep = max(self.retention, 2)
        for _, path in snapshots[keep:]:
            path.unlink(missing_ok=True)
        legacy = self.directory / LEGACY_SNAPSHOT
        if len(snapshots) >= 2:
            legacy.unlink(missing_ok=True)  # two newer ones stand in for it
        if self.retention and len(snapshots) >= keep:
            oldest = snapshots[keep - 1][0]
            segments = self.files.segments()
            for (_, path), nxt in itertools.pairwise(segments):
                if nxt[0] <= oldest + 1:  # every line of it is in the oldest snapshot kept
                    path.unlink()
        fsync_dir(self.directory)

    def close(self) -> None:
        os.close(self._fd)


class LogReader:
    """A log directory (snapshots, segments and the live segment) as a read-only ``Log``,
    read by the same ``LogFiles`` as ``EventLog``: ``submit.py`` replays the daemon's log
    with it, whether the daemon runs or not.

    The live segment is opened before anything is listed: a snapshot taken meanwhile
    renames that file into ``segments/``, where it is known by its inode and read once
    (as the open file), and the newer snapshot and segments still replay consistently. A
    last line without its newline (a write in progress, or a torn tail the daemon will
    cut) is left out. Nothing is ever written: ``append``, ``commit`` and ``compact``
    raise PermissionError.
    """

    def __init__(self, directory: Path, name: str = LIVE_SEGMENT) -> None:
        self.files = LogFiles(directory, directory / name)
        self._file: BinaryIO | None
        try:
            self._file = open(self.files.live, "rb")  # noqa: SIM115 - closed by close()
        except FileNotFoundError:
            self._file = None

    @property
    def problems(self) -> list[str]:
        return self.files.problems

    def lines(self) -> Iterator[tuple[int, bytes]]:
        return self._whole(self.files.lines(self._live()))

    def history(self) -> Iterator[tuple[int, bytes]]:
        return self._whole(self.files.history(self._live()))

    def _live(self) -> BinaryIO | None:
        if self._file is not None:
            self._file.seek(0)
        return self._file  # None: there was none; read it if it appeared since

    @staticmethod
    def _whole(lines: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
        for number, line in lines:
            if line.endswith(b"\n"):
                yield number, line

    def locate(self, line_no: int) -> str:
        return self.files.locate(line_no)

    def load_snapshot(self) -> bytes | None:
        return self.files.load_snapshot()

    def append(self, line: bytes) -> None:
        raise PermissionError("a LogReader never writes the event log")

    def commit(self) -> None:
        raise PermissionError("a LogReader never writes the event log")

    def compact(self, snapshot: bytes, seq: int) -> None:
        raise PermissionError("a LogReader never writes the event log")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _last_seq(path: Path) -> int:
    """The seq of the last record of a closed segment (0 if it has none, or is gone)."""
    try:
        size = path.stat().st_size
        start = _last_line_end(path, max(0, size - 1))  # the start of its last line
        with open(path, "rb") as f:
            f.seek(start)
            return int(orjson.loads(f.readline())["seq"])
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return 0


def _first_seq(path: Path) -> int:
    """The seq of the first record of a segment (a header field every record has)."""
    with open(path, "rb") as f:
        return int(orjson.loads(f.readline())["seq"])


def _last_line_end(path: Path, size: int, block: int = 65536) -> int:
    """The offset just after the last newline in the first ``size`` bytes (0: none)."""
    with open(path, "rb") as f:
        end = size
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            found = f.read(end - start).rfind(b"\n")
            if found >= 0:
                return start + found + 1
            end = start
    return 0


def _open_for_appends(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_DSYNC | os.O_CLOEXEC,
                   0o666)


class MemoryLog:
    """The same contract in memory. ``crash()`` drops what was not committed; ``compact``
    keeps the closed lines in ``segments`` (all of them: no retention here)."""

    def __init__(self) -> None:
        self.committed: list[bytes] = []  # the live segment
        self.pending: list[bytes] = []
        self.snapshot: bytes | None = None  # the newest snapshot
        self.segments: list[list[bytes]] = []

    def lines(self) -> Iterator[tuple[int, bytes]]:
        yield from enumerate(list(self.committed), start=1)

    def history(self) -> Iterator[tuple[int, bytes]]:
        every = [line for segment in self.segments for line in segment]
        yield from enumerate(every + self.committed, start=1)

    def locate(self, line_no: int) -> str:
        return f"event log line {line_no}"

    def append(self, line: bytes) -> None:
        self.pending.append(line)

    def commit(self) -> None:
        self.committed.extend(self.pending)
        self.pending.clear()

    def crash(self, torn: int = 0) -> None:
        """Lose the uncommitted turn, except its first ``torn`` lines (a torn write)."""
        self.committed.extend(self.pending[:torn])
        self.pending.clear()

    def compact(self, snapshot: bytes, seq: int) -> None:
        self.commit()
        self.snapshot = snapshot
        if self.committed:
            self.segments.append(self.committed)
        self.committed = []

    def load_snapshot(self) -> bytes | None:
        return self.snapshot
