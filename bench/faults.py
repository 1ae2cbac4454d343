"""Operational faults against the real daemon and simulated ComfyUI servers.

Run from the repository root (not part of the test suite; about a minute, as root for
the full disk)::

    .venv/bin/python bench/faults.py            # one line per scenario
    .venv/bin/python bench/faults.py --json     # one JSON object

Scenarios, each on fresh simulators (HIGH 0.1 s, LOW 0.1 s, COMBINE 0.03 s) and a fresh
state directory, each rendering ``--videos`` videos of 303 frames (9 jobs each):

- ``disk_full``: the one-shot daemon as a process, its state directory on a 16 MiB tmpfs;
  once the first render ran the disk is filled, held full for ``--full-for`` seconds, then
  freed. Figures: ``disk_full_exits`` (daemon exits before the end), ``disk_full_lost``,
  ``disk_full_resumed`` (every batch done after the space came back).
- ``hung_server``: the HIGH server hangs on its renders and then answers every request
  3 s late (REQUEST_TIMEOUT 2 s, JOB_TIMEOUT 1.5 s, QUEUE_TIMEOUT 1 s), for
  ``--hang-for`` seconds; ``hung_server_recovered``: every batch done.
- ``stale_prompts``: a render hangs on the HIGH server with another prompt queued
  behind it, the server goes silent, its jobs are lost, it comes back with both prompts;
  ``stale_prompts_executed``: renders of prompts the daemon gave up on.

Over all scenarios: ``duplicates`` (jobs that succeeded more than once on the servers)
and ``lost`` (jobs never done).
"""

# ruff: noqa: E402 - the repository root goes on sys.path before the project is imported

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import config
import daemon
from instances.client import ComfyClient
from service.logs import setup_logging
from simulator import SimConfig, SimulatorHandle, start_simulator
from statedir import StateDir
from statemachine import events as ev
from statemachine.log import EventLog
from statemachine.store import read_records

DURATIONS = {"HIGH": 0.1, "LOW": 0.1, "COMBINE": 0.03}
JOBS_PER_VIDEO = 9


@contextlib.contextmanager
def servers() -> Iterator[tuple[SimulatorHandle, SimulatorHandle]]:
    with start_simulator(0, SimConfig(durations=DURATIONS)) as high, \
            start_simulator(0, SimConfig(durations=DURATIONS)) as low:
        yield high, low


def instances(high: SimulatorHandle, low: SimulatorHandle) -> list[dict[str, Any]]:
    return [{"instance_id": "high_priority", "host": "127.0.0.1", "port": high.port,
             "job_types": ["HIGH"]},
            {"instance_id": "low_priority", "host": "127.0.0.1", "port": low.port,
             "job_types": ["LOW"]}]


QUICK = {"RETRY_DELAY": 0.05, "RETRY_DELAY_MAX": 1, "HEALTH_INTERVAL": 0.2,
         "PROBE_BACKOFF_MAX": 0.5, "CONNECT_TIMEOUT": 0.5, "WEB_ADDRESS": ""}


def prompts(directory: Path, count: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for n in range(count):
        path = directory / f"video{n}.txt"
        path.write_text(f"video {n}\n\n303\n\nA test video number {n}.\n\nblurry\n")
        files.append(path)
    return files


def judged(sims: tuple[SimulatorHandle, ...], videos: int) -> dict[str, int]:
    """Duplicates and lost jobs by the servers' own records."""
    done = Counter(r["job_id"] for sim in sims for r in sim.executions()
                   if r["status"] == "success")
    return {"duplicates": sum(n - 1 for n in done.values() if n > 1),
            "lost": videos * JOBS_PER_VIDEO - len(done)}


def in_background(action: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    return thread


def wait_until(check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.02)
    raise TimeoutError("the scenario did not reach its next step")


def run_in_process(settings: config.Settings, files: list[Path], deadline: float
                   ) -> daemon.RunResult:
    """``daemon.run_files``, stopped after ``deadline`` seconds if it has not ended."""
    stop = daemon.Stop()
    timer = threading.Timer(deadline, stop.event.set)
    timer.start()
    try:
        return daemon.run_files(settings, files, stop)
    finally:
        timer.cancel()


# --- the scenarios --------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(where: Path) -> Iterator[Path]:
    where.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)],
                   check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    for size in (1 << 16, 512):
        with contextlib.suppress(OSError), filler.open("ab", buffering=0) as f:
            while True:
                f.write(b"\0" * size)
    return filler


