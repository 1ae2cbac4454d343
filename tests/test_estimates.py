"""What the scheduler is told about jobs' costs: the estimates the store folds from the
events (run times, switches, each server's queue), and the work still coming."""

from __future__ import annotations

from support import Inst, dispatch, make_plan

from statemachine import events as ev
from statemachine.estimates import CostLearner, expected_busy
from statemachine.log import MemoryLog
from statemachine.rules import Policy, cancel_batch
from statemachine.scheduler import Costs
from statemachine.snapshot import restore
from statemachine.store import Store

HIGH = Inst("high", frozenset({"HIGH", "COMBINE"}), steal_types=frozenset({"LOW"}))
LOW = Inst("low", frozenset({"LOW", "COMBINE"}))


def start(store: Store, job_id: str, instance_id: str, now: float) -> str:
    prompt_id = dispatch(store, job_id, instance_id, now)
    store.record(ev.JobQueued(job_id, prompt_id, 1), now)
    store.record(ev.JobStarted(job_id, prompt_id), now)
    return prompt_id


def run(store: Store, job_id: str, instance_id: str, began: float, ended: float) -> None:
    prompt_id = start(store, job_id, instance_id, began)
    store.record(ev.JobSucceeded(job_id, prompt_id, {}), ended)


def rendered_video(store: Store, batch: str = "b1", frames: int = 202) -> None:
    """A batch of ``frames`` whose renders all ran: HIGH 10 s, LOW 20 s (the first of
    each kind on its server is a switch and takes 3 s more)."""
    store.record(ev.BatchAccepted(make_plan(batch, frames=frames)), 0.0)
    now = 0.0
    for chunk in range(1, frames // 101 + 1):
        for kind, server, seconds in (("H", "high", 10.0), ("L", "low", 20.0)):
            extra = 3.0 if chunk == 1 else 0.0
            run(store, f"{batch}/{kind}{chunk}", server, now, now + seconds + extra)
            now += seconds + extra


def test_the_store_learns_run_times_and_the_switch_cost_from_the_events():
    store = Store(MemoryLog())
    rendered_video(store, frames=303)
    costs = store.estimates.costs()
    assert costs.duration("HIGH") == 10.0 and costs.duration("LOW") == 20.0
    assert costs.switch_cost == 3.0


def test_configured_durations_stand_in_until_a_kind_has_run():
    store = Store(MemoryLog(), Policy(job_durations={"LOW": 50.0, "COMBINE": 2.0},
                                      switch_cost=7.0))
    rendered_video(store, frames=101)
    costs = store.estimates.costs()
    assert (costs.duration("LOW"), costs.duration("COMBINE"), costs.switch_cost) == \
        (23.0 - 7.0, 2.0, 7.0)  # LOW ran once, after a switch: less the configured cost


def test_instance_views_carry_queue_estimates_and_steal_types():
    store = Store(MemoryLog())
    rendered_video(store, frames=202)  # high ran H H, low ran L L
    store.record(ev.BatchAccepted(make_plan("b2", frames=101)), 100.0)
    start(store, "b2/H1", "high", now=100.0)
    store.record(ev.BatchAccepted(make_plan("b3", frames=101)), 100.0)
    dispatch(store, "b3/H1", "low", now=101.0)  # stolen: waits behind nothing, switches
    high, low = store.instance_views([HIGH, LOW], now=104.0)
    assert (high.in_flight, high.busy_for, high.last_kind) == (1, 10.0 - 4.0, "HIGH")
    assert high.steal_types == {"LOW"} and low.steal_types == frozenset()
    assert (low.in_flight, low.foreign_in_flight, low.last_kind) == (1, 1, "HIGH")
    assert low.busy_for == 3.0 + 10.0  # a switch to HIGH, then one HIGH run


def test_coming_work_counts_renders_and_combines_behind_an_open_gate_only():
    store = Store(MemoryLog())
    store.record(ev.BatchAccepted(make_plan("b1", frames=202)), 0.0)
    assert store.coming_work() == {"HIGH": 2, "LOW": 2}
    rendered_video(store, batch="b2", frames=101)  # its gate opens
    assert store.coming_work() == {"HIGH": 2, "LOW": 2, "COMBINE": 1}
    run(store, "b2/C1", "low", 200.0, 201.0)
    assert store.coming_work() == {"HIGH": 2, "LOW": 2}
    for event in cancel_batch(store.batches["b1"], "no longer wanted"):
        store.record(event, 300.0)
    assert store.coming_work() == {}


def test_coming_work_leaves_out_the_low_job_a_video_has_left_beyond_its_high_jobs():
    """Once a chunk's HIGH job has ended, the video has one LOW job more left than HIGH:
    the pipeline's offset, not LOW work to even out (``statemachine.indexes.lead_of``),
    until it is the video's last."""
    store = Store(MemoryLog())
    store.record(ev.BatchAccepted(make_plan("b1", frames=202)), 0.0)
    run(store, "b1/H1", "high", 0.0, 1.0)
    assert store.coming_work() == {"HIGH": 1, "LOW": 1}
    run(store, "b1/L1", "low", 1.0, 2.0)
    assert store.coming_work() == {"HIGH": 1, "LOW": 1}
    run(store, "b1/H2", "high", 2.0, 3.0)
    assert store.coming_work() == {"LOW": 1}  # its last: no HIGH job waits for it


def test_estimates_survive_replay_and_compaction():
    log = MemoryLog()
    store = Store(log)
    rendered_video(store, frames=303)
    start(store, "b1/C1", "high", now=200.0)
    store.commit()
    assert Store.open(log).snapshot() == store.snapshot()
    store.compact()
    reopened = Store.open(log)
    assert reopened.snapshot() == store.snapshot()
    assert reopened.estimates.costs() == store.estimates.costs()
    assert reopened.instance_views([HIGH, LOW], now=201.0) == \
        store.instance_views([HIGH, LOW], now=201.0)


def test_a_snapshot_from_before_estimates_still_opens():
    store = Store(MemoryLog())
    rendered_video(store, frames=101)
    saved = store.snapshot()
    del saved["estimates"]
    old = Store(MemoryLog())
    restore(old.fold, saved)
    assert old.estimates.costs() == Costs()
    assert old.coming_work() == store.coming_work()


def test_expected_busy_counts_what_is_left_of_the_running_job_and_switches():
    costs = Costs({"HIGH": 4.0, "COMBINE": 1.0}, switch_cost=0.5)
    queue = [("HIGH", 10.0), ("COMBINE", None), ("HIGH", None)]
    assert expected_busy(queue, now=11.0, before="HIGH", costs=costs) == 3.0 + 1.5 + 4.5
    assert expected_busy(queue, now=11.0, before="LOW", costs=costs) == 3.5 + 1.5 + 4.5
    assert expected_busy([("HIGH", 0.0)], now=60.0, before="HIGH", costs=costs) == 0.0
    assert expected_busy([], now=0.0, before=None, costs=costs) == 0.0


def test_the_learner_takes_running_medians_and_the_switch_gap():
    learner = CostLearner(prior={"COMBINE": 9.0})
    assert learner.costs() == Costs({"COMBINE": 9.0}, 0.0, 9.0)
    for seconds in (10.0, 11.0, 30.0):
        learner.observe("HIGH", seconds, switched=False)
    learner.observe("HIGH", 14.0, switched=True)
    learner.observe("LOW", 20.0, switched=True)
    costs = learner.costs()
    assert costs.switch_cost == 3.0  # 14 - 11
    assert costs.duration("HIGH") == 11.0
    assert costs.duration("LOW") == 17.0  # seen only after switches
    assert costs.duration("COMBINE") == 9.0
    assert costs.duration("unseen") == 9.0  # the shortest kind known


def test_a_configured_switch_cost_wins_and_window_forgets():
    learner = CostLearner(switch_cost=0.25, window=2)
    for seconds in (100.0, 1.0, 3.0):
        learner.observe("HIGH", seconds, switched=False)
    learner.observe("HIGH", 50.0, switched=True)
    assert learner.costs() == Costs({"HIGH": 2.0}, 0.25, 2.0)


