"""Makespan benchmark: how close each scheduling policy gets to a lower bound.

Run from the repository root (not part of the test suite; at the default unit W1 to W4
take about 4 minutes, W5 and W6 about 5, most of it their one-server runs)::

    .venv/bin/python bench/makespan.py              # a table, W1 to W6
    .venv/bin/python bench/makespan.py --json       # one JSON object a line, one per run
    .venv/bin/python bench/makespan.py --workloads W1 --unit 0.1     # a quick look
    .venv/bin/python bench/makespan.py --farm       # just the eight-server W5 and W6
    .venv/bin/python bench/makespan.py --farm --unit 1.0 --no-single   # slower, less overhead

The real daemon (``daemon.run_files``: event log with fsync, agents, HTTP, websocket)
renders each workload on simulated ComfyUI servers, each in its own process; one time
unit is ``--unit`` seconds and every figure is reported in units. W1 to W4 run on two
servers: ``high`` takes HIGH, ``low`` takes LOW; W5 and W6 on a farm of eight: ``h1`` to
``h4`` take HIGH, ``l1`` to ``l4`` LOW. Every server takes COMBINE (the default rule) and
has ``max_concurrent`` 2.

Workloads (``FRAMES_PER_CHUNK`` 101, so 500 frames are 5 chunks, 15 jobs):

- W1: four 500-frame videos; HIGH = LOW = 1 unit, COMBINE = 0.2.
- W2: W1 with LOW = 2 units.
- W3: twenty videos of 60 to 700 frames (``--seed``), durations of W1.
- W4: W1 plus a 0.5-unit model switch whenever a server runs a job of another kind than
  its previous one (and for its very first job: the simulator loads a model then too).
- W5: forty videos of 60 to 700 frames (the first twenty are W3's), durations of W1, on
  the eight-server farm.
- W6: W5 plus W4's 0.5-unit model switch; run with stealing, every server may take every
  kind.

Policies: ``strict-global`` (COMBINE_GATE "global": the seed's phases) and
``strict-batch`` (COMBINE_GATE "batch") pin each kind to its server; ``steal`` is the
batch gate with ``steal_types``: HIGH servers may steal LOW jobs and LOW servers HIGH, with
durations and the switch cost learned from the run itself (no JOB_DURATIONS, SWITCH_COST
"learn"). ``single`` (ENABLE_DUAL_INSTANCE = False, one server for everything) is the
baseline of ``speedup_vs_single``.

Figures, in units, measured from the run's event log:

- ``makespan``: first dispatch to the end of the last batch.
- ``lower_bound``: the largest of the longest dependency chain (COMBINE jobs after their
  batch's renders, plus one model load), the busiest server's required work (the work,
  plus one load per kind, spread over the servers as evenly as placement allows; with
  stealing every server may run every kind, so that is the total over the server count)
  and the COMBINE line: COMBINE jobs run one at a time (``COMBINE_CONCURRENCY`` 1), none
  before the first batch's renders are done, so the earliest a batch can be rendered plus
  all COMBINE work. ``lower_bound_pinned`` is the same bound when each kind stays on its
  own servers.
- ``speedup_vs_single``: the makespan of ``single`` over this one.
- ``busy``: each server's share of the makespan spent running jobs; ``busy_render``: its
  share of the render phase (first dispatch to the end of the last HIGH or LOW job).
- ``stolen``: jobs run outside their server's ``job_types``; ``switches``: model loads per
  server (kind changes between consecutive runs, the first run included).
"""

# ruff: noqa: E402 - the repository root goes on sys.path before the project is imported

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import config
import daemon
from service.logs import setup_logging
from statedir import StateDir
from statemachine.log import EventLog
from statemachine.plan import BatchPlan, JobKind
from statemachine.planner import plan_prompt_file
from statemachine.store import read_records
from statemachine.timeline import Attempt, Timeline, build_timeline, busy_seconds

UNIT = 0.2  # seconds
SEED = 7
Layout = tuple[tuple[str, str], ...]  # (instance id, the render kind it takes) per server
PAIR: Layout = (("high", "HIGH"), ("low", "LOW"))
FARM: Layout = tuple((f"{kind[0].lower()}{n}", kind) for kind in ("HIGH", "LOW")
                     for n in range(1, 5))
FARM_WORKLOADS = ("W5", "W6")
PROMPT = "A slow dolly shot along an empty beach at sunset, warm golden light"