def disk_full(base: Path, videos: int, full_for: float) -> dict[str, Any]:
    with servers() as sims, small_disk(base / "state") as state:
        cfg = base / "config.toml"
        lines = [f"{k} = {json.dumps(v)}" for k, v in QUICK.items()]
        for inst in instances(*sims):
            lines += ["[[COMFYUI_INSTANCES]]", *(f"{k} = {json.dumps(v)}"
                                                for k, v in inst.items())]
        cfg.write_text("\n".join(lines) + "\n")
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "daemon.py"), "--config", str(cfg), "--state-dir",
             str(state), *map(str, prompts(base / "prompts", videos))],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: sims[0].executions())
        filler = fill(state)
        time.sleep(full_for)
        exited_while_full = proc.poll() is not None
        filler.unlink()
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        figures = judged(sims, videos)
    return {"disk_full_exits": int(exited_while_full), "disk_full_lost": figures["lost"],
            "disk_full_resumed": code == 0 and figures["lost"] == 0, "disk_full_rc": code,
            **figures}


def hung_server(base: Path, videos: int, hang_for: float) -> dict[str, Any]:
    with servers() as sims:
        high, _ = sims
        high.set_faults(hang=True)

        def then_slow_then_well() -> None:
            wait_until(lambda: high.executions())
            high.set_faults(response_delay=3.0)
            time.sleep(hang_for)
            high.set_faults(hang=False, response_delay=0.0)

        in_background(then_slow_then_well)
        settings = config.load_settings(None, {
            **QUICK, "COMFYUI_INSTANCES": instances(*sims), "STATE_DIR": str(base / "state"),
            "REQUEST_TIMEOUT": 2, "JOB_TIMEOUT": 1.5, "QUEUE_TIMEOUT": 1,
            "INSTANCE_LOST_TIMEOUT": 1, "FALLBACK": False})
        result = run_in_process(settings, prompts(base / "prompts", videos), 120)
        return {"hung_server_recovered": result.all_done, **judged(sims, videos)}


def stale_prompts(base: Path, videos: int) -> dict[str, Any]:
    state = base / "state"
    with servers() as sims:
        high, _ = sims
        high.set_faults(hang=True)

        def silent_then_back() -> None:
            wait_until(lambda: ComfyClient(high.url).queue().pending)
            high.set_faults(response_delay=2.0)
            wait_until(lambda: b'"job_lost"' in StateDir(state).events.read_bytes())
            high.set_faults(response_delay=0.0, hang=False)

        in_background(silent_then_back)
        settings = config.load_settings(None, {
            **QUICK, "COMFYUI_INSTANCES": instances(*sims), "STATE_DIR": str(state),
            "REQUEST_TIMEOUT": 0.5, "INSTANCE_LOST_TIMEOUT": 0.5, "FALLBACK": False})
        result = run_in_process(settings, prompts(base / "prompts", videos), 120)
        given_up = {r.event.prompt_id for r in read_records(EventLog(StateDir(state).log_dir))
                    if isinstance(r.event, ev.JobLost | ev.JobAttemptFailed)}
        executed = [r for sim in sims for r in sim.executions()
                    if r["prompt_id"] in given_up and r["status"] == "success"]
        return {"stale_prompts_executed": len(executed), "stale_all_done": result.all_done,
                **judged(sims, videos)}


def run(videos: int, full_for: float, hang_for: float) -> dict[str, Any]:
    setup_logging(None)
    result: dict[str, Any] = {}
    totals: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="comfy-faults-") as tmp:
        base = Path(tmp)
        scenarios: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("disk_full", lambda: disk_full(base / "disk", videos, full_for)),
            ("hung_server", lambda: hung_server(base / "hung", videos, hang_for)),
            ("stale_prompts", lambda: stale_prompts(base / "stale", videos))]
        for name, scenario in scenarios:
            try:
                figures = scenario()
            except (subprocess.CalledProcessError, PermissionError) as exc:
                result[f"{name}_skipped"] = f"cannot run here: {exc}"
                continue
            totals["duplicates"] += figures.pop("duplicates")
            totals["lost"] += figures.pop("lost")
            result |= figures
    return {**result, "duplicates": totals["duplicates"], "lost": totals["lost"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--videos", type=int, default=3)
    parser.add_argument("--full-for", type=float, default=3.0, metavar="SECONDS")
    parser.add_argument("--hang-for", type=float, default=5.0, metavar="SECONDS")
    args = parser.parse_args()
    result = run(args.videos, args.full_for, args.hang_for)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:<26} {value}")


if __name__ == "__main__":
    main()
