"""Benchmarks of the event-sourced core (``statemachine/``): replay, memory, decisions, append.

Run from the repository root::

    .venv/bin/python bench/core.py            # a table: medians next to their targets
    .venv/bin/python bench/core.py --json     # one JSON object, for scripts and CI

The logs it replays are written by :class:`Farm`, which plays the daemon's loop against
simulated servers on a fake clock, through the real ``Store`` and ``EventLog``: batches
planned by ``planner.plan_batch``, instance health, dispatch intents with uuid4 prompt ids,
queued/started/succeeded reports with the outputs a server reports, retries, lost jobs,
cancellations and every follow-up the rules record. See ``bench/README.md``.
"""

# ruff: noqa: E402 - the repository root goes on sys.path before the project is imported

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from statedir import StateDir
from statemachine import events as ev
from statemachine.job import BATCH_FINAL, Job, JobState
from statemachine.log import EventLog, LogFiles
from statemachine.plan import BatchPlan, JobKind
from statemachine.planner import PromptSpec, plan_batch
from statemachine.rules import Policy, cancel_batch, failure_event
from statemachine.scheduler import InstanceView, schedule
from statemachine.store import Store

TARGETS = {"replay_1m_s": 5.0, "mem_100k_mb": 300.0, "decide_10k_ms": 5.0,
           "decide_10k_64i_ms": 5.0, "restart_1m_history_s": 1.0}
POLICY = Policy(max_retries=3, retry_delay=5.0)
POSITIVE = ("A slow dolly shot along an empty beach at sunset, waves rolling in over wet sand, "
            "warm golden light, long shadows, gulls in the distance, cinematic, 35mm film grain, "
            "shallow depth of field, gentle camera sway")
NEGATIVE = "blurry, low quality, watermark, text, jpeg artifacts, deformed, static frame"


@dataclass(frozen=True, slots=True)
class Instance:
    """The shape of a configured instance that ``Store.instance_views`` reads."""

    instance_id: str
    job_types: tuple[str, ...]
    max_concurrent: int = 2
    steal_types: tuple[str, ...] = ()


FARM = (Instance("h1", ("HIGH",)), Instance("h2", ("HIGH",)), Instance("h3", ("HIGH",)),
        Instance("l1", ("LOW",)), Instance("l2", ("LOW",)), Instance("l3", ("LOW",)),
        Instance("hl", ("HIGH", "LOW")), Instance("mix", ("LOW", "COMBINE")))


def make_plan(n: int, *, frames: int = 505, priority: int = 0) -> BatchPlan:
    """Batch number ``n``: a 505-frame video is 5 chunks of 101 frames, 15 jobs."""
    batch_id = f"b{n:06}"
    spec = PromptSpec(name=f"shot_{n:06}", frames=frames, positive=POSITIVE, negative=NEGATIVE,
                      priority=priority)
    return plan_batch(spec, batch_id=batch_id, sha256=hashlib.sha256(batch_id.encode()).hexdigest(),
                      source=f"shot_{n:06}.txt", frames_per_chunk=101, width=832, height=480)


def server_outputs(job: Job) -> dict[str, Any]:
    """What ComfyUI's history reports for the job's save nodes (as the simulator does),
    under the node ids of the default workflows (``workflows/demo``), so that a daemon
    restarted on the farm's log can prepare the jobs that read these files."""
    folder, name = job.spec.params["output_prefix"].rsplit("/", 1)

    def saved(suffix: str) -> list[dict[str, str]]:
        return [{"filename": f"{name}_00001_{suffix}", "subfolder": folder, "type": "output"}]

    if job.kind is JobKind.HIGH:
        return {"2": {"latents": saved(".latent")}}
    video = {"images": saved(".mp4"), "animated": [True]}
    if job.kind is JobKind.LOW:
        return {"5": {"images": saved(".png")}, "7": video, "11": {"latents": saved(".latent")}}
    return {"7": video}


