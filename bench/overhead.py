"""Overhead benchmark: what the daemon itself costs per job, with jobs that take no time.

Run from the repository root (not part of the test suite; about 2 minutes)::

    .venv/bin/python bench/overhead.py            # a report
    .venv/bin/python bench/overhead.py --json     # one JSON object
    .venv/bin/python bench/overhead.py --videos 100 --restarts 1     # a quick look

Two simulated ComfyUI servers, each in its own process, run every job in zero time (their
own HTTP and websocket work aside), so what is measured is the daemon: the loop, the
event log (fsynced once per loop turn: group commit), the scheduler, the agents' HTTP
and websocket traffic. The daemon logs at INFO into ``STATE_DIR/logs`` as in production
(not to the console). Artifacts are read in place (``ARTIFACT_TRANSFER = "path"``).

1. ``ready_to_post_p50_ms``/``_p99_ms``: ``--latency-rounds`` renders, each by a fresh
   daemon, of ``--latency-videos`` videos of 10 chunks (30 jobs each), the first render
   cold and left out (its median is ``ready_to_post_cold_p50_ms``), with enough room that
   no job waits for a slot (``max_concurrent`` and ``COMBINE_CONCURRENCY`` as large as
   the video count, COMBINE jobs on the ``low`` instance only: were both to take them,
   the rule for COMBINE chains would hold a server while one runs, and a job waiting for
   that is scheduling, not overhead): from the timestamp of a job's ``job_ready`` event
   (the loop turn that found it ready; for the first jobs, the moment the last instance
   was reported UP, since nothing may be sent before) to the moment its agent starts
   ``POST /prompt`` (``ComfyClient.submit``, wrapped here to note the time).
2. ``jobs_per_s``: ``--videos`` videos of 505 frames (15 jobs each; 667 make a 10,005-job
   log) with the shipped defaults (``max_concurrent`` 2, one COMBINE at a time, unless
   ``--depth``/``--combine-concurrency`` say otherwise), for ``--seconds`` at most and
   until half of the jobs were posted, whichever comes first (the run must stop with work
   left: step 3 restarts on it, and a run to the end would close on its last COMBINE
   jobs, one at a time): dispatches per second over the middle 80% of the run's
   dispatches (without the ramp-up and the tail); ``jobs_per_s_whole_run`` counts the
   successes from the first dispatch to the last one.
3. ``restart_to_dispatch_s``: the daemon of step 2 stops where it is (jobs in flight,
   ready and waiting: a log of every job of step 2); then ``python daemon.py --config
   FILE`` starts on that state directory in a fresh process (interpreter start, imports,
   replay, health probes, reconciliation of the jobs in flight); from spawning it to the
   timestamp of the first ``job_dispatch_intent`` it records; then it gets SIGTERM and the
   next one starts. The median of ``--restarts`` runs.
"""

# ruff: noqa: E402 - the repository root goes on sys.path before the project is imported

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
for path in (ROOT, BENCH):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from makespan import simulators, write_prompts

import config
import daemon
from instances.client import ComfyClient
from service.logs import setup_logging
from statedir import StateDir
from statemachine import events as ev
from statemachine.log import EventLog
from statemachine.store import read_records

TARGETS = {"jobs_per_s": (">=", 300.0), "ready_to_post_p50_ms": ("<=", 2.0),
           "ready_to_post_p99_ms": ("<=", 20.0), "restart_to_dispatch_s": ("<=", 2.0)}
ZERO = {"HIGH": 0.0, "LOW": 0.0, "COMBINE": 0.0}
LATENCY_FRAMES = 1010  # 10 chunks
ARTIFACTS_DIR = "/dev/shm" if Path("/dev/shm").is_dir() else None
THROUGHPUT_FRAMES = 505  # 5 chunks
THROUGHPUT_JOBS = 15  # per video: HIGH, LOW and COMBINE of 5 chunks


@dataclass(frozen=True)
class Farm:
    """Two zero-duration simulators, the directory they write to, and where the daemon's
    state goes."""

    ports: Sequence[int]
    artifacts: Path
    work: Path

    def config_file(self, name: str, *, depth: int, combines: int,
                    combine_on: str | None = None) -> Path:
        """A TOML configuration for the state directory ``work/name``: ``depth`` is each
        instance's ``max_concurrent``, ``combines`` the ``COMBINE_CONCURRENCY``;
        ``combine_on`` names the one instance that takes COMBINE jobs (None: both, by the
        default rule)."""
        lines = [f'STATE_DIR = "{self.work / name}"', 'ARTIFACT_TRANSFER = "path"',
                 f'ARTIFACT_DIR = "{self.artifacts}"',
                 f"COMBINE_CONCURRENCY = {combines}"]
        for instance_id, kind, port in zip(("high", "low"), ("HIGH", "LOW"), self.ports,
                                           strict=True):
            kinds = [kind, "COMBINE"] if instance_id == combine_on else [kind]
            lines += ["[[COMFYUI_INSTANCES]]", f'instance_id = "{instance_id}"',
                      'host = "127.0.0.1"', f"port = {port}", f"job_types = {json.dumps(kinds)}",
                      f"max_concurrent = {depth}"]
        path = self.work / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path


