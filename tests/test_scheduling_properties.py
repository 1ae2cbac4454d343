"""Stateful property test of the core: the store, its rules and the scheduler, driven the
way the daemon drives them, with crashes and replays, checked after every step.

Half the layouts let instances steal (``steal_types``); the scheduler then gets estimates
like the daemon's (costs drawn at the start of each run; each instance's queue tail and
expected busy time, unfinished jobs per kind, worked out here independently of the store,
which must agree where it keeps the same figures).

The budget is set by COMFY_DUAL_EXAMPLES (default 200); `make soak` runs it with 2,000.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from dataclasses import replace

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from support import Inst, make_plan

from statemachine import events as ev
from statemachine.estimates import expected_busy
from statemachine.job import IN_FLIGHT, JOB_FINAL, BatchState, JobState
from statemachine.log import MemoryLog
from statemachine.plan import JobKind
from statemachine.rules import cancel_batch, failure_event, retry_batch
from statemachine.scheduler import Costs, InstanceView, schedule
from statemachine.store import Policy, Store


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
COSTS = (None, Costs({"HIGH": 1.0, "LOW": 1.0, "COMBINE": 0.2}),
         Costs({"HIGH": 1.0, "LOW": 2.0, "COMBINE": 0.2}, switch_cost=0.5),
         Costs({"HIGH": 1.0, "LOW": 5.0, "COMBINE": 0.1}),
         Costs({"HIGH": 4.0, "LOW": 1.0}, switch_cost=1.0, default_duration=0.5))
MAX_BATCHES = 5
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
        self.costs = costs
        self.fallback = fallback
        self.combine_concurrency = combine_concurrency
        self.policy = Policy(max_retries=max_retries, retry_delay=5, retry_delay_max=20,
                             combine_gate=gate)
        self.log = MemoryLog()
        self.now = 0.0
        self.submitted = 0
        self.fallback_jobs: set[str] = set()
        self.stolen_jobs: set[str] = set()
        self.last_kind: dict[str, str] = {}  # instance -> kind of the last job sent there
        self.started_at: dict[str, float] = {}
        self.states: dict[int, dict] = {}
        self._open(Store(self.log, self.policy))
        self.states[0] = self.store.snapshot()
        for inst in self.instances:
            self.store.record(ev.InstanceUp(inst.instance_id), self.now)
        self.turn()

    def _open(self, store: Store) -> None:
        self.store = store
        store.listeners.append(self._observe)

    def _observe(self, rec: ev.Recorded, subject) -> None:
        if isinstance(rec.event, ev.JobStarted):
            self.started_at[rec.event.job_id] = rec.ts
        if isinstance(rec.event, ev.BatchGateOpened):
            batch = self.store.batches[rec.event.batch_id]
            assert batch.renders_left == 0, "gate opened before the batch rendered"
            if self.policy.combine_gate == "global":
                assert self.store.unfinished_renders == 0, "global gate opened early"
        self.states[rec.seq] = self.store.snapshot()

    # --- the daemon's turn: schedule, record intents, commit ---------------------------

    def views(self):
        """What the daemon tells the scheduler about each instance, estimates included."""
        views = self.store.instance_views(self.instances, now=self.now)
        return [replace(v, **self.estimates(inst))
                for v, inst in zip(views, self.instances, strict=True)]

    def estimates(self, inst: Inst) -> dict:
        mine = [j for j in self.store.in_flight.values() if j.instance_id == inst.instance_id]
        queue = [(j.kind.value, self.started_at.get(j.job_id) if j.state is JobState.RUNNING
                  else None) for j in mine]
        return {"last_kind": self.last_kind.get(inst.instance_id),
                "busy_for": expected_busy(queue, now=self.now, before=None,
                                          costs=self.costs or Costs()),
                "foreign_in_flight": sum(1 for j in mine if j.kind.value not in inst.job_types)}

    def unfinished(self) -> Counter:
        """Renders not ended, and COMBINE jobs not ended behind an open gate."""
        return Counter(j.kind.value for j in self.store.jobs.values() if j.state not in JOB_FINAL
                       and (j.kind.renders or j.batch.state is BatchState.COMBINING))

    def turn(self) -> None:
        views = self.views()
        ready = list(self.store.ready.values())
        picks = schedule(ready, views, now=self.now, fallback=self.fallback,
                         combine_concurrency=self.combine_concurrency,
                         combines_in_flight=self.store.combines_in_flight(),
                         costs=self.costs, unfinished=self.unfinished())
        self.check_fifo(picks, ready, views)
        self.check_steals(picks, ready, views)
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
            self.store.record(ev.JobDispatchIntent(pick.job_id, pick.instance_id,
                                                   str(uuid.uuid4())), self.now)
        self.store.commit()

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

    def check_steals(self, picks, ready, views) -> None:
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
        assert self.costs is not None or not steals, "stolen without estimates"
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
        batch_id = f"b{self.submitted}"
        self.submitted += 1
        self.store.record(ev.BatchAccepted(make_plan(batch_id, frames, chunk, priority)),
                          self.now)
        self.turn()

    @rule(dt=st.sampled_from([0.5, 3, 10, 30]))
    def tick(self, dt):
        self.now += dt
        self.turn()

    def pick_in_flight(self, index: int, states=IN_FLIGHT):
        jobs = [j for j in self.store.in_flight.values() if j.state in states]
        return jobs[index % len(jobs)] if jobs else None

    @rule(index=st.integers(0, 100))
    def server_takes_it(self, index):
        job = self.pick_in_flight(index, {JobState.DISPATCHING, JobState.QUEUED})
        if job is None:
            return
        if job.state is JobState.DISPATCHING:
            self.store.record(ev.JobQueued(job.job_id, job.prompt_id, index), self.now)
        else:
            self.store.record(ev.JobStarted(job.job_id, job.prompt_id), self.now)
        self.turn()

    @rule(index=st.integers(0, 100),
          outcome=st.sampled_from(["success"] * 6 + ["retryable", "permanent", "lost"]))
    def server_finishes(self, index, outcome):
        job = self.pick_in_flight(index)
        if job is None:
            return
        if outcome == "success":
            event: ev.Event = ev.JobSucceeded(job.job_id, job.flying_prompt_id,
                                              {"9": {"images": []}})
        elif outcome == "lost":
            event = ev.JobLost(job.job_id, job.flying_prompt_id, "instance restarted")
        else:
            event = failure_event(job, f"{outcome} error", permanent=outcome == "permanent",
                                  now=self.now, policy=self.policy)
        attempts_before = job.attempts
        self.store.record(event, self.now)
        if outcome == "retryable":
            retried = attempts_before < self.policy.max_retries
            assert job.state is (JobState.READY if retried else JobState.FAILED), job
            if retried:
                delay = min(5 * 2 ** attempts_before, 20)
                assert job.eligible_at == self.now + delay
        self.turn()

    @rule(n=st.integers(1, 12))
    def servers_finish_many(self, n):
        """Several successes in a row, so runs reach the COMBINE phase of many batches."""
        for _ in range(n):
            if not self.store.in_flight:
                break
            job = next(iter(self.store.in_flight.values()))
            self.store.record(ev.JobSucceeded(job.job_id, job.flying_prompt_id, {}), self.now)
            self.turn()

    @rule(index=st.integers(0, 10), up=st.booleans())
    def instance_health(self, index, up):
        inst = self.instances[index % len(self.instances)]
        if self.store.instance_up.get(inst.instance_id) == up:
            return
        event = ev.InstanceUp(inst.instance_id) if up else ev.InstanceDown(inst.instance_id,
                                                                             "probe failed")
        self.store.record(event, self.now)
        self.turn()

    @rule(index=st.integers(0, 10))
    def instance_loses_its_jobs(self, index):
        inst = self.instances[index % len(self.instances)]
        for job in [j for j in self.store.in_flight.values() if j.instance_id == inst.instance_id]:
            self.store.record(ev.JobLost(job.job_id, job.flying_prompt_id, "instance lost"),
                              self.now)
        self.turn()

    @rule(index=st.integers(0, 10), part=st.booleans())
    def server_withdraws(self, index, part):
        """The daemon made sure the prompts it gave up on no longer run on an instance
        (some of them, if ``part``)."""
        inst = self.instances[index % len(self.instances)]
        prompts = sorted(self.store.abandoned.get(inst.instance_id, ()))
        if prompts:
            taken = tuple(prompts[: len(prompts) // 2 or 1] if part else prompts)
            self.store.record(ev.PromptsWithdrawn(inst.instance_id, taken), self.now)
            self.turn()

    @rule(index=st.integers(0, 10))
    def user_cancels(self, index):
        batches = list(self.store.open_batches())
        if batches:
            for event in cancel_batch(batches[index % len(batches)], "user"):
                self.store.record(event, self.now)
        self.turn()

    @rule(index=st.integers(0, 10))
    def user_retries(self, index):
        ended = [b for b in self.store.batches.values()
                 if b.state in (BatchState.FAILED, BatchState.CANCELLED)]
        if ended:
            for event in retry_batch(ended[index % len(ended)]):
                self.store.record(event, self.now)
        self.turn()

    @rule(frames=st.integers(1, 300))
    def crash_mid_turn(self, frames):
        """Record part of a turn without committing, crash, and replay the log."""
        committed = self.store.seq
        self.store.record(ev.BatchAccepted(make_plan(f"lost{self.now}-{frames}", frames)),
                          self.now)
        self.log.crash()
        self._open(Store.open(self.log, self.policy))
        assert self.store.seq == committed
        assert self.store.snapshot() == self.states[committed]
        self.turn()

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
        self.store.compact()
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
        if not hasattr(self, "store"):
            return
        for inst in self.instances:
            if not self.store.instance_up.get(inst.instance_id):
                self.store.record(ev.InstanceUp(inst.instance_id), self.now)
        for _ in range(2000):
            for instance_id, prompts in list(self.store.abandoned.items()):
                self.store.record(ev.PromptsWithdrawn(instance_id, tuple(sorted(prompts))),
                                  self.now)
            self.turn()
            if not self.store.in_flight and not self.store.ready:
                break
            if not self.store.in_flight:
                self.now += 60
                continue
            job = next(iter(self.store.in_flight.values()))
            self.store.record(ev.JobSucceeded(job.job_id, job.flying_prompt_id, {}), self.now)
        for batch in self.store.batches.values():
            assert batch.state in (BatchState.DONE, BatchState.FAILED, BatchState.CANCELLED), (
                f"{batch!r} never ended")


CoreMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestCore = CoreMachine.TestCase