class Farm:
    """The daemon's loop against simulated servers, on a fake clock.

    One turn: the servers' news (health, queued, started, succeeded or failed) is recorded
    and committed, then the scheduler runs and its dispatch intents are recorded and
    committed: two group commits a turn, as in the daemon. A render takes one turn on its
    server. Seeded: every run writes the same log (prompt ids come from the generator too).
    """

    def __init__(self, store: Store, seed: int, *, failure_rate: float = 0.01,
                 outage_rate: float = 0.0005, cancel_rate: float = 0.0005) -> None:
        self.store = store
        self.rng = random.Random(seed)
        self.rates = (failure_rate, outage_rate, cancel_rate)
        self.now = 0.0
        self.numbers = itertools.count(1)
        self.accepted = 0
        self.open: list[str] = []
        self.down: dict[str, float] = {}
        self.fsyncs = 0
        self.committed_seq = store.seq
        for inst in FARM:
            self.record(ev.InstanceUp(inst.instance_id))
        self.commit()

    def record(self, event: ev.Event) -> None:
        self.store.record(event, self.now)

    def commit(self) -> None:
        """Group commit (the log skips the fsync when nothing was recorded)."""
        if self.store.seq != self.committed_seq:
            self.fsyncs += 1
            self.committed_seq = self.store.seq
        self.store.commit()

    def turn(self, *, window: int) -> None:
        """One loop turn; new batches arrive while fewer than ``window`` are unfinished."""
        self.now += 5.0
        self.open = [b for b in self.open if self.store.batches[b].state not in BATCH_FINAL]
        self.accept(window - len(self.open))
        self._health()
        self._withdrawals()
        self._cancellations()
        self._server_news()
        self.commit()
        self._dispatch()
        self.commit()

    def accept(self, count: int) -> None:
        for _ in range(max(0, count)):
            self.accepted += 1
            plan = make_plan(self.accepted, priority=self.rng.choice((0, 0, 0, 0, 1, -1)))
            self.record(ev.BatchAccepted(plan))
            self.open.append(plan.batch_id)

    def _health(self) -> None:
        """Now and then an instance goes DOWN for a while; its in-flight jobs are lost."""
        for iid, back in list(self.down.items()):
            if self.now >= back:
                self.record(ev.InstanceUp(iid))
                del self.down[iid]
        if self.rng.random() >= self.rates[1]:
            return
        iid = self.rng.choice(FARM).instance_id
        if iid in self.down:
            return
        self.record(ev.InstanceDown(iid, "GET /system_stats: connection refused"))
        self.down[iid] = self.now + 300.0
        for job in [j for j in self.store.in_flight.values() if j.instance_id == iid]:
            self.record(ev.JobLost(job.job_id, job.flying_prompt_id, "instance is down"))

    def _withdrawals(self) -> None:
        """The daemon's part for prompts it gave up on (lost, cancelled): an UP server is
        asked to drop them and takes new work once it has (without this, each outage
        or cancellation shut a server out for good and the farm ran dry)."""
        for iid, prompts in list(self.store.abandoned.items()):
            if iid not in self.down:
                self.record(ev.PromptsWithdrawn(iid, tuple(sorted(prompts))))

    def _cancellations(self) -> None:
        if self.open and self.rng.random() < self.rates[2]:
            for event in cancel_batch(self.store.batches[self.rng.choice(self.open)], "user"):
                self.record(event)

    def _server_news(self) -> None:
        by_instance: dict[str | None, list[Job]] = {}
        for job in self.store.in_flight.values():
            by_instance.setdefault(job.instance_id, []).append(job)
        for jobs in by_instance.values():
            self._serve(jobs)

    def _serve(self, jobs: list[Job]) -> None:
        """One server's turn: it queues what it was sent, finishes the job it runs and
        starts the next. Joining chunks takes seconds, so a COMBINE job ends as it starts."""
        for job in jobs:
            if job.state is JobState.DISPATCHING:
                self.record(ev.JobQueued(job.job_id, job.flying_prompt_id, next(self.numbers)))
        head: Job | None = jobs[0]
        if jobs[0].state is JobState.RUNNING:
            self._finish(jobs[0])
            head = jobs[1] if len(jobs) > 1 else None
        if head is not None:
            self.record(ev.JobStarted(head.job_id, head.flying_prompt_id))
            if head.kind is JobKind.COMBINE:
                self._finish(head)

    def _finish(self, job: Job) -> None:
        assert job.prompt_id is not None
        if self.rng.random() < self.rates[0]:
            self.record(failure_event(job, "CUDA out of memory", permanent=False, now=self.now,
                                      policy=self.store.policy))
        else:
            self.record(ev.JobSucceeded(job.job_id, job.prompt_id, server_outputs(job)))

    def _dispatch(self) -> None:
        store = self.store
        for a in schedule(store.ready.values(), store.instance_views(FARM, now=self.now),
                          now=self.now, fallback=True, combine_concurrency=1,
                          combines_in_flight=store.combines_in_flight(),
                          costs=store.estimates.costs(), unfinished=store.coming_work()):
            prompt_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
            self.record(ev.JobDispatchIntent(a.job_id, a.instance_id, prompt_id))