@dataclass(frozen=True)
class Workload:
    name: str
    frames: tuple[int, ...]
    durations: Mapping[str, float]  # units per job, by kind
    switch_cost: float = 0.0  # units
    layout: Layout = PAIR

    def seconds(self, unit: float) -> dict[str, float]:
        return {kind: units * unit for kind, units in self.durations.items()}


@dataclass(frozen=True)
class Strategy:
    """A scheduling policy under test: the daemon's settings that make it."""

    name: str
    gate: str
    steal: bool = False
    dual: bool = True


STRICT_BATCH = Strategy("strict-batch", "batch")
STRATEGIES = (Strategy("strict-global", "global"), STRICT_BATCH,
              Strategy("steal", "batch", steal=True))
SINGLE = Strategy("single", "batch", dual=False)


def workloads(seed: int) -> list[Workload]:
    w1 = Workload("W1", (500,) * 4, {"HIGH": 1.0, "LOW": 1.0, "COMBINE": 0.2})
    rng = random.Random(seed)
    lengths = tuple(rng.randint(60, 700) for _ in range(40))  # W3 takes the first twenty
    w5 = dataclasses.replace(w1, name="W5", frames=lengths, layout=FARM)
    return [w1,
            dataclasses.replace(w1, name="W2", durations={**w1.durations, "LOW": 2.0}),
            dataclasses.replace(w1, name="W3", frames=lengths[:20]),
            dataclasses.replace(w1, name="W4", switch_cost=0.5),
            w5, dataclasses.replace(w5, name="W6", switch_cost=0.5)]


def steal_types(layout: Layout) -> dict[str, frozenset[str]]:
    """With stealing, each server may take the render kinds it is not there for."""
    kinds = {kind for _, kind in layout}
    return {name: frozenset(kinds - {kind}) for name, kind in layout}


# --- simulated servers, settings, prompt files -------------------------------------------


@contextlib.contextmanager
def simulators(count: int, durations: Mapping[str, float], switch_cost: float,
               output_dir: Path) -> Iterator[list[int]]:
    """``count`` simulator processes sharing ``output_dir``; yields their ports. Each
    picks its own free port and says which (a port found free here could be taken by
    another socket before the simulator bound it)."""
    procs: list[subprocess.Popen[str]] = []
    ports: list[int] = []
    try:
        for _ in range(count):
            args = [sys.executable, "-m", "simulator", "--port", "0",
                    "--switch-cost", str(switch_cost), "--output-dir", str(output_dir),
                    *(f"--duration={k}={v}" for k, v in durations.items())]
            proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)
            procs.append(proc)
            line = proc.stdout.readline() if proc.stdout else ""
            if "listening" not in line:
                raise RuntimeError(f"a simulator did not start: {line!r}")
            ports.append(int(line.rsplit(":", 1)[1]))
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


def bench_settings(state_dir: Path, ports: Sequence[int], strategy: Strategy,
                   extra: Mapping[str, Any] | None = None, layout: Layout = PAIR
                   ) -> config.Settings:
    """The instances of ``layout`` on ``ports``, or the single one on the first port;
    artifacts read in place from the servers' shared output directory."""
    steals = steal_types(layout)
    instances = [{"instance_id": name, "host": "127.0.0.1", "port": port,
                  "job_types": [kind], "max_concurrent": 2,
                  "steal_types": sorted(steals[name]) if strategy.steal else []}
                 for (name, kind), port in zip(layout, ports, strict=False)]
    single = {**config.SINGLE_INSTANCE_CONFIG, "port": ports[0]}
    return config.load_settings(overrides={
        "STATE_DIR": str(state_dir), "ENABLE_DUAL_INSTANCE": strategy.dual,
        "COMBINE_GATE": strategy.gate,
        "COMFYUI_INSTANCES": instances, "SINGLE_INSTANCE_CONFIG": single,
        "ARTIFACT_TRANSFER": "path", "ARTIFACT_DIR": str(StateDir(state_dir).artifacts),
        **(extra or {})})