def log_to_files_only(state_dir: Path) -> None:
    """The daemon's logging, minus the console: JSON lines in ``STATE_DIR/logs``."""
    setup_logging(StateDir(state_dir).logs)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)


def render(config_file: Path, files: Sequence[Path], seconds: float | None = None,
           stop: daemon.Stop | None = None) -> Path:
    """Run the daemon (in this process) on ``files`` to the end, or for ``seconds`` at
    most, or until ``stop``; returns its state directory."""
    settings = config.load_settings(config_file)
    log_to_files_only(settings.state_dir)
    stop = stop or daemon.Stop()
    timer = threading.Timer(seconds or 0.0, stop.event.set)
    if seconds is not None:
        timer.start()
    try:
        result = daemon.run_files(settings, files, stop)
    finally:
        timer.cancel()
    if seconds is None and not result.all_done:
        raise RuntimeError(f"not every batch finished in {settings.state_dir}")
    return settings.state_dir


def records(state_dir: Path) -> list[ev.Recorded]:
    log = EventLog(StateDir(state_dir).log_dir)
    try:
        return list(read_records(log))
    finally:
        log.close()


# --- 1. ready to POST --------------------------------------------------------------------


def ready_to_post(farm: Farm, videos: int, rounds: int) -> dict[str, Any]:
    """Figures over every round but the first, which runs cold: the first jobs of a
    process and of fresh simulators pay once for what later ones find ready (code paths
    run for the first time, each HTTP thread's first connection, the simulators' first
    files). Its median is reported too, as ``ready_to_post_cold_p50_ms``."""
    cold, *warm = (_latencies(farm, videos, f"latency-{n}") for n in range(rounds))
    ms = sorted(itertools.chain.from_iterable(warm or [cold]))
    return {"ready_to_post_p50_ms": round(statistics.median(ms), 3),
            "ready_to_post_p99_ms": round(_percentile(ms, 0.99), 3),
            "ready_to_post_max_ms": round(ms[-1], 3), "latency_jobs": len(ms),
            "ready_to_post_cold_p50_ms": round(statistics.median(cold), 3)}


def _latencies(farm: Farm, videos: int, name: str) -> list[float]:
    """Milliseconds from ready to POST of every dispatch of one render of ``videos``."""
    sent: dict[str, float] = {}
    original = ComfyClient.submit

    def stamped(client: ComfyClient, graph: Mapping[str, Any], *, prompt_id: str,
                **kwargs: Any) -> int:
        sent[prompt_id] = time.time()
        return original(client, graph, prompt_id=prompt_id, **kwargs)

    cfg = farm.config_file(name, depth=videos, combines=videos, combine_on="low")
    files = write_prompts(farm.work / f"{name}-prompts", [LATENCY_FRAMES] * videos)
    with mock.patch.object(ComfyClient, "submit", stamped):
        state = render(cfg, files)
    recs = records(state)
    up = max(r.ts for r in recs if isinstance(r.event, ev.InstanceUp))  # dispatch may begin
    return [1000 * (sent[prompt] - max(ready, up)) for prompt, ready in _ready_at(recs)
            if prompt in sent]


def _ready_at(recs: Sequence[ev.Recorded]) -> Iterator[tuple[str, float]]:
    """(prompt_id, when its job last became ready) for every dispatch."""
    ready: dict[str, float] = {}
    for rec in recs:
        if isinstance(rec.event, ev.JobReady):
            ready[rec.event.job_id] = rec.ts
        elif isinstance(rec.event, ev.JobDispatchIntent) and rec.event.job_id in ready:
            yield rec.event.prompt_id, ready.pop(rec.event.job_id)


def _percentile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- 2. throughput -------------------------------------------------------------------------