# --- building the logs (not timed, except as append throughput) --------------------------


@dataclass(frozen=True, slots=True)
class Built:
    events: int
    jobs: int
    seconds: float
    fsyncs: int


def build_log(directory: Path, *, until: Callable[[Farm], bool], window: int = 24,
              backlog: int = 0, tail_turns: int = 0) -> Built:
    """Run a farm into ``directory`` until ``until(farm)``; then optionally accept a
    ``backlog`` of batches at once and run ``tail_turns`` more turns (mixed states)."""
    log = EventLog(directory)
    store = Store(log, POLICY)
    farm = Farm(store, seed=1)
    start = time.perf_counter()
    while not until(farm):
        farm.turn(window=window)
    farm.accept(backlog)
    for _ in range(tail_turns):
        farm.turn(window=0)
    farm.commit()
    seconds = time.perf_counter() - start
    log.close()
    return Built(store.seq, sum(b.job_count for b in store.batches.values()), seconds,
                 farm.fsyncs)


# --- 1. replay and 2. memory, each in a fresh interpreter, as a restarted daemon ---------


def replay_child(directory: Path) -> dict[str, Any]:
    """Seconds (wall and CPU) to rebuild the store from ``directory``."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    log = EventLog(directory)
    store = Store.open(log, POLICY)
    result = {"s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    log.close()
    del store
    return result


def rss_mb() -> tuple[float, float]:
    """Resident set size now and at its peak (``VmRSS``, ``VmHWM``), in MB.

    Not ``getrusage``: its peak survives ``exec`` and would count the parent's memory."""
    with open("/proc/self/status") as f:
        kb = dict(line.split(":", 1) for line in f)
    return int(kb["VmRSS"].split()[0]) / 1024, int(kb["VmHWM"].split()[0]) / 1024


def mem_child(directory: Path) -> dict[str, Any]:
    """The RSS (and peak RSS) a store replayed from ``directory`` adds, in MB."""
    gc.collect()
    before, peak_before = rss_mb()
    store = Store.open(EventLog(directory), POLICY)
    gc.collect()
    after, peak_after = rss_mb()
    states: dict[str, int] = {}
    for job in store.jobs.values():
        states[job.state.value] = states.get(job.state.value, 0) + 1
    return {"mb": after - before, "peak_mb": peak_after - peak_before,
            "jobs": sum(b.job_count for b in store.batches.values()),
            "jobs_held": len(store.jobs), "states": states}


class StubAgent:
    """An instance agent that contacts nobody: it notes when the first POST is handed to
    it, which is the moment the restarted daemon's first dispatch leaves its loop."""

    first_post: float | None = None

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id

    def submit(self, *args: Any, **kwargs: Any) -> None:
        if StubAgent.first_post is None:
            StubAgent.first_post = time.time()

    def check(self, job_id: str, prompt_id: str) -> None:
        pass

    def withdraw(self, prompt_ids: Any) -> None:
        pass

    def download(self, file: Any) -> bytes:
        return b""

    def fetch_outputs(self, batch_id: str, files: Any, outputs_dir: Path) -> None:
        pass


def restart_settings(directory: Path) -> Any:
    """The farm's instances as the daemon's settings, plus ``spare``: an idle server that
    takes any kind, and room for a second COMBINE, so the first decision after the
    restart has a job to dispatch (the farm runs behind its one COMBINE line: what is
    ready is COMBINE jobs)."""
    import config  # the daemon's modules: imported in the child's timed span

    farm = [*FARM, Instance("spare", ("HIGH", "LOW", "COMBINE"))]
    return config.load_settings(None, {
        "STATE_DIR": str(directory), "WEB_ADDRESS": "", "MAX_RETRIES": 3, "RETRY_DELAY": 5,
        "COMBINE_CONCURRENCY": 2,
        "COMFYUI_INSTANCES": [{"instance_id": i.instance_id, "host": "127.0.0.1",
                               "port": 9000 + n, "job_types": list(i.job_types),
                               "max_concurrent": i.max_concurrent}
                              for n, i in enumerate(farm)]})


