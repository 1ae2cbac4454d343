"""Intake, from a dropped file to a recorded batch: how soon a prompt file renamed into
``spool/incoming/`` is a recorded batch, and how long the daemon takes to swallow a backlog
of 10,000 files.

Run from the repository root (not part of the test suite)::

    .venv/bin/python bench/drop_to_batch.py             # a report
    .venv/bin/python bench/drop_to_batch.py --json      # {"p50_ms", "p99_ms", "take_10k_s",
                                                        #  "missed", ...} for scripts
    .venv/bin/python bench/drop_to_batch.py --files 100 --backlog 2000

The real daemon runs in service mode as a subprocess on a temporary state directory. Its
two ComfyUI instances point at closed loopback ports: both are DOWN, nothing is ever
dispatched, so what is timed is intake alone (watcher, scan, read, plan, record, group
commit, move to ``accepted/``) and not the rendering traffic that would share the loop
thread with it. Batches pile up as ready jobs, as they would behind busy servers.

1. Latency: ``--files`` files, one at a time. Each is written to ``spool/tmp/``, fsynced
   and renamed into ``incoming/`` (``time.time()`` taken just before the rename); the
   next one goes only after this one has left ``incoming/`` plus a 20 ms gap, so every
   file is measured alone. Latency is the ``ts`` of its ``batch_accepted`` event (matched
   by ``plan.source``) minus its rename time: the same machine's wall clock on both
   sides. ``ts`` is the clock of the loop turn that recorded the batch, taken before that
   turn's fsync; the time until the file was moved to ``accepted/`` (which happens after
   the fsync) is reported too.
2. Backlog: ``--backlog`` files are written to ``spool/tmp/`` first (one ``sync`` for
   all), then renamed into ``incoming/`` as fast as possible. ``take_10k_s`` is the last
   of their ``batch_accepted`` timestamps minus the first rename. ``missed`` counts the
   files with no ``batch_accepted`` within ``--timeout`` plus the files accepted more
   than once.
3. With ``--after N``: part 1 again with N files once the backlog is in, to see what a
   store of that many batches costs each loop turn.

The files ask for 505 frames (five chunks, 15 jobs), like a typical prompt file.
"""

# ruff: noqa: E402 - the repository root goes on sys.path before the project is imported

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from spool.layout import SpoolLayout
from statedir import StateDir
from statemachine import events as ev
from statemachine.log import EventLog
from statemachine.store import read_records

TARGET_P50_MS = 100.0
GAP = 0.02  # seconds between one file leaving incoming/ and the next rename
FRAMES = 505
ALONE_TIMEOUT = 10.0  # seconds one latency file may take before the next one goes anyway
START_TIMEOUT = 30.0


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt_bytes(name: str) -> bytes:
    """A valid prompt file whose content (and so sha256) is unique to ``name``."""
    stem = name.removesuffix(".txt")
    return (f"{stem}\n\n{FRAMES}\n\nA slow dolly shot along an empty beach, take {stem}, "
            "warm light, long shadows, cinematic.\n\nblurry, low quality\n").encode()


# --- the daemon ----------------------------------------------------------------------------


class Daemon:
    """``python daemon.py --config C --state-dir S`` (service mode) with a NOTIFY_SOCKET, so
    ``start`` returns once it said READY=1. Its output goes to ``daemon.log``."""

    def __init__(self, work: Path) -> None:
        self.state = work / "state"
        self.config = work / "config.toml"
        self.output = work / "daemon.log"
        lines = []
        for name, kind in (("high_priority", "HIGH"), ("low_priority", "LOW")):
            lines += ["[[COMFYUI_INSTANCES]]", f'instance_id = "{name}"',
                      'host = "127.0.0.1"', f"port = {free_port()}", f'job_types = ["{kind}"]']
        self.config.write_text("\n".join(lines) + "\n")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(work / "notify.sock"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def layout(self) -> SpoolLayout:
        return StateDir(self.state).spool

    @property
    def events(self) -> Path:
        return StateDir(self.state).events

    def start(self) -> None:
        env = {**os.environ, "NOTIFY_SOCKET": self.notify.getsockname()}
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "daemon.py"), "--config", str(self.config),
                 "--state-dir", str(self.state)],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        self.notify.settimeout(0.2)
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                break
            with contextlib.suppress(TimeoutError):
                if "READY=1" in self.notify.recv(4096).decode().splitlines():
                    return
        raise RuntimeError(f"the daemon did not get ready; its output:\n{self.tail()}")

    def check(self) -> None:
        """Raise if the daemon has exited: waiting for it would only time out."""
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited; its output:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.output.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 20 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.notify.close()


@contextlib.contextmanager
def running_daemon(work: Path) -> Iterator[Daemon]:
    daemon = Daemon(work)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


# --- dropping files ------------------------------------------------------------------------


