"""The scheduler replayed in simulated time: the daemon's store and scheduler, servers that
run their queues in order, no processes, no sockets. A workload takes a second, not a
minute, and ends the same every time, so rules can be compared without the noise of a
real run; the latencies stand for the milliseconds a real run adds.

Run from the repository root (not part of the test suite)::

    .venv/bin/python bench/replay.py                          # W5 and W6, no latency
    .venv/bin/python bench/replay.py --post-latency 0.0135 --notify-latency 0.0015
    .venv/bin/python bench/replay.py --workloads W1 W3 --seeds 7 1 2 3

``--post-latency``: units from the turn that decides a dispatch to the job being in its
server's queue (the commit, the POST). ``--notify-latency``: units from a job starting
or ending on its server to the daemon's turn that records it. A job queued behind
another starts the instant that one ends, as on a server. Workloads and policies are
``bench/makespan.py``'s (``--seeds`` draws other video lengths for W3, W5 and W6); the
figures are in units: makespan, the lower bound, their ratio; and counts: model switches
(a server's first job and each change of kind, as ``bench/makespan.py`` counts them) and
jobs stolen.
"""

# ruff: noqa: E402 - the repository root goes on sys.path before the project is imported

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import statistics
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import makespan

import daemon
from statemachine import events as ev
from statemachine.log import MemoryLog
from statemachine.plan import BatchPlan
from statemachine.rules import Policy
from statemachine.scheduler import schedule
from statemachine.store import Store


class Replay:
    """The daemon's turns on the real store and scheduler against servers in simulated
    time, with the rules of ``policy``. ``instances`` are read as ``Store.instance_views``
    reads configured ones. With ``switch_cost``, a server takes that much longer for a job
    of another kind than the one it ran before (its first job too), as the simulator does.
    A turn runs once all that happens at one instant is recorded."""

    def __init__(self, durations: Mapping[str, float], instances: Sequence[Any], *,
                 switch_cost: float = 0.0, post_latency: float = 0.0,
                 notify_latency: float = 0.0, combine_concurrency: int = 1,
                 policy: Policy | None = None) -> None:
        self.store = Store(MemoryLog(), policy)
        self.durations = durations
        self.instances = instances
        self.switch_cost = switch_cost
        self.post_latency = post_latency
        self.notify_latency = notify_latency
        self.combine_concurrency = combine_concurrency
        self.last: dict[str, str] = {}  # instance -> kind of the last job it ran
        self.switches = 0
        self.stolen = 0
        self.queues: dict[str, deque[str]] = {i.instance_id: deque() for i in instances}
        self.running: set[str] = set()  # instances running a job
        self.now = 0.0
        self.end = 0.0  # when the last job ended
        self._due: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()  # ties in time: first scheduled, first done
        for inst in instances:
            self.store.record(ev.InstanceUp(inst.instance_id), 0.0)

    def add(self, plans: Iterable[BatchPlan]) -> Replay:
        for plan in plans:
            self.store.record(ev.BatchAccepted(plan), self.now)
        return self

    def run(self) -> float:
        """Run until nothing is left to happen; the time the last job ended."""
        self.turn()
        while self._due:
            self.now = self._due[0][0]
            while self._due and self._due[0][0] == self.now:
                heapq.heappop(self._due)[2]()
            self.turn()
        return self.end

    def turn(self) -> None:
        store = self.store
        picks = schedule(store.ready.values(),
                         store.instance_views(self.instances, now=self.now),
                         now=self.now, fallback=False,
                         combine_concurrency=self.combine_concurrency,
                         combines_in_flight=store.combines_in_flight(),
                         costs=store.estimates.costs(), unfinished=store.coming_work(),
                         combines_coming=store.combines_coming())
        for pick in picks:
            prompt_id = f"p{next(self._order)}"
            store.record(ev.JobDispatchIntent(pick.job_id, pick.instance_id, prompt_id),
                         self.now)
            store.record(ev.JobQueued(pick.job_id, prompt_id, 1), self.now)
            self.stolen += pick.stolen
            self._after(self.post_latency, partial(self._arrive, pick.instance_id, pick.job_id))
        store.commit()

    def _after(self, delay: float, action: Callable[[], None]) -> None:
        """``action()`` ``delay`` units from now; at once if that is no time (a latency of
        zero adds no step, so the run is the same as one without latency)."""
        if delay <= 0:
            action()
        else:
            self._at(self.now + delay, action)

    def _at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._due, (when, next(self._order), action))

    def _arrive(self, instance_id: str, job_id: str) -> None:
        self.queues[instance_id].append(job_id)
        self._start(instance_id)

    def _start(self, instance_id: str) -> None:
        queue = self.queues[instance_id]
        if instance_id in self.running or not queue:
            return
        job = self.store.jobs[queue.popleft()]
        self.running.add(instance_id)
        self._heard(ev.JobStarted(job.job_id, job.flying_prompt_id))
        kind = job.kind.value
        switched = self.last.get(instance_id) != kind
        self.switches += switched
        self.last[instance_id] = kind
        self._at(self.now + self.switch_cost * switched + self.durations[kind],
                 partial(self._end, instance_id, ev.JobSucceeded(job.job_id,
                                                                 job.flying_prompt_id, {})))

    def _end(self, instance_id: str, succeeded: ev.JobSucceeded) -> None:
        self.running.discard(instance_id)
        self.end = self.now
        self._heard(succeeded)
        self._start(instance_id)

    def _heard(self, event: ev.Event) -> None:
        """The daemon records ``event`` once ``notify_latency`` has passed."""
        self._after(self.notify_latency, lambda: self.store.record(event, self.now))