def restart_child(directory: Path) -> dict[str, Any]:
    """What ``daemon.opened`` does (the event log opened, the store replayed from the
    snapshot and the tail, the loop built), then the servers report UP and the loop
    turns until its first dispatch is handed to an agent. The parent times it from the
    moment it started this interpreter; the phases are printed too."""
    began = time.time()
    import daemon
    from instances.messages import Health
    from service.loop import Loop

    imported = time.time()
    settings = restart_settings(directory)
    event_log = EventLog(StateDir(settings.state_dir).log_dir, retention=settings.log_retention)
    store = Store.open(event_log, daemon.policy_of(settings))
    opened = time.time()
    agents = {i.instance_id: StubAgent(i.instance_id) for i in settings.instances}
    loop = Loop(settings, store, agents, daemon.load_workflows(settings))
    for instance_id in agents:
        loop.post(Health(instance_id, True, "stub"))
    for _ in range(1000):
        if StubAgent.first_post is not None:
            break
        loop.run_once(time.time())
    else:
        raise SystemExit("the restarted loop dispatched nothing in 1,000 turns")
    event_log.close()
    return {"first_post": StubAgent.first_post, "began": began,
            "import_s": imported - began, "open_s": opened - imported,
            "snapshot_seq": store.snapshot_seq, "seq": store.seq}


CHILDREN: dict[str, Callable[[Path], dict[str, Any]]] = {"replay": replay_child,
                                                         "mem": mem_child,
                                                         "restart": restart_child}


def in_children(what: str, directory: Path, runs: int = 3) -> list[dict[str, Any]]:
    return [in_child(what, directory) for _ in range(runs)]


def in_child(what: str, directory: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", what, str(directory)]
    spawned = time.time()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    out = json.loads(done.stdout.splitlines()[-1])  # after what the daemon's loop logged
    return out | {"spawned": spawned}


def measure_replay(directory: Path) -> dict[str, Any]:
    StateDir(directory).events.read_bytes()  # warm the page cache
    runs = in_children("replay", directory)
    return {"replay_1m_s": statistics.median(r["s"] for r in runs),
            "replay_1m_cpu_s": statistics.median(r["cpu_s"] for r in runs)}


def measure_memory(directory: Path) -> dict[str, Any]:
    runs = in_children("mem", directory)
    return {"mem_100k_mb": statistics.median(r["mb"] for r in runs),
            "mem_100k_peak_mb": statistics.median(r["peak_mb"] for r in runs),
            "mem_100k_jobs": runs[0]["jobs"], "mem_100k_jobs_held": runs[0]["jobs_held"],
            "mem_100k_states": runs[0]["states"]}


# --- 3. restart with a long history behind the last snapshot ----------------------------


def snapshot_and_tail(directory: Path, tail_turns: int) -> dict[str, Any]:
    """Open the 1M-event log, take a snapshot (as the daemon does every SNAPSHOT_EVERY
    events) and run ``tail_turns`` more turns after it: the history lies behind the
    snapshot, in a closed segment, and the live segment holds a small tail."""
    log = EventLog(directory)
    store = Store.open(log, POLICY)
    history = store.seq
    began = time.perf_counter()
    store.compact()
    compact_s = time.perf_counter() - began
    farm = Farm(store, seed=2)  # the same farm going on: its clock, batches and numbers
    farm.now = max(max(b.accepted_at, b.ended_at or 0.0) for b in store.batches.values())
    farm.open = [b.batch_id for b in store.open_batches()]
    farm.accepted = len(store.batches)
    for _ in range(tail_turns):
        farm.turn(window=24)
    farm.commit()
    log.close()
    state = StateDir(directory)
    [(_, snapshot)] = LogFiles(state.log_dir, state.events).snapshots()
    return {"restart_history_events": history, "restart_tail_events": store.seq - history,
            "snapshot_1m_mb": snapshot.stat().st_size / 2**20, "snapshot_write_s": compact_s,
            "restart_open_batches": sum(1 for _ in store.open_batches()),
            "restart_store_jobs": len(store.jobs)}


def fresh_copy(source: Path, target: Path) -> Path:
    """Each restart writes to its log (it records what it decides): each starts from an
    identical copy (closed segments hard-linked, the rest copied)."""
    src, dst = StateDir(source), StateDir(target)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, copy_function=os.link,
                    ignore=lambda d, names: [n for n in names if n != src.segments.name]
                    if Path(d) == source else [])
    shutil.copy(src.events, dst.events)
    shutil.copytree(src.snapshots, dst.snapshots)
    return target