def write(path: Path, data: bytes, *, fsync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def rename_in(layout: SpoolLayout, name: str) -> float:
    """Rename ``tmp/<name>`` into ``incoming/``; the wall clock just before the rename."""
    at = time.time()
    os.rename(layout.tmp / name, layout.incoming / name)
    return at


def wait_gone(path: Path, timeout: float) -> float | None:
    """When ``path`` stopped existing (polled every millisecond), or None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.lexists(path):
            return time.time()
        time.sleep(0.001)
    return None


def drop_one_at_a_time(daemon: Daemon, names: Sequence[str]
                       ) -> tuple[dict[str, float], list[float]]:
    """Rename times, and seconds until each file was moved out of ``incoming/``."""
    layout = daemon.layout
    renamed, moved = {}, []
    for name in names:
        write(layout.tmp / name, prompt_bytes(name), fsync=True)
        renamed[name] = rename_in(layout, name)
        gone = wait_gone(layout.incoming / name, ALONE_TIMEOUT)
        if gone is None:
            daemon.check()
        else:
            moved.append(gone - renamed[name])
        time.sleep(GAP)
    return renamed, moved


class AcceptedCounter:
    """Counts ``batch_accepted`` lines for sources with a prefix, reading only what was
    appended to the event log since the last call."""

    def __init__(self, path: Path, prefix: str) -> None:
        self.path = path
        self.needle = f'"source":"{prefix}'.encode()
        self.offset = path.stat().st_size
        self.count = 0
        self._partial = b""

    def poll(self) -> int:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = self._partial + f.read()
        self.offset += len(data) - len(self._partial)
        whole, _, self._partial = data.rpartition(b"\n")
        self.count += whole.count(self.needle)
        return self.count


def drop_backlog(daemon: Daemon, names: Sequence[str], timeout: float) -> dict[str, float]:
    """Stage every file in ``tmp/``, rename them all in, wait until as many batches are
    recorded (or ``timeout``). Returns the rename times."""
    layout = daemon.layout
    for name in names:
        write(layout.tmp / name, prompt_bytes(name), fsync=False)
    os.sync()
    counter = AcceptedCounter(daemon.events, prefix="bulk_")
    renamed = {name: rename_in(layout, name) for name in names}
    deadline = time.monotonic() + timeout
    while counter.poll() < len(names) and time.monotonic() < deadline:
        daemon.check()
        time.sleep(0.05)
    return renamed


# --- results -------------------------------------------------------------------------------


def accepted_times(state: Path) -> dict[str, list[float]]:
    """Source file name -> the ``ts`` of each of its ``batch_accepted`` events. Read only
    once the daemon has stopped (opening the log may repair its tail)."""
    log = EventLog(StateDir(state).log_dir)
    try:
        times: dict[str, list[float]] = defaultdict(list)
        for rec in read_records(log):
            if isinstance(rec.event, ev.BatchAccepted):
                times[rec.event.plan.source].append(rec.ts)
        return times
    finally:
        log.close()


def percentiles_ms(seconds: Iterable[float]) -> dict[str, float]:
    values = sorted(s * 1000 for s in seconds)
    if not values:
        return {}
    cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 \
        else [values[0]] * 99
    return {"p50": statistics.median(values), "p90": cuts[89], "p99": cuts[98],
            "max": values[-1]}


@dataclass(frozen=True, slots=True)
class Outcome:
    """One part's files: their rename times, matched with what the log says."""

    renamed: dict[str, float]
    accepted: dict[str, list[float]]

    @property
    def never(self) -> list[str]:
        return [n for n in self.renamed if not self.accepted.get(n)]

    @property
    def twice(self) -> list[str]:
        return [n for n in self.renamed if len(self.accepted.get(n, ())) > 1]

    def latencies(self) -> list[float]:
        return [self.accepted[n][0] - t for n, t in self.renamed.items() if self.accepted.get(n)]

    def take_s(self) -> float | None:
        firsts = [self.accepted[n][0] for n in self.renamed if self.accepted.get(n)]
        return max(firsts) - min(self.renamed.values()) if firsts else None


def rejected_reasons(layout: SpoolLayout) -> list[str]:
    return sorted(p.read_text(errors="replace").splitlines()[0]
                  for p in layout.rejected.glob("*.reason"))


@dataclass(frozen=True, slots=True)
class Drops:
    """What the bench did: rename times of each part, and how long each one-at-a-time
    file took to leave ``incoming/``."""

    single: dict[str, float]
    moved: list[float]
    bulk: dict[str, float]
    after: dict[str, float]
    after_moved: list[float]


def drop_all(daemon: Daemon, files: int, backlog: int, after: int, timeout: float,
             say: Callable[[str], None]) -> Drops:
    say(f"dropping {files} files one at a time, then {backlog:,} at once, then {after} "
        "one at a time ...")
    single, moved = drop_one_at_a_time(daemon, [f"lat_{n:05d}.txt" for n in range(files)])
    bulk = drop_backlog(daemon, [f"bulk_{n:05d}.txt" for n in range(backlog)], timeout)
    later, later_moved = drop_one_at_a_time(daemon, [f"after_{n:05d}.txt"
                                                     for n in range(after)])
    return Drops(single, moved, bulk, later, later_moved)


def measure(files: int, backlog: int, after: int, timeout: float,
            say: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="comfy-dual-intake-") as tmp:
        with running_daemon(Path(tmp)) as daemon:
            drops = drop_all(daemon, files, backlog, after, timeout, say)
        times = accepted_times(daemon.state)
        rejected = rejected_reasons(daemon.layout)
    return summarise(drops, times, rejected)


def summarise(drops: Drops, times: dict[str, list[float]], rejected: list[str]
              ) -> dict[str, Any]:
    single, bulk, after = (Outcome(d, times) for d in (drops.single, drops.bulk, drops.after))
    lat, mov = percentiles_ms(single.latencies()), percentiles_ms(drops.moved)
    later, later_mov = percentiles_ms(after.latencies()), percentiles_ms(drops.after_moved)
    take = bulk.take_s()
    renames = drops.bulk.values()
    return {
        "p50_ms": lat.get("p50"), "p99_ms": lat.get("p99"),
        "take_10k_s": take, "missed": len(bulk.never) + len(bulk.twice),
        "p90_ms": lat.get("p90"), "max_ms": lat.get("max"),
        "moved_p50_ms": mov.get("p50"), "moved_p99_ms": mov.get("p99"),
        "files": len(drops.single), "files_missed": len(single.never) + len(single.twice),
        "backlog": len(drops.bulk),
        "backlog_rename_s": max(renames) - min(renames) if renames else None,
        "backlog_files_per_s": len(drops.bulk) / take if take else None,
        "never_accepted": len(bulk.never), "accepted_twice": len(bulk.twice),
        "after": len(drops.after), "after_p50_ms": later.get("p50"),
        "after_p99_ms": later.get("p99"), "after_max_ms": later.get("max"),
        "after_moved_p50_ms": later_mov.get("p50"), "after_moved_p99_ms": later_mov.get("p99"),
        "after_missed": len(after.never) + len(after.twice),
        "rejected": len(rejected), "rejected_reasons": sorted(set(rejected))[:5],
    }


def _ms(value: float | None) -> str:
    return "      -   " if value is None else f"{value:7.1f} ms"


def latency_lines(r: dict[str, Any], key: str, title: str) -> list[str]:
    """The report of one one-at-a-time part (``key`` is the prefix of its result keys)."""
    return [
        title,
        f"  rename -> batch_accepted ts   p50 {_ms(r[f'{key}p50_ms'])}  "
        f"p99 {_ms(r[f'{key}p99_ms'])}  max {_ms(r[f'{key}max_ms'])}",
        f"  rename -> moved to accepted/  p50 {_ms(r[f'{key}moved_p50_ms'])}  "
        f"p99 {_ms(r[f'{key}moved_p99_ms'])}",
    ]


def report(r: dict[str, Any]) -> str:
    lines = []
    if r["files"]:
        verdict = "ok" if r["p50_ms"] is not None and r["p50_ms"] <= TARGET_P50_MS \
            else "MISSED"
        lines += latency_lines(r, "", f"One file at a time ({r['files']} files, each alone, "
                                      f"{GAP * 1000:.0f} ms apart)")
        lines.append(f"  p90 {_ms(r['p90_ms'])}; target p50 <= {TARGET_P50_MS:.0f} ms: "
                     f"{verdict}; missed {r['files_missed']}")
    if r["backlog"]:
        take = "-" if r["take_10k_s"] is None else f"{r['take_10k_s']:.1f} s"
        rate = "" if r["backlog_files_per_s"] is None else \
            f" ({r['backlog_files_per_s']:.0f} files/s)"
        lines += [
            f"Backlog ({r['backlog']:,} files renamed in within {r['backlog_rename_s']:.2f} s)",
            f"  all recorded after {take}{rate}",
            f"  missed {r['missed']}: never accepted {r['never_accepted']}, accepted twice "
            f"{r['accepted_twice']}",
        ]
    if r["after"]:
        lines += latency_lines(r, "after_", f"One file at a time after the backlog "
                                            f"({r['after']} files)")
        lines.append(f"  missed {r['after_missed']}")
    if r["rejected"]:
        lines.append(f"Rejected {r['rejected']}: {'; '.join(r['rejected_reasons'])}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=300,
                        help="files dropped one at a time for the latency (default 300)")
    parser.add_argument("--backlog", type=int, default=10_000,
                        help="files dropped at once (default 10,000; 0 skips the part)")
    parser.add_argument("--after", type=int, default=0,
                        help="files dropped one at a time after the backlog, to see the "
                             "latency with that many batches in the store (default 0)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds the backlog may take before the rest count as missed")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    say = (lambda _: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    result = measure(args.files, args.backlog, args.after, args.timeout, say)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