def replay(workload: makespan.Workload, strategy: makespan.Strategy, files: Sequence[Path],
           *, post_latency: float, notify_latency: float) -> dict[str, Any]:
    """One workload (its prompt ``files``) and policy, as ``bench/makespan.py`` would run
    it, replayed."""
    ports = range(8188, 8188 + len(workload.layout))  # never opened
    settings = makespan.bench_settings(files[0].parent / "state", ports, strategy,
                                       layout=workload.layout)
    plans = makespan.plans_of(files, settings)
    instances = settings.instances
    run = Replay(workload.durations, instances, switch_cost=workload.switch_cost,
                 post_latency=post_latency, notify_latency=notify_latency,
                 combine_concurrency=settings.combine_concurrency,
                 policy=daemon.policy_of(settings)).add(plans)
    span = run.run()
    if any(b.state.value != "done" for b in run.store.batches.values()):
        raise RuntimeError(f"{workload.name} {strategy.name}: not every batch ended")
    stealing, pinned = makespan.lower_bounds(workload, plans, instances,
                                             settings.combine_concurrency)
    bound = stealing if strategy.steal else pinned
    return {"workload": workload.name, "policy": strategy.name, "makespan": round(span, 4),
            "lower_bound": round(bound, 4), "ratio": round(span / bound, 4),
            "switches": run.switches, "stolen": run.stolen}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(makespan.FARM_WORKLOADS))
    parser.add_argument("--policies", nargs="+", default=["strict-batch", "steal"],
                        choices=[s.name for s in (*makespan.STRATEGIES, makespan.SINGLE)])
    parser.add_argument("--seeds", nargs="+", type=int, default=[makespan.SEED])
    parser.add_argument("--post-latency", type=float, default=0.0, metavar="UNITS")
    parser.add_argument("--notify-latency", type=float, default=0.0, metavar="UNITS")
    parser.add_argument("--json", action="store_true", help="one JSON object a line")
    args = parser.parse_args(argv)
    strategies = [s for s in (*makespan.STRATEGIES, makespan.SINGLE)
                  if s.name in args.policies]
    rows = []
    with tempfile.TemporaryDirectory(prefix="comfy-dual-replay-") as tmp:
        for seed in args.seeds:
            for workload in (w for w in makespan.workloads(seed) if w.name in args.workloads):
                files = makespan.write_prompts(Path(tmp) / f"{seed}-{workload.name}",
                                               workload.frames)
                for strategy in strategies:
                    row = {"seed": seed, **replay(
                        workload, strategy, files, post_latency=args.post_latency,
                        notify_latency=args.notify_latency)}
                    rows.append(row)
                    print(json.dumps(row) if args.json else
                          f"seed {seed:<4} {row['workload']:<3} {row['policy']:<14} "
                          f"makespan {row['makespan']:7.2f}  ratio {row['ratio']:.3f}  "
                          f"switches {row['switches']:3}  stolen {row['stolen']}", flush=True)
    if len(args.seeds) > 1 and not args.json:
        for (name, policy), group in itertools.groupby(
                sorted(rows, key=lambda r: (r["workload"], r["policy"])),
                key=lambda r: (r["workload"], r["policy"])):
            ratios = [r["ratio"] for r in group]
            print(f"mean      {name:<3} {policy:<14} ratio {statistics.mean(ratios):.3f} "
                  f"over {len(ratios)} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
