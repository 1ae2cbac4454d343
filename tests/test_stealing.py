"""Examples of the scheduler's cost-aware rules: stealing and where a COMBINE goes."""

from __future__ import annotations

import pytest
from support import Ready

from statemachine.plan import JobKind
from statemachine.scheduler import Assignment, Costs, InstanceView, schedule

W2 = Costs({"HIGH": 1.0, "LOW": 2.0, "COMBINE": 0.2})


def jobs(*kinds: str) -> list[Ready]:
    return [Ready(f"j{n}", JobKind(k), n) for n, k in enumerate(kinds)]


def high(in_flight: int = 0, *, busy: float = 0.0, last: str | None = "HIGH",
         steal: frozenset[str] = frozenset({"LOW"}), foreign: int = 0, up: bool = True
         ) -> InstanceView:
    return InstanceView("high", frozenset({"HIGH", "COMBINE"}), 2, up, in_flight, steal,
                        last, busy, foreign)


def low(in_flight: int = 2, *, busy: float = 3.0, last: str | None = "LOW",
        steal: frozenset[str] = frozenset({"HIGH"}), up: bool = True) -> InstanceView:
    return InstanceView("low", frozenset({"LOW", "COMBINE"}), 2, up, in_flight, steal,
                        last, busy)


def run(ready, views, *, costs: Costs | None = W2, unfinished=None, fallback: bool = False,
        combines_in_flight: int = 0) -> list[Assignment]:
    left = {"HIGH": 2, "LOW": 8} if unfinished is None else unfinished
    return schedule(ready, views, now=0.0, fallback=fallback, combine_concurrency=1,
                    combines_in_flight=combines_in_flight, costs=costs, unfinished=left)


def stolen(job_id: str, instance_id: str = "high") -> Assignment:
    return Assignment(job_id, instance_id, stolen=True)


# --- when an idle server steals ------------------------------------------------------------


def test_an_idle_server_steals_from_a_backlogged_one():
    assert run(jobs("LOW"), [high(), low()]) == [stolen("j0")]


def test_nothing_is_stolen_without_estimates():
    assert run(jobs("LOW"), [high(), low()], costs=None) == []
    assert run(jobs("LOW"), [high(), low()], unfinished={}) == []


def test_nothing_is_stolen_without_steal_types():
    assert run(jobs("LOW"), [high(steal=frozenset()), low()]) == []


def test_the_server_with_more_work_of_its_own_does_not_steal():
    """W2: the LOW server is the bottleneck; taking HIGH jobs would only slow it down."""
    views = [high(2, busy=1.5), low(0, busy=0.0)]
    assert run(jobs("HIGH"), views, unfinished={"HIGH": 2, "LOW": 8}) == []
    assert run(jobs("HIGH"), views, unfinished={"HIGH": 8, "LOW": 2}) == [stolen("j0", "low")]


def test_a_steal_must_beat_the_switches_there_and_back_by_half_a_job():
    """Into LOW and back costs 2 units; the job must start 0.5 (half its run) sooner."""
    costs = Costs({"HIGH": 1.0, "LOW": 1.0}, switch_cost=1.0)
    left = {"HIGH": 0, "LOW": 9}
    assert run(jobs("LOW"), [high(), low(busy=2.5)], costs=costs, unfinished=left) == []
    assert run(jobs("LOW"), [high(), low(busy=2.6)], costs=costs,
               unfinished=left) == [stolen("j0")]


def test_a_small_gain_is_not_worth_a_steal():
    assert run(jobs("LOW"), [high(busy=1.0), low(busy=1.9)]) == []
    assert run(jobs("LOW"), [high(busy=1.0), low(busy=2.1)]) == [stolen("j0")]


def test_a_thief_that_already_switched_pays_no_switch_again():
    costs = Costs({"HIGH": 1.0, "LOW": 1.0}, switch_cost=1.0)
    views = [high(last="LOW"), low(busy=1.0)]
    assert run(jobs("LOW"), views, costs=costs, unfinished={"LOW": 9}) == [stolen("j0")]
    views = [high(last="HIGH"), low(busy=1.0)]
    assert run(jobs("LOW"), views, costs=costs, unfinished={"LOW": 9}) == []


def test_a_job_about_to_start_at_home_stays_and_the_one_behind_it_is_stolen():
    """The first LOW starts on its own server as soon as that is free (0.5), sooner than
    the switches to LOW and back would let the HIGH server (1.0); the second would wait
    behind it (until 2.5), so the HIGH server takes that one."""
    costs = Costs({"HIGH": 1.0, "LOW": 2.0}, switch_cost=0.5)
    assert run(jobs("LOW", "LOW"), [high(), low(busy=0.5)], costs=costs) == [stolen("j1")]


def test_own_work_first_and_one_stolen_job_at_a_time():
    picks = run(jobs("LOW", "HIGH", "LOW"), [high(), low()])
    assert picks == [Assignment("j1", "high"), stolen("j0")]


def test_no_steal_while_a_foreign_job_is_in_flight():
    assert run(jobs("LOW"), [high(1, foreign=1, busy=2.0), low()]) == []


def test_a_job_whose_servers_are_all_down_is_stolen_without_fallback():
    views = [high(), low(0, busy=0.0, up=False)]
    assert run(jobs("LOW"), views) == [stolen("j0")]
    assert run(jobs("LOW"), views, fallback=True) == [Assignment("j0", "high", fallback=True)]


def test_backoff_and_combine_slots_hold_for_stolen_jobs():
    renderer = InstanceView("high", frozenset({"HIGH"}), 2, True, 0, frozenset({"COMBINE"}))
    combiner = InstanceView("mix", frozenset({"COMBINE"}), 1, True, 1, busy_for=5.0)
    views = [renderer, combiner]
    left = {"COMBINE": 9}
    ready = jobs("COMBINE")
    assert run(ready, views, unfinished=left) == [stolen("j0")]
    assert run(ready, views, unfinished=left, combines_in_flight=1) == []
    ready[0].eligible_at = 1.0
    assert run(ready, views, unfinished=left) == []


# --- where a COMBINE goes -------------------------------------------------------------------


def test_without_estimates_the_instance_with_most_free_slots_takes_it():
    views = [high(1, busy=0.8), low(0, busy=0.3)]
    assert run(jobs("COMBINE"), views, costs=None) == [Assignment("j0", "low")]
    views = [high(0), low(1)]
    assert run(jobs("COMBINE"), views, costs=None) == [Assignment("j0", "high")]


@pytest.mark.parametrize(("high_last", "expected"), [("HIGH", "low"), ("COMBINE", "high")])
def test_a_combine_goes_where_it_costs_least(high_last, expected):
    """Between two renders a COMBINE costs two switches; after a COMBINE, none."""
    costs = Costs({"HIGH": 1.0, "LOW": 1.0, "COMBINE": 0.2}, switch_cost=0.5)
    views = [high(1, busy=0.8, last=high_last), low(1, busy=0.3)]
    assert run(jobs("COMBINE"), views, costs=costs) == [Assignment("j0", expected)]


def test_nothing_is_stolen_before_the_durations_involved_are_known():
    """Early in a run only some kinds have finished once: a server whose own model's
    duration is unknown cannot tell how much work it has left."""
    only_high = Costs({"HIGH": 1.0})
    assert run(jobs("LOW"), [high(), low()], costs=only_high) == []
    views = [high(2, busy=1.5), low(0, busy=0.0)]
    assert run(jobs("HIGH"), views, costs=only_high, unfinished={"HIGH": 8}) == []
