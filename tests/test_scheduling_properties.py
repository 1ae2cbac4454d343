"""Stateful property test of the daemon's core: the real loop (``Loop.run_once``) over
fake agents and a fake clock, with its store, rules and scheduler, with crashes, restarts
and replays, checked after every step.

Each step is something a server, a person or the clock does: a server accepts, starts or
ends a job, answers a reconnection's question, goes down or comes up, lets go of prompts
it was told to stop; a person submits a file, cancels or retries a batch; time passes;
the daemon crashes mid-turn and restarts. The loop then runs until it has nothing more to
do, and the scheduler's choices in each of its turns are checked against rules restated
here independently of its code.

Half the layouts let instances steal (``steal_types``); the loop's estimates come from the
configured JOB_DURATIONS and SWITCH_COST and from the runs it sees.

The budget is set by COMFY_DUAL_EXAMPLES (default 200); `make soak` runs it with 2,000.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from fakes import FakeAgent, Harness
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from support import Inst, make_plan

from instances.messages import Withdrawn
from service.intake import SubmitFile
from statemachine import events as ev
from statemachine.job import IN_FLIGHT, JOB_FINAL, BatchState, Job, JobState
from statemachine.log import MemoryLog
from statemachine.plan import JobKind
from statemachine.scheduler import InstanceView
from statemachine.store import Store


def kinds(*names: str) -> frozenset[str]:
    return frozenset(names)


LAYOUTS = {
    "dual": (Inst("high", kinds("HIGH", "COMBINE"), 2),
             Inst("low", kinds("LOW", "COMBINE"), 2)),
    "single": (Inst("one", kinds("HIGH", "LOW", "COMBINE"), 2),),
    "three": (Inst("h1", kinds("HIGH"), 1), Inst("h2", kinds("HIGH"), 2),
              Inst("low", kinds("LOW", "COMBINE"), 1)),
    "combiner": (Inst("high", kinds("HIGH"), 2), Inst("low", kinds("LOW"), 3),
                 Inst("mix", kinds("COMBINE"), 1)),
    "dual_steal": (Inst("high", kinds("HIGH", "COMBINE"), 2, kinds("LOW")),
                   Inst("low", kinds("LOW", "COMBINE"), 2, kinds("HIGH"))),
    "three_steal": (Inst("h1", kinds("HIGH"), 1, kinds("LOW", "COMBINE")),
                    Inst("h2", kinds("HIGH"), 2),
                    Inst("low", kinds("LOW", "COMBINE"), 1, kinds("HIGH"))),
    "farm": (Inst("h1", kinds("HIGH", "COMBINE"), 2), Inst("h2", kinds("HIGH", "COMBINE"), 2),
             Inst("l1", kinds("LOW", "COMBINE"), 2), Inst("l2", kinds("LOW", "COMBINE"), 1)),
    "combiner_steal": (Inst("high", kinds("HIGH"), 2, kinds("LOW", "COMBINE")),
                       Inst("low", kinds("LOW"), 3, kinds("HIGH")),
                       Inst("mix", kinds("COMBINE"), 1, kinds("HIGH", "LOW"))),
}
STEALING = sorted(name for name, layout in LAYOUTS.items()
                  if any(i.steal_types for i in layout))  # drawn twice as often
# (JOB_DURATIONS, SWITCH_COST): nothing known until runs are seen, or run times configured
COSTS: tuple[tuple[dict[str, float], float | str], ...] = (
    ({}, "learn"), ({"HIGH": 1.0, "LOW": 1.0, "COMBINE": 0.2}, 0.0),
         ({"HIGH": 1.0, "LOW": 2.0, "COMBINE": 0.2}, 0.5),
         ({"HIGH": 1.0, "LOW": 5.0, "COMBINE": 0.1}, 0.0),
         ({"HIGH": 4.0, "LOW": 1.0}, 1.0))
MAX_BATCHES = 5
INSTANCE_LOST_TIMEOUT = 120
EXAMPLES = int(os.environ.get("COMFY_DUAL_EXAMPLES", "200"))


def may_run(kind: JobKind, view: InstanceView, views, fallback: bool) -> bool:
    """The placement rule, restated independently of the scheduler's code: an UP instance
    of the job's type, or, when FALLBACK is on and every such instance is DOWN, any UP one."""
    if not view.up:
        return False
    if kind.value in view.job_types:
        return True
    return fallback and not any(v.up and kind.value in v.job_types for v in views)


