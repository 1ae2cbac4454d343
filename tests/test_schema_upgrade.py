"""Event schema version 2 against a log version 1 wrote.

``fixtures/events-v1.jsonl`` was written by the daemon before version 2 (three videos
rendered on simulated servers, then a fourth batch failed once, cancelled and retried);
``events-v1.expected.json`` is the state that code replayed it to, every job listed with
all its parameters. Version 2 must replay that log, and a snapshot of it, to the same
jobs, and go on appending to it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest
from support import make_plan

from statemachine import events as ev
from statemachine.errors import CorruptLog
from statemachine.job import Batch
from statemachine.log import EventLog, MemoryLog
from statemachine.plan import BatchPlan
from statemachine.snapshot import _batch_state
from statemachine.store import Store

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "events-v1.expected.json").read_text())


def version_1_form(batch: Batch) -> dict[str, Any]:
    """A batch as version 1 snapshotted it: the plan with every job listed (a done batch,
    kept as a summary, with the jobs its plan lays out)."""
    state = _batch_state(batch)
    plan = {k: v for k, v in state["plan"].items() if k not in ("params", "file_id")}
    laid_out = BatchPlan.from_dict(state["plan"]).jobs
    state["plan"] = {**plan, "jobs": [job.to_dict() for job in laid_out]}
    return state


def expected_form(saved: dict[str, Any]) -> dict[str, Any]:
    """What version 1 replayed a batch to, as today's store keeps it: a done batch by its
    summary (every job succeeded; the last one's outputs and server)."""
    if saved["state"] != "done":
        return saved
    jobs = saved["jobs"]
    assert {job["state"] for job in jobs} == {"succeeded"}
    last = jobs[-1]
    summary = {"jobs": len(jobs), "final_outputs": last["outputs"],
               "final_instance": last["instance_id"]}
    return {k: v for k, v in saved.items() if k != "jobs"} | {"summary": summary}


EXPECTED_NOW = [expected_form(b) for b in EXPECTED["batches"]]


def as_json(value: Any) -> Any:
    return json.loads(orjson.dumps(value))


@pytest.fixture
def v1_log(tmp_path: Path) -> Path:
    shutil.copy(FIXTURES / "events-v1.jsonl", tmp_path / "events.jsonl")
    return tmp_path


def test_a_version_1_log_replays_to_the_jobs_it_recorded(v1_log: Path) -> None:
    store = Store.open(EventLog(v1_log))
    assert store.seq == EXPECTED["seq"]
    assert as_json([version_1_form(b) for b in store.batches.values()]) == EXPECTED_NOW


def test_a_version_1_snapshot_is_read(v1_log: Path) -> None:
    log = MemoryLog()
    log.snapshot = orjson.dumps({"version": 1, "seq": EXPECTED["seq"], "instance_up": {},
                                 "batches": EXPECTED["batches"]})
    store = Store.open(log)
    assert as_json([version_1_form(b) for b in store.batches.values()]) == EXPECTED_NOW


def test_an_upgraded_log_goes_on_in_version_2_and_compacts(v1_log: Path) -> None:
    store = Store.open(EventLog(v1_log))
    store.record(ev.BatchAccepted(make_plan("b0005")), now=1.0)
    store.commit()
    records = [orjson.loads(line) for line in (v1_log / "events.jsonl").read_bytes().splitlines()]
    [new] = [r for r in records if r["type"] == "batch_accepted" and r["seq"] > EXPECTED["seq"]]
    assert new["v"] == 2 and "jobs" not in new["plan"]
    again = Store.open(EventLog(v1_log))
    assert again.snapshot() == store.snapshot()
    again.compact()
    assert Store.open(EventLog(v1_log)).snapshot() == store.snapshot()


def test_the_accepted_event_holds_the_prompt_once() -> None:
    plan = make_plan("b0001", frames=101 * 1000)
    line = ev.encode(ev.Recorded(1, 0.0, ev.BatchAccepted(plan)))
    assert line.count(b"a test") == 1 and len(plan.jobs) == 3000
    assert len(line) < 1000
    assert ev.decode(line).event == ev.BatchAccepted(plan)


@pytest.mark.parametrize("plan", [{}, {"jobs": []}, {"jobs": [{"params": {}}]}])
def test_a_broken_version_1_plan_is_a_corrupt_log(plan: dict[str, Any]) -> None:
    line = orjson.dumps({"seq": 1, "ts": 0.0, "type": "batch_accepted", "v": 1, "plan": plan})
    with pytest.raises(CorruptLog, match="bad version 1 plan"):
        ev.decode(line)


def test_an_unknown_schema_version_is_a_corrupt_log() -> None:
    line = orjson.dumps({"seq": 1, "ts": 0.0, "type": "batch_done", "v": 3, "batch_id": "b"})
    with pytest.raises(CorruptLog, match="version 3 is not supported"):
        ev.decode(line)