def write_prompts(directory: Path, frames: Sequence[int]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, count in enumerate(frames, start=1):
        path = directory / f"video_{n:02d}.txt"
        path.write_text(f"video_{n:02d}\n\n{count}\n\n{PROMPT}, take {n}\n\nblurry\n")
        paths.append(path)
    return paths


def quiet_logs() -> None:
    """Warnings and errors on stderr; stdout stays for the results."""
    setup_logging(None)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.getLogger().setLevel(logging.WARNING)


# --- one run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    makespan: float  # units, like everything here
    render_phase: float
    busy: dict[str, float]
    busy_render: dict[str, float]
    stolen: int
    switches: dict[str, int]
    all_done: bool


@dataclass(frozen=True)
class Bench:
    """What every run of one benchmark shares."""

    unit: float  # seconds in one time unit
    work: Path  # where state directories go
    extra: Mapping[str, Any]  # settings on top of ``bench_settings``'s
    say: Callable[[str], None]  # progress, to stderr
    single: bool = True  # run the one-server baseline (speed-ups need it)


def run(bench: Bench, workload: Workload, strategy: Strategy, files: Sequence[Path],
        time_limit: float) -> Measured:
    """Render ``files`` with ``strategy`` on fresh simulators and a fresh state dir; stop
    after ``time_limit`` seconds whatever happens."""
    state = bench.work / f"{workload.name}-{strategy.name}"
    count = len(workload.layout) if strategy.dual else 1
    with simulators(count, workload.seconds(bench.unit), workload.switch_cost * bench.unit,
                    StateDir(state).artifacts) as ports:
        settings = bench_settings(state, ports, strategy, extra=bench.extra,
                                  layout=workload.layout)
        stop = daemon.Stop()
        limit = threading.Timer(time_limit, stop.event.set)
        limit.start()
        try:
            result = daemon.run_files(settings, files, stop)
        finally:
            limit.cancel()
    log = EventLog(StateDir(state).log_dir)
    try:
        tl = build_timeline(read_records(log))
    finally:
        log.close()
    return measure(tl, settings.instances, bench.unit, all_done=result.all_done)


def measure(tl: Timeline, instances: Sequence[config.InstanceConfig], unit: float, *,
            all_done: bool) -> Measured:
    start = min(a.dispatched_at for a in tl.attempts)
    end = max(b.ended_at or start for b in tl.batches.values())
    render_end = max(a.ended_at or end for a in tl.attempts if a.kind != "COMBINE")
    clipped = [_clip(a, render_end) for a in tl.attempts if a.busy_from < render_end]
    ids = [i.instance_id for i in instances]
    return Measured(
        makespan=(end - start) / unit, render_phase=(render_end - start) / unit,
        busy={i: busy_seconds(tl.attempts, i, until=end) / (end - start) for i in ids},
        busy_render={i: busy_seconds(clipped, i, until=render_end) / (render_end - start)
                     for i in ids},
        stolen=sum(1 for a in tl.attempts for i in instances
                   if a.instance_id == i.instance_id and not i.accepts(a.kind)),
        switches={i: _switches(tl.attempts, i) for i in ids}, all_done=all_done)


def _clip(attempt: Attempt, until: float) -> Attempt:
    ended = attempt.ended_at if attempt.ended_at is not None else until
    return dataclasses.replace(attempt, ended_at=min(ended, until))


def _switches(attempts: Sequence[Attempt], instance_id: str) -> int:
    kinds = [a.kind for a in sorted(attempts, key=lambda a: a.busy_from)
             if a.instance_id == instance_id]
    return sum(1 for before, kind in itertools.pairwise([None, *kinds]) if before != kind)


# --- the lower bound ---------------------------------------------------------------------


def plans_of(files: Sequence[Path], settings: config.Settings) -> list[BatchPlan]:
    return [plan_prompt_file(path.read_bytes(), path.name, batch_id=f"b{n:04d}",
                             settings=settings) for n, path in enumerate(files, start=1)]


def work_by_kind(plans: Sequence[BatchPlan], durations: Mapping[str, float]
                 ) -> dict[str, float]:
    work = dict.fromkeys(durations, 0.0)
    for job in (j for plan in plans for j in plan.jobs):
        work[job.kind.value] += durations[job.kind.value]
    return work


def longest_chain(plans: Sequence[BatchPlan], durations: Mapping[str, float]) -> float:
    """The longest dependency path, COMBINE jobs after every render of their batch."""
    longest = 0.0
    for plan in plans:
        finish: dict[str, float] = {}
        for job in plan.jobs:
            after = [finish[d] for d in job.deps]
            if job.kind is JobKind.COMBINE:
                after += [finish[j.job_id] for j in plan.jobs if j.kind.renders]
            finish[job.job_id] = max(after, default=0.0) + durations[job.kind.value]
        longest = max(longest, *finish.values())
    return longest


def load_bound(work: Mapping[str, float], allowed: Mapping[str, frozenset[str]],
               switch_cost: float) -> float:
    """The busiest server's least work: for every set of servers, the work only they may
    do (plus one model load per kind of it), spread evenly over them."""
    best = 0.0
    servers = sorted(allowed)
    for size in range(1, len(servers) + 1):
        for group in itertools.combinations(servers, size):
            kinds = [k for k, units in work.items() if units > 0
                     and all(s in group for s in servers if k in allowed[s])]
            best = max(best, (sum(work[k] for k in kinds) + switch_cost * len(kinds)) / size)
    return best


def combine_line(plans: Sequence[BatchPlan], durations: Mapping[str, float],
                 combine_concurrency: int) -> float:
    """COMBINE jobs run ``combine_concurrency`` at a time and none before its batch's
    renders are done: no run ends before the first batch could be rendered plus all the
    COMBINE work shared by that many."""
    first = min(_render_chain(plan, durations) for plan in plans)
    return first + work_by_kind(plans, durations)["COMBINE"] / combine_concurrency


def _render_chain(plan: BatchPlan, durations: Mapping[str, float]) -> float:
    return sum(durations[j.kind.value] for j in plan.jobs if j.kind.renders)


def lower_bounds(workload: Workload, plans: Sequence[BatchPlan],
                 instances: Sequence[config.InstanceConfig], combine_concurrency: int
                 ) -> tuple[float, float]:
    """(bound when servers may steal, bound when every kind stays on its servers)."""
    chain = max(longest_chain(plans, workload.durations) + workload.switch_cost,
                combine_line(plans, workload.durations, combine_concurrency))
    work = work_by_kind(plans, workload.durations)
    pinned = {i.instance_id: i.job_types for i in instances}
    steals = steal_types(workload.layout)
    stealing = {i: kinds | steals.get(i, frozenset()) for i, kinds in pinned.items()}
    return (max(chain, load_bound(work, stealing, workload.switch_cost)),
            max(chain, load_bound(work, pinned, workload.switch_cost)))


# --- the whole benchmark -----------------------------------------------------------------


def bench_workload(bench: Bench, workload: Workload, strategies: Sequence[Strategy]
                   ) -> list[dict[str, Any]]:
    files = write_prompts(bench.work / workload.name, workload.frames)
    settings = bench_settings(bench.work / workload.name, range(1, len(workload.layout) + 1),
                              STRICT_BATCH, extra=bench.extra, layout=workload.layout)
    plans = plans_of(files, settings)
    bound, pinned = lower_bounds(workload, plans, settings.instances,
                                 settings.combine_concurrency)
    # generous: every job one after the other, three times over, plus start-up
    limit = 3 * bench.unit * sum(work_by_kind(plans, workload.durations).values()) + 60
    single = timed_run(bench, workload, SINGLE, files, limit) if bench.single else None
    rows = []
    for strategy in strategies:
        m = timed_run(bench, workload, strategy, files, limit)
        rows.append({
            "workload": workload.name, "policy": strategy.name, "unit_s": bench.unit,
            "makespan": round(m.makespan, 3), "lower_bound": round(bound, 3),
            "ratio": round(m.makespan / bound, 4), "lower_bound_pinned": round(pinned, 3),
            "speedup_vs_single": single and round(single.makespan / m.makespan, 3),
            "single_makespan": single and round(single.makespan, 3),
            "busy": _rounded(m.busy), "busy_render": _rounded(m.busy_render),
            "render_phase": round(m.render_phase, 3), "stolen": m.stolen,
            "switches": m.switches, "all_done": m.all_done})
    return rows


def timed_run(bench: Bench, workload: Workload, strategy: Strategy, files: Sequence[Path],
              limit: float) -> Measured:
    began = time.monotonic()
    m = run(bench, workload, strategy, files, limit)
    bench.say(f"{workload.name} {strategy.name:<13} makespan {m.makespan:6.2f} units "
              f"({time.monotonic() - began:.1f} s){'' if m.all_done else '  NOT ALL DONE'}")
    return m


def _rounded(shares: Mapping[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in shares.items()}


def verdicts(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The issue's acceptance targets, each with the measured figure."""
    by = {(r["workload"], r["policy"]): r for r in rows}
    out = []
    w1 = by.get(("W1", "strict-batch"))
    if w1:
        out += [_check("W1 strict-batch ratio", w1["ratio"], "<=", 1.05),
                _speedup("W1", w1, 1.9),
                _check("W1 strict-batch min busy_render", min(w1["busy_render"].values()),
                       ">=", 0.95)]
    for name, least_gain in (("W1", -0.02), ("W2", 0.15), ("W3", -0.02), ("W4", 0.15)):
        strict = [by[(name, p)]["makespan"] for p in ("strict-global", "strict-batch")
                  if (name, p) in by]
        if strict and (name, "steal") in by:
            gain = 1 - by[(name, "steal")]["makespan"] / min(strict)
            out.append(_check(f"{name} steal gain over best strict", round(gain, 4), ">=",
                              least_gain))
    w5 = by.get(("W5", "strict-batch"))
    if w5:
        out += [_check("W5 strict-batch ratio", w5["ratio"], "<=", 1.15),
                _speedup("W5", w5, 7.0)]
    w6 = by.get(("W6", "steal"))
    if w5 and w6:
        out.append(_check("W6 steal ratio over W5 strict-batch ratio",
                          round(w6["ratio"] / w5["ratio"], 4), "<=", 1.05))
    return out


def _speedup(name: str, row: Mapping[str, Any], target: float) -> str:
    value = row["speedup_vs_single"]
    if value is None:
        return f"{'SKIPPED':<8}{name} strict-batch speed-up: no one-server run (--no-single)"
    return _check(f"{name} strict-batch speed-up", value, ">=", target)


def _check(what: str, value: float, op: str, target: float) -> str:
    ok = value <= target if op == "<=" else value >= target
    return f"{'MET    ' if ok else 'MISSED '} {what}: {value} (target {op} {target})"


def render_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [f"{'':4} {'policy':<14}{'makespan':>9}{'bound':>8}{'ratio':>7}{'pinned':>8}"
             f"{'x single':>9}  busy (render phase)       stolen  switches"]
    for r in rows:
        busy = " ".join(f"{k} {v:.1%}" for k, v in r["busy_render"].items())
        switches = " ".join(f"{k} {v}" for k, v in r["switches"].items())
        speedup = "-" if r["speedup_vs_single"] is None else f"{r['speedup_vs_single']:.2f}x"
        lines.append(f"{r['workload']:<4} {r['policy']:<14}{r['makespan']:9.2f}"
                     f"{r['lower_bound']:8.2f}{r['ratio']:7.3f}{r['lower_bound_pinned']:8.2f}"
                     f"{speedup:>9}  {busy:<26}{r['stolen']:>6}  {switches}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object a line")
    parser.add_argument("--unit", type=float, default=UNIT, help="seconds in one time unit")
    parser.add_argument("--seed", type=int, default=SEED, help="W3's video lengths")
    parser.add_argument("--workloads", nargs="+", default=[w.name for w in workloads(SEED)])
    parser.add_argument("--farm", action="store_true",
                        help=f"just the eight-server workloads ({' '.join(FARM_WORKLOADS)})")
    parser.add_argument("--policies", nargs="+", default=[s.name for s in STRATEGIES],
                        choices=[s.name for s in STRATEGIES])
    parser.add_argument("--no-single", action="store_true",
                        help="skip the one-server baseline (no speed-ups; for long units)")
    parser.add_argument("--combine-concurrency", type=int, metavar="N",
                        help="COMBINE_CONCURRENCY for every run (default: config.py's)")
    args = parser.parse_args(argv)
    quiet_logs()
    strategies = [s for s in STRATEGIES if s.name in args.policies]
    names = FARM_WORKLOADS if args.farm else args.workloads
    rows: list[dict[str, Any]] = []
    extra = ({} if args.combine_concurrency is None
             else {"COMBINE_CONCURRENCY": args.combine_concurrency})
    with tempfile.TemporaryDirectory(prefix="comfy-dual-makespan-") as tmp:
        bench = Bench(args.unit, Path(tmp), extra, _say, single=not args.no_single)
        for workload in (w for w in workloads(args.seed) if w.name in names):
            new = bench_workload(bench, workload, strategies)
            rows += new
            if args.json:
                for row in new:
                    print(json.dumps(row), flush=True)
    if not args.json:
        print(render_table(rows))
    for line in verdicts(rows):
        _say(line)
    return 0


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