def chained(views) -> bool:
    """COMBINE chains run back to back when more than one UP instance takes COMBINE jobs."""
    return sum(1 for v in views if v.up and JobKind.COMBINE.value in v.job_types) > 1


def holds_chain(view: InstanceView, views, combines_in_flight: int) -> bool:
    """Then an instance whose queue ends with a COMBINE not ended yet takes nothing more."""
    return (chained(views) and combines_in_flight > 0 and view.in_flight > 0
            and view.last_kind == JobKind.COMBINE.value)


def on_standby(view: InstanceView, views, store, now: float) -> bool:
    """Where more than two UP instances take COMBINE jobs and a COMBINE is ready or coming
    (a batch's last renders in flight), one that takes COMBINE queues no render behind
    another job: its free slot is kept for a COMBINE."""
    combiners = sum(1 for v in views if v.up and JobKind.COMBINE.value in v.job_types)
    coming = any(j.kind.renders and j.batch.renders_left <= 2
                 for j in store.in_flight.values())
    ready = any(j.kind is JobKind.COMBINE and j.eligible_at <= now
                for j in store.ready.values())
    return (combiners > 2 and (coming or ready) and view.in_flight > 0
            and JobKind.COMBINE.value in view.job_types)


def place(job, views) -> tuple[int, int, int]:
    """The order ready jobs are taken in: priority, then, where COMBINE chains run, the
    video's place in line (the order its batch was accepted in, less the renders it has
    left), then readiness."""
    line = job.batch.number - job.batch.renders_left if chained(views) else 0
    return -job.priority, line, job.ready_seq


