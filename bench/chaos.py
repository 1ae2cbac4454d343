"""Crash harness: kill the daemon (and the ComfyUI servers) at random moments, restart,
repeat; then prove from the servers' own records that every video finished, nothing was
lost and no render ran twice.

    python bench/chaos.py --kills 300 --server-kills 20        # the long run (README)
    python bench/chaos.py --kills 30 --server-kills 5 --json   # what the test suite runs

Simulated servers run as separate processes writing their execution ledger to a file
(it survives their SIGKILL). The daemon runs as a subprocess in one-shot mode, the same
command each time: a restart resumes from the event log. Some daemon lives also arm
crash points (``statemachine/failpoints.py``) so kills land between a dispatch intent
and its POST, in the middle of a group commit, during replay and when a COMBINE starts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.status import status_view  # noqa: E402
from simulator import read_ledger  # noqa: E402
from statedir import StateDir  # noqa: E402
from statemachine import events as ev  # noqa: E402
from statemachine.log import EventLog  # noqa: E402
from statemachine.store import Store, read_records  # noqa: E402

FAILPOINTS = "after_intent:0.15,mid_append:0.03,replay:0.02,dispatch_combine:0.25"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SimProcess:
    """A simulator in its own process; its ledger and outputs outlive its kills."""

    name: str
    port: int
    work: Path
    durations: dict[str, float]
    proc: subprocess.Popen | None = None
    kills: list[float] = field(default_factory=list)  # when it was killed

    @property
    def ledger(self) -> Path:
        return self.work / f"{self.name}.ledger.jsonl"

    def start(self) -> None:
        durations = [f"--duration={k}={v}" for k, v in self.durations.items()]
        self.proc = proc = subprocess.Popen(
            [sys.executable, "-m", "simulator", "--port", str(self.port),
             "--ledger", str(self.ledger), "--output-dir", str(self.work / "out"),
             "--input-dir", str(self.work / "in"), *durations],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None  # a pipe, asked for above
        line = proc.stdout.readline()
        if "listening" not in line:
            raise RuntimeError(f"simulator {self.name} did not start: {line!r}")

    def kill(self) -> None:
        assert self.proc is not None, "kill() before start()"
        self.kills.append(time.time())
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def write_config(path: Path, sims: list[SimProcess]) -> None:
    lines = ["HEALTH_INTERVAL = 0.3", "PROBE_BACKOFF_MAX = 0.5", "CONNECT_TIMEOUT = 0.5",
             "REQUEST_TIMEOUT = 5", "RETRY_DELAY = 0.2", "INSTANCE_LOST_TIMEOUT = 120"]
    for sim, kind in zip(sims, ("HIGH", "LOW"), strict=True):
        lines += ["[[COMFYUI_INSTANCES]]", f'instance_id = "{sim.name}"',
                  'host = "127.0.0.1"', f"port = {sim.port}", f'job_types = ["{kind}"]']
    path.write_text("\n".join(lines) + "\n")


def write_prompts(directory: Path, first: int, count: int, rng: random.Random) -> list[Path]:
    files = []
    for n in range(first, first + count):
        frames = rng.randint(1, 3) * 101 - rng.randint(0, 50)
        path = directory / f"video{n:03d}.txt"
        path.write_text(f"video{n:03d}\n\n{frames}\n\nchaos test video {n}\n\nblurry\n")
        files.append(path)
    return files


class Daemon:
    """The daemon in one-shot mode over a growing list of prompt files."""

    def __init__(self, work: Path, config: Path) -> None:
        self.base = [sys.executable, str(ROOT / "daemon.py"), "--config", str(config),
                     "--state-dir", str(work / "state")]
        self.files: list[Path] = []
        self.log = open(work / "daemon.log", "ab")  # noqa: SIM115 - closed in close()

    def start(self, failpoints: str) -> subprocess.Popen:
        env = {**os.environ, "COMFY_DUAL_FAILPOINTS": failpoints}
        return subprocess.Popen([*self.base, *map(str, self.files)], cwd=ROOT, env=env,
                                stdout=self.log, stderr=subprocess.STDOUT)

    def close(self) -> None:
        self.log.close()


def chaos(args: argparse.Namespace, work: Path) -> dict:
    rng = random.Random(args.seed)
    durations = {"HIGH": args.duration, "LOW": args.duration, "COMBINE": args.duration / 3}
    sims = [SimProcess(name, free_port(), work, durations) for name in ("high", "low")]
    for sim in sims:
        sim.start()
    config = work / "config.toml"
    write_config(config, sims)
    daemon = Daemon(work, config)
    daemon.files += write_prompts(work, 0, args.videos, rng)
    kills = server_kills = 0
    server_kill_turns = set(rng.sample(range(1, args.kills + 1),
                                       min(args.server_kills, args.kills)))
    try:
        while kills < args.kills:
            proc = daemon.start(FAILPOINTS if rng.random() < 0.4 else "")
            try:
                proc.wait(timeout=rng.uniform(0.1, args.max_life))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            if proc.returncode == 0:  # all done before the kills ran out: more work
                daemon.files += write_prompts(work, len(daemon.files), args.videos, rng)
                continue
            kills += 1
            if kills in server_kill_turns:
                sim = rng.choice(sims)
                sim.kill()
                server_kills += 1
                sim.start()
        final = daemon.start("").wait(timeout=args.final_timeout)
    finally:
        daemon.close()
        for sim in sims:
            sim.stop()
    return verify(work, sims, kills, server_kills, final)


def verify(work: Path, sims: list[SimProcess], kills: int, server_kills: int,
           final_exit: int) -> dict:
    """Judge the run from the servers' ledgers and a replay of the event log."""
    runs = sorted((dict(r, server=sim.name) for sim in sims for r in read_ledger(sim.ledger)),
                  key=lambda r: r["start"])
    store = Store.open(EventLog(StateDir(work / "state").log_dir))
    successes = defaultdict(list)
    for run in runs:
        if run["status"] == "success":
            successes[run["job_id"]].append(run)
    duplicates = excused = 0
    for job_runs in successes.values():
        for first, again in itertools.pairwise(job_runs):
            server = next(s for s in sims if s.name == first["server"])
            if any(first["end"] <= t <= again["start"] for t in server.kills):
                excused += 1  # the server restarted and forgot it: documented re-run
            else:
                duplicates += 1
    jobs = [j.job_id for rec in read_records(store.log)
            if isinstance(rec.event, ev.BatchAccepted) for j in rec.event.plan.jobs]
    lost = [j for j in jobs if j not in successes]
    view = status_view(store, [], now=time.time())
    done = sum(1 for b in store.batches.values() if b.state.value == "done")
    assert view["counts"]["succeeded"] == len(jobs) - len(lost)
    return {"kills": kills, "server_kills": server_kills, "jobs": len(jobs),
            "duplicates": duplicates, "reruns_after_server_restart": excused,
            "lost": len(lost), "batches_done": done, "batches": len(store.batches),
            "final_exit": final_exit, "executions": len(runs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=300)
    p.add_argument("--server-kills", type=int, default=20)
    p.add_argument("--videos", type=int, default=8,
                   help="videos to start with; as many again each time all are done")
    p.add_argument("--duration", type=float, default=0.1, help="seconds per HIGH/LOW job")
    p.add_argument("--max-life", type=float, default=1.2,
                   help="longest a daemon life lasts before its SIGKILL")
    p.add_argument("--final-timeout", type=float, default=600)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", type=Path, help="work in this directory and keep it")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = chaos(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="comfy-chaos-") as tmp:
            result = chaos(args, Path(tmp))
    ok = (result["duplicates"] == 0 and result["lost"] == 0 and result["final_exit"] == 0
          and result["batches_done"] == result["batches"])
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")
        print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