def throughput(farm: Farm, args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    cfg = farm.config_file("throughput", depth=args.depth, combines=args.combine_concurrency)
    files = write_prompts(farm.work / "throughput-prompts", [THROUGHPUT_FRAMES] * args.videos)
    stop = daemon.Stop()
    began = time.monotonic()
    with _stop_after_posts(stop, THROUGHPUT_JOBS * args.videos // 2):
        state = render(cfg, files, seconds=args.seconds, stop=stop)
    wall = time.monotonic() - began
    recs = records(state)
    sent = sorted(r.ts for r in recs if isinstance(r.event, ev.JobDispatchIntent))
    done = [r.ts for r in recs if isinstance(r.event, ev.JobSucceeded)]
    first, last = len(sent) // 10, len(sent) * 9 // 10
    return {"jobs_per_s": round((last - first) / (sent[last] - sent[first]), 1),
            "jobs_per_s_whole_run": round(len(done) / (sent[-1] - sent[0]), 1),
            "jobs_succeeded": len(done), "throughput_wall_s": round(wall, 1),
            "depth": args.depth, "combine_concurrency": args.combine_concurrency}, cfg


@contextlib.contextmanager
def _stop_after_posts(stop: daemon.Stop, count: int) -> Iterator[None]:
    """Set ``stop`` once ``count`` prompts were posted."""
    posted = itertools.count(1)
    original = ComfyClient.submit

    def counted(client: ComfyClient, graph: Mapping[str, Any], **kwargs: Any) -> int:
        if next(posted) >= count:
            stop.event.set()
        return original(client, graph, **kwargs)

    with mock.patch.object(ComfyClient, "submit", counted):
        yield


# --- 3. restart ----------------------------------------------------------------------------


def restart_to_dispatch(cfg: Path, runs: int) -> dict[str, Any]:
    state = config.load_settings(cfg).state_dir
    recs = records(state)
    seconds = [_one_restart(cfg, StateDir(state).events) for _ in range(runs)]
    return {"restart_to_dispatch_s": round(statistics.median(seconds), 3),
            "restart_runs_s": [round(s, 3) for s in seconds],
            "restart_log_events": len(recs),
            "restart_log_jobs": sum(len(r.event.plan.jobs) for r in recs
                                    if isinstance(r.event, ev.BatchAccepted))}


def _one_restart(cfg: Path, log_path: Path) -> float:
    """Start the daemon in service mode, wait for its first dispatch, stop it."""
    offset = log_path.stat().st_size
    spawned = time.time()
    proc = subprocess.Popen([sys.executable, str(ROOT / "daemon.py"), "--config", str(cfg)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = _first_dispatch_after(log_path, offset, deadline=time.monotonic() + 60)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return first - spawned


def _first_dispatch_after(log_path: Path, offset: int, *, deadline: float) -> float:
    """The timestamp of the first ``job_dispatch_intent`` written after ``offset``, read
    from the file as the daemon appends to it (whole lines only; the log is not opened
    as an ``EventLog``, which would repair a tail the daemon is still writing)."""
    while time.monotonic() < deadline:
        with log_path.open("rb") as f:
            f.seek(offset)
            lines = f.read().split(b"\n")[:-1]
        for line in lines:
            rec = ev.decode(line)
            if isinstance(rec.event, ev.JobDispatchIntent):
                return rec.ts
        time.sleep(0.05)
    raise RuntimeError("the restarted daemon dispatched nothing within 60 s")


# --- running it all ------------------------------------------------------------------------


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"fsync": True, "artifacts_on": args.artifacts_dir}
    with tempfile.TemporaryDirectory(prefix="comfy-dual-artifacts-", dir=args.artifacts_dir
                                     ) as artifacts, \
            simulators(2, ZERO, 0.0, Path(artifacts)) as ports:
        farm = Farm(ports, Path(artifacts), work)
        _say(f"ready-to-POST: {args.latency_rounds} rounds of {args.latency_videos} videos "
             "of 30 jobs ...")
        result |= ready_to_post(farm, args.latency_videos, args.latency_rounds)
        _say(f"throughput: {args.videos} videos of 15 jobs, {args.seconds} s at most ...")
        figures, cfg = throughput(farm, args)
        result |= figures
        _say(f"restarts on that log, {args.restarts} times ...")
        result |= restart_to_dispatch(cfg, args.restarts)
    return result


def render_report(result: Mapping[str, Any]) -> str:
    lines = []
    for key, value in result.items():
        op, target = TARGETS.get(key, ("", None))
        verdict = ""
        if target is not None:
            ok = value <= target if op == "<=" else value >= target
            verdict = f"   target {op} {target}: {'met' if ok else 'MISSED'}"
        lines.append(f"{key:<26} {value}{verdict}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--videos", type=int, default=667,
                        help="videos of 15 jobs in the throughput run (and the restart log)")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="the throughput run stops after this long")
    parser.add_argument("--latency-videos", type=int, default=4)
    parser.add_argument("--latency-rounds", type=int, default=3,
                        help="renders of the latency videos, each by a fresh daemon; the "
                             "first is the cold one")
    parser.add_argument("--depth", type=int, default=2, help="max_concurrent per instance")
    parser.add_argument("--combine-concurrency", type=int, default=1)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--artifacts-dir", default=ARTIFACTS_DIR,
                        help="where the simulated servers write their files: not the disk "
                             "of the event log, whose fsyncs would wait for their writes "
                             "(ComfyUI writes to its own disk, usually on another machine)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="comfy-dual-overhead-") as tmp:
        result = run(args, Path(tmp))
    print(json.dumps(result) if args.json else render_report(result))
    return 0


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