class CoreMachine(RuleBasedStateMachine):
    @initialize(layout=st.sampled_from([*sorted(LAYOUTS), *STEALING]),
                gate=st.sampled_from(["batch", "global"]), fallback=st.booleans(),
                combine_concurrency=st.integers(1, 2), max_retries=st.integers(0, 2),
                costs=st.sampled_from(COSTS))
    def setup(self, layout, gate, fallback, combine_concurrency, max_retries, costs):
        self.instances = LAYOUTS[layout]
        self.fallback = fallback
        self.combine_concurrency = combine_concurrency
        self.dir = Path(tempfile.mkdtemp(prefix="core-machine-"))
        self.log = MemoryLog()
        self.h = Harness(self.dir, [
            {"instance_id": i.instance_id, "host": "127.0.0.1", "port": 8188 + n,
             "job_types": sorted(i.job_types), "max_concurrent": i.max_concurrent,
             "steal_types": sorted(i.steal_types)} for n, i in enumerate(self.instances)],
            event_log=self.log, FALLBACK=fallback, COMBINE_GATE=gate,
            COMBINE_CONCURRENCY=combine_concurrency, MAX_RETRIES=max_retries,
            RETRY_DELAY=5, RETRY_DELAY_MAX=20, JOB_DURATIONS=costs[0], SWITCH_COST=costs[1],
            INSTANCE_LOST_TIMEOUT=INSTANCE_LOST_TIMEOUT)
        self.h.clock.now = 0.0
        self.server_up = {i.instance_id: True for i in self.instances}
        self.submitted = 0
        self.fallback_jobs: set[str] = set()
        self.stolen_jobs: set[str] = set()
        self.last_kind: dict[str, str] = {}  # instance -> kind of the last job sent there
        self.states: dict[int, dict] = {0: self.h.store.snapshot()}
        self._watch()
        self.restart_probes()

    @property
    def store(self) -> Store:
        return self.h.store

    @property
    def now(self) -> float:
        return self.h.clock()

    @property
    def policy(self):
        return self.store.policy

    def agent(self, job: Job) -> FakeAgent:
        return self.h[str(job.instance_id)]

    def _watch(self) -> None:
        """Check each turn's scheduling, and keep the store's state after every event."""
        self.store.listeners.append(self._observe)
        dispatch = self.h.loop.dispatcher.dispatch

        def checked_dispatch(now: float):
            views = self.store.instance_views(self.instances, now=now)
            ready = list(self.store.ready.values())
            costs = self.store.estimates.costs()
            picks = dispatch(now)
            self.check_fifo(picks, ready, views)
            self.check_steals(picks, ready, views, known=bool(costs.durations))
            self.note_picks(picks, views)
            return picks

        setattr(self.h.loop.dispatcher, "dispatch", checked_dispatch)  # a spy  # noqa: B010

    def _observe(self, rec: ev.Recorded, subject) -> None:
        if isinstance(rec.event, ev.BatchGateOpened):
            batch = self.store.batches[rec.event.batch_id]
            assert batch.renders_left == 0, "gate opened before the batch rendered"
            if self.policy.combine_gate == "global":
                assert self.store.unfinished_renders == 0, "global gate opened early"
        self.states[rec.seq] = self.store.snapshot()

    def note_picks(self, picks, views) -> None:
        for pick in picks:
            job = self.store.jobs[pick.job_id]
            assert not self.store.abandoned.get(pick.instance_id), \
                "new work sent to an instance that may still run prompts given up on"
            if pick.fallback:
                assert self.fallback, "fallback used while FALLBACK is off"
                assert not any(v.up and job.kind.value in v.job_types for v in views)
            self.fallback_jobs.discard(pick.job_id)
            self.stolen_jobs.discard(pick.job_id)
            if pick.fallback:
                self.fallback_jobs.add(pick.job_id)
            elif pick.stolen:
                self.stolen_jobs.add(pick.job_id)
            self.last_kind[pick.instance_id] = job.kind.value

    def settle(self) -> None:
        self.h.settle()

    def restart_probes(self) -> None:
        """Every agent's first probe after a start tells how its server is."""
        for instance_id, up in self.server_up.items():
            self.h[instance_id].health(up, "probe")
        self.settle()

    def views(self) -> list[InstanceView]:
        return self.store.instance_views(self.instances, now=self.now)

    def estimates(self, inst: Inst) -> dict:
        mine = [j for j in self.store.in_flight.values() if j.instance_id == inst.instance_id]
        return {"last_kind": self.last_kind.get(inst.instance_id),
                "foreign_in_flight": sum(1 for j in mine if j.kind.value not in inst.job_types)}

    def unfinished(self) -> Counter:
        """Renders not ended less each video's lead (while it has some of every kind left,
        what it has left beyond its least kind), and COMBINE jobs not ended behind an open
        gate."""
        left = Counter(j.kind.value for j in self.store.jobs.values() if j.state not in JOB_FINAL
                       and (j.kind.renders or j.batch.state is BatchState.COMBINING))
        for batch in self.store.batches.values():
            renders = Counter(j.kind.value for j in batch.jobs
                              if j.kind.renders and j.state not in JOB_FINAL)
            least = min(renders[k.value] for k in JobKind if k.renders)
            if least:
                left.subtract({kind: n - least for kind, n in renders.items()})
        return +left

    def check_fifo(self, picks, ready, views) -> None:
        """No eligible job is passed over for one that comes after it in line (``place``),
        but a COMBINE goes before renders where chains run back to back."""
        picked = {p.job_id: p.instance_id for p in picks}
        by_id = {v.instance_id: v for v in views}
        for job_id, instance_id in picked.items():
            job = self.store.jobs[job_id]
            key = place(job, views)
            for other in ready:
                if (other.job_id in picked or other.eligible_at > self.now
                        or place(other, views) >= key):
                    continue
                if other.kind is JobKind.COMBINE and job.kind is not JobKind.COMBINE:
                    continue  # COMBINE may be held back by its own concurrency limit
                if job.kind is JobKind.COMBINE and other.kind.renders and chained(views):
                    continue
                assert not may_run(other.kind, by_id[instance_id], views, self.fallback), (
                    f"{other.job_id} was ready before {job_id} and skipped")

    def check_steals(self, picks, ready, views, *, known: bool) -> None:
        """A steal takes a job of one of the thief's steal_types that no instance of its
        type had room for, onto an UP thief that holds no other foreign job and has none
        of its own (or fallback) work waiting; nothing is stolen without estimates."""
        by_id = {v.instance_id: v for v in views}
        picked = {p.job_id for p in picks}
        combines = self.store.combines_in_flight()
        free = Counter({v.instance_id: 0 if holds_chain(v, views, combines)
                        else v.max_concurrent - v.in_flight for v in views if v.up})
        free.subtract(p.instance_id for p in picks)
        for p in picks:  # a COMBINE taken this turn holds its instance too
            if chained(views) and self.store.jobs[p.job_id].kind is JobKind.COMBINE:
                free[p.instance_id] = 0
        combine_free = (combines + sum(
            self.store.jobs[p].kind is JobKind.COMBINE for p in picked)
            < self.combine_concurrency)
        steals = [p for p in picks if p.stolen]
        if steals:
            event("a job was stolen")  # `pytest --hypothesis-show-statistics` counts them
        assert known or not steals, "stolen without estimates"
        assert len({p.instance_id for p in steals}) == len(steals), "two steals at once"
        for pick in steals:
            job, thief = self.store.jobs[pick.job_id], by_id[pick.instance_id]
            assert not pick.fallback and thief.up and thief.foreign_in_flight == 0, pick
            assert job.kind.value in thief.steal_types, (pick, thief)
            assert not any(free[v.instance_id] > 0 for v in views
                           if v.up and job.kind.value in v.job_types), f"{pick}: home had room"
            for other in ready:
                if (other.job_id in picked or other.eligible_at > self.now
                        or (other.kind is JobKind.COMBINE and not combine_free)):
                    continue
                assert not may_run(other.kind, thief, views, self.fallback), (
                    f"{thief.instance_id} stole {job.job_id} while {other.job_id} waited")

    # --- rules ---------------------------------------------------------------------------

    @precondition(lambda self: self.submitted < MAX_BATCHES)
    @rule(frames=st.integers(1, 350), chunk=st.sampled_from([50, 101, 200]),
          priority=st.integers(0, 2))
    def submit(self, frames, chunk, priority):
        path = self.dir / f"video{self.submitted}.toml"
        path.write_text(f'name = "video {self.submitted}"\nframes = {frames}\n'
                        f'positive = "a test"\nframes_per_chunk = {chunk}\n'
                        f"priority = {priority}\n")
        self.h.loop.post(SubmitFile(self.submitted, path))
        self.submitted += 1
        self.settle()

    @rule(dt=st.sampled_from([0.5, 3, 10, 30]))
    def tick(self, dt):
        self.h.clock.advance(dt)
        self.settle()

    def pick_in_flight(self, index: int, states=IN_FLIGHT):
        jobs = [j for j in self.store.in_flight.values() if j.state in states]
        return jobs[index % len(jobs)] if jobs else None

    @rule(index=st.integers(0, 100))
    def server_takes_it(self, index):
        job = self.pick_in_flight(index, {JobState.DISPATCHING, JobState.QUEUED})
        if job is None:
            return
        if job.state is JobState.DISPATCHING:
            self.agent(job).accept(job.job_id)
        else:
            self.agent(job).start(job.job_id)
        self.settle()

    @rule(index=st.integers(0, 100),
          outcome=st.sampled_from(["success"] * 6 + ["retryable", "permanent", "lost"]))
    def server_finishes(self, index, outcome):
        """A job ends on its server: a success, an error, a success that did not write
        its files (the graph ran only in part), or, asked after a reconnection, the
        server no longer knows it."""
        job = self.pick_in_flight(index)
        if job is None:
            return
        attempts_before, agent = job.attempts, self.agent(job)
        if outcome == "success":
            agent.finish(job.job_id)
        elif outcome == "retryable":
            agent.finish(job.job_id, status="error", error="CUDA out of memory")
        elif outcome == "permanent":
            agent.finish(job.job_id, written=False)
        else:
            agent.answer_check(job.job_id, "gone")
        self.settle()
        if outcome == "retryable":
            retried = attempts_before < self.policy.max_retries
            assert job.state is (JobState.READY if retried else JobState.FAILED), job
            if retried:
                delay = min(5 * 2 ** attempts_before, 20)
                assert job.eligible_at == self.now + delay

    @rule(n=st.integers(1, 12))
    def servers_finish_many(self, n):
        """Several successes in a row, so runs reach the COMBINE phase of many batches."""
        for _ in range(n):
            if not self.store.in_flight:
                break
            job = next(iter(self.store.in_flight.values()))
            self.agent(job).finish(job.job_id)
            self.settle()

    @rule(index=st.integers(0, 10), up=st.booleans())
    def instance_health(self, index, up):
        inst = self.instances[index % len(self.instances)]
        self.server_up[inst.instance_id] = up
        self.h[inst.instance_id].health(up, "probe")
        self.settle()

    @rule(index=st.integers(0, 10))
    def instance_lost(self, index):
        """An instance is unreachable for INSTANCE_LOST_TIMEOUT: its jobs go elsewhere."""
        inst = self.instances[index % len(self.instances)]
        self.server_up[inst.instance_id] = False
        self.h[inst.instance_id].health(False, "connection refused")
        self.settle()
        self.h.clock.advance(INSTANCE_LOST_TIMEOUT)
        self.settle()
        assert not any(j.instance_id == inst.instance_id for j in self.store.in_flight.values())

    @rule(index=st.integers(0, 10), part=st.booleans())
    def server_withdraws(self, index, part):
        """The server shows that prompts the daemon gave up on no longer run there (some
        of them, if ``part``)."""
        inst = self.instances[index % len(self.instances)]
        prompts = sorted(self.store.abandoned.get(inst.instance_id, ()))
        if prompts:
            taken = tuple(prompts[: len(prompts) // 2 or 1] if part else prompts)
            self.h.loop.post(Withdrawn(inst.instance_id, taken))
            self.settle()

    @rule(index=st.integers(0, 10))
    def user_cancels(self, index):
        batches = list(self.store.open_batches())
        if batches:
            ok, _ = self.h.loop.intake.run_command(
                "cancel", batches[index % len(batches)].batch_id, self.now)
            assert ok
        self.settle()

    @rule(index=st.integers(0, 10))
    def user_retries(self, index):
        ended = [b for b in self.store.batches.values()
                 if b.state in (BatchState.FAILED, BatchState.CANCELLED)]
        if ended:
            ok, _ = self.h.loop.intake.run_command(
                "retry", ended[index % len(ended)].batch_id, self.now)
            assert ok
        self.settle()

    @rule(frames=st.integers(1, 300))
    def crash_mid_turn(self, frames):
        """A turn records part of its events and the daemon dies before the commit; it
        restarts on the log, its agents probe the servers again."""
        committed = self.store.seq
        self.store.record(ev.BatchAccepted(make_plan(f"lost{self.now}-{frames}", frames)),
                          self.now)
        self.log.crash()
        self.h.open()
        assert self.store.seq == committed
        assert self.store.snapshot() == self.states[committed]
        self._watch()
        self.restart_probes()

    @rule(data=st.data())
    def replay_any_prefix(self, data):
        if self.log.snapshot is not None:
            return  # compacted: prefixes before the snapshot are gone by design
        k = data.draw(st.integers(0, len(self.log.committed)), label="prefix")
        prefix = MemoryLog()
        prefix.committed = self.log.committed[:k]
        assert Store.open(prefix, self.policy).snapshot() == self.states[k]

    @rule()
    def compact(self):
        self.h.loop.journal.snapshot()
        assert Store.open(self.log, self.policy).snapshot() == self.store.snapshot()

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def indexes_match_states(self):
        jobs = self.store.jobs.values()
        assert set(self.store.ready) == {j.job_id for j in jobs if j.state is JobState.READY}
        assert set(self.store.in_flight) == {j.job_id for j in jobs if j.state in IN_FLIGHT}
        seqs = [j.ready_seq for j in self.store.ready.values()]
        assert seqs == sorted(seqs)
        assert self.store.unfinished_renders == sum(
            1 for j in jobs if j.kind.renders and j.state not in JOB_FINAL)

    @invariant()
    def the_store_keeps_the_same_estimates(self):
        assert Counter(self.store.coming_work()) == self.unfinished()
        for view, inst in zip(self.store.instance_views(self.instances, now=self.now),
                              self.instances, strict=True):
            mine = self.estimates(inst)
            assert view.steal_types == inst.steal_types
            assert view.foreign_in_flight == mine["foreign_in_flight"]
            assert view.last_kind == mine["last_kind"]

    @invariant()
    def affinity_and_capacity(self):
        for view, inst in zip(self.views(), self.instances, strict=True):
            assert view.in_flight <= inst.max_concurrent, view
            if self.store.abandoned.get(inst.instance_id):
                assert view.max_concurrent == 0, "it takes new work"
        stolen: Counter[str] = Counter()
        for job in self.store.in_flight.values():
            inst = next(i for i in self.instances if i.instance_id == job.instance_id)
            if job.job_id in self.stolen_jobs:
                assert job.kind.value in inst.steal_types, job
                stolen[inst.instance_id] += 1
            else:
                assert job.kind.value in inst.job_types or job.job_id in self.fallback_jobs
        assert all(n <= 1 for n in stolen.values()), f"more than one stolen job: {stolen}"

    @invariant()
    def dependencies_and_gate(self):
        for job in self.store.jobs.values():
            if job.state in IN_FLIGHT or job.state is JobState.SUCCEEDED:
                assert all(self.store.jobs[d].state is JobState.SUCCEEDED
                           for d in job.spec.deps), job
            if job.kind is JobKind.COMBINE and job.state not in (JobState.WAITING,
                                                                 JobState.CANCELLED):
                assert job.batch.state in (BatchState.COMBINING, BatchState.DONE) or (
                    job.state in (JobState.SUCCEEDED, JobState.FAILED)), job
                assert job.batch.renders_left == 0

    @invariant()
    def combines_within_concurrency(self):  # not `combine_concurrency`: that is the setting
        assert self.store.combines_in_flight() <= self.combine_concurrency

    @invariant()
    def work_conservation(self):
        views = self.views()
        combines = self.store.combines_in_flight()
        combine_free = combines < self.combine_concurrency
        for view in views:
            if (not view.up or view.in_flight >= view.max_concurrent
                    or holds_chain(view, views, combines)):
                continue
            standby = on_standby(view, views, self.store, self.now)
            for job in self.store.ready.values():
                if job.eligible_at > self.now or (job.kind is JobKind.COMBINE
                                                  and not combine_free):
                    continue
                if standby and job.kind.renders:
                    continue
                assert not may_run(job.kind, view, views, self.fallback), (
                    f"{view.instance_id} idles while {job.job_id} is ready")

    @invariant()
    def batch_states_agree_with_jobs(self):
        summarised = 0
        for batch in self.store.batches.values():
            states = {j.state for j in batch.jobs}
            if batch.state is BatchState.DONE:  # kept as a summary: its jobs are gone
                assert batch.summary is not None and not batch.jobs and not batch.plan.jobs
                assert not any(j.batch is batch for j in self.store.jobs.values())
                summarised += batch.summary.jobs
            else:
                assert batch.summary is None and batch.jobs
            if batch.state in (BatchState.FAILED, BatchState.CANCELLED):
                assert states <= JOB_FINAL
        counts = self.store.state_counts
        assert sum(counts.values()) == len(self.store.jobs) + summarised
        assert counts[JobState.SUCCEEDED] == summarised + sum(
            1 for j in self.store.jobs.values() if j.state is JobState.SUCCEEDED)

    def teardown(self):
        """Liveness: once every instance is up and every render succeeds, all batches end."""
        if not hasattr(self, "h"):
            return
        try:
            for instance_id in self.server_up:
                self.server_up[instance_id] = True
                self.h[instance_id].health(True, "probe")
            for _ in range(2000):
                for instance_id, prompts in list(self.store.abandoned.items()):
                    self.h.loop.post(Withdrawn(instance_id, tuple(sorted(prompts))))
                self.settle()
                if not self.store.in_flight and not self.store.ready:
                    break
                if not self.store.in_flight:
                    self.h.clock.advance(60)
                    continue
                job = next(iter(self.store.in_flight.values()))
                self.agent(job).finish(job.job_id)
            for batch in self.store.batches.values():
                assert batch.state in (BatchState.DONE, BatchState.FAILED,
                                       BatchState.CANCELLED), f"{batch!r} never ended"
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


CoreMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestCore = CoreMachine.TestCase