def measure_restart(directory: Path, runs: int = 3) -> dict[str, Any]:
    results = [in_child("restart", fresh_copy(directory, directory.with_name("restart-run")))
               for _ in range(runs)]
    return {"restart_1m_history_s": statistics.median(r["first_post"] - r["spawned"]
                                                      for r in results),
            "restart_runs_s": [round(r["first_post"] - r["spawned"], 3) for r in results],
            "restart_import_s": statistics.median(r["import_s"] for r in results),
            "restart_store_open_s": statistics.median(r["open_s"] for r in results)}


# --- 4. one scheduling decision over 10,000 ready jobs -----------------------------------


DECIDE_FARM = (Instance("h1", ("HIGH",)), Instance("h2", ("HIGH",)), Instance("h3", ("HIGH",)),
               Instance("l1", ("LOW",)), Instance("l2", ("LOW",)), Instance("l3", ("LOW",)),
               Instance("hl", ("HIGH", "LOW")), Instance("c1", ("COMBINE",)))
DECIDE_DOWN = ("h3", "l2", "c1")
DECIDE_NOW = 1e5  # after every batch was accepted, before any retry backoff ends


def dispatch(store: Store, job_id: str, instance_id: str, now: float) -> str:
    prompt_id = str(uuid.uuid4())
    store.record(ev.JobDispatchIntent(job_id, instance_id, prompt_id), now)
    return prompt_id


def run_to_success(store: Store, job_id: str, instance_id: str, now: float) -> None:
    prompt_id = dispatch(store, job_id, instance_id, now)
    store.record(ev.JobQueued(job_id, prompt_id, 1), now)
    store.record(ev.JobStarted(job_id, prompt_id), now)
    store.record(ev.JobSucceeded(job_id, prompt_id, server_outputs(store.jobs[job_id])), now)


def decide_store(log: EventLog, ready: int) -> Store:
    """``ready`` batches of one to three chunks, each with one job ready: a HIGH, a LOW or
    (one-chunk batches past their gate) the COMBINE; one in twenty in retry backoff."""
    store = Store(log, POLICY)
    rng = random.Random(2)
    for iid in ("h1", "h2", "l1", "l3", "hl"):
        store.record(ev.InstanceUp(iid), 0.0)
    for n in range(1, ready + 1):
        plan = make_plan(n, frames=101 * rng.choice((1, 1, 2, 3)),
                         priority=rng.choice((0, 0, 0, 1, 2, -1)))
        store.record(ev.BatchAccepted(plan), float(n))
        for _ in range(rng.choice((0, 1, 2))):
            run_to_success(store, next(iter(reversed(store.ready))), "hl", float(n))
        if rng.random() < 0.05:
            _fail_once(store, next(iter(reversed(store.ready))), float(n))
    store.commit()
    return store


def _fail_once(store: Store, job_id: str, now: float) -> None:
    dispatch(store, job_id, "hl", now)
    store.record(failure_event(store.jobs[job_id], "CUDA out of memory", permanent=False,
                               now=DECIDE_NOW, policy=store.policy), now)


def decide_views(store: Store, copies: int = 1) -> list[InstanceView]:
    """h1 and l1 full, h2 and hl with one slot free, l3 idle; h3, l2 and c1 DOWN (so
    COMBINE jobs fall back to any UP instance). With ``copies``, that many such groups
    of eight (``h1.0``, ``h1.1``, ...), each loaded alike."""
    loads = {"h1": 2, "h2": 1, "l1": 2, "hl": 1}
    farm = [replace(i, instance_id=f"{i.instance_id}.{n}") if copies > 1 else i
            for n in range(copies) for i in DECIDE_FARM]
    views = store.instance_views(farm, now=DECIDE_NOW)
    return [replace(v, up=name not in DECIDE_DOWN, in_flight=loads.get(name, 0))
            for v, name in ((v, v.instance_id.split(".")[0]) for v in views)]


def time_decide(ready: Iterable[Job], views: list[InstanceView], *, combines_in_flight: int,
                calls: int = 50) -> tuple[float, int]:
    """Median milliseconds of one ``schedule`` call, and how many jobs it assigned."""
    times, assigned = [], 0
    for _ in range(calls):
        start = time.perf_counter()
        out = schedule(ready, views, now=DECIDE_NOW, fallback=True, combine_concurrency=1,
                       combines_in_flight=combines_in_flight)
        times.append(time.perf_counter() - start)
        assigned = len(out)
    return statistics.median(times) * 1000, assigned


def measure_decide(directory: Path) -> dict[str, Any]:
    log = EventLog(directory)
    store = decide_store(log, 10_000)
    log.close()
    views = decide_views(store)
    ms, assigned = time_decide(store.ready.values(), views, combines_in_flight=0)
    # The worst case reads every ready job: the one free slot is on the LOW-only l3, no LOW
    # job is ready and the one COMBINE slot is taken.
    full = [replace(v, in_flight=1 if v.instance_id == "l3" else v.max_concurrent)
            for v in views]
    no_low = [j for j in store.ready.values() if j.kind is not JobKind.LOW]
    scan_ms, _ = time_decide(no_low, full, combines_in_flight=1)
    farm = decide_views(store, copies=8)  # 64 instances: eight groups like the eight above
    farm_ms, farm_assigned = time_decide(store.ready.values(), farm, combines_in_flight=0)
    kinds = {k.value: sum(1 for j in store.ready.values() if j.kind is k) for k in JobKind}
    return {"decide_10k_ms": ms, "decide_10k_assigned": assigned, "decide_ready": len(store.ready),
            "decide_ready_kinds": kinds, "decide_full_scan_ms": scan_ms,
            "decide_full_scan_jobs": len(no_low), "decide_10k_64i_ms": farm_ms,
            "decide_10k_64i_assigned": farm_assigned}


# --- running it all ----------------------------------------------------------------------


def run(replay_events: int, mem_jobs: int, say: Callable[[str], None]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="comfy-dual-bench-") as tmp:
        base = Path(tmp)
        say(f"building a log of {replay_events:,} events (group commit per turn) ...")
        built = build_log(base / "replay", until=lambda f: f.store.seq >= replay_events)
        result |= {"replay_events": built.events, "replay_jobs": built.jobs,
                   "events_per_s_group_commit": built.events / built.seconds,
                   "events_per_fsync": built.events / built.fsyncs,
                   "log_mb": StateDir(base / "replay").events.stat().st_size / 2**20}
        say("replaying it 3 times ...")
        result |= measure_replay(base / "replay")
        say("taking a snapshot behind it, a short tail after it, and restarting 3 times ...")
        result |= snapshot_and_tail(base / "replay", tail_turns=20)
        result |= measure_restart(base / "replay")
        shutil.rmtree(base / "replay")
        shutil.rmtree(base / "restart-run", ignore_errors=True)
        say(f"building a store of {mem_jobs:,} jobs in mixed states ...")
        batches = -(-mem_jobs // 15)
        build_log(base / "mem", until=lambda f: f.accepted >= batches // 2,
                  backlog=batches - batches // 2, tail_turns=200)
        result |= measure_memory(base / "mem")
        say("scheduling over 10,000 ready jobs ...")
        result |= measure_decide(base / "decide")
    return result


def report(result: dict[str, Any]) -> str:
    lines = []
    for key, target in TARGETS.items():
        verdict = "ok" if result[key] <= target else "MISSED"
        lines.append(f"{key:<16} {result[key]:>10.2f}   target <= {target:g}   {verdict}")
    lines += [f"{key:<26} {_show(value)}" for key, value in result.items() if key not in TARGETS]
    return "\n".join(lines)


def _show(value: Any) -> str:
    return f"{value:,.2f}" if isinstance(value, float) else str(value)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--replay-events", type=int, default=1_000_000)
    parser.add_argument("--mem-jobs", type=int, default=100_000)
    parser.add_argument("--child", nargs=2, metavar=("WHAT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(None if argv is None else list(argv))
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](Path(args.child[1]))))
        return 0
    say = (lambda _: None) if args.json else (lambda s: print(s, file=sys.stderr))
    result = run(args.replay_events, args.mem_jobs, say)
    print(json.dumps(result) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
