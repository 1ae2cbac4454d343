"""Prompt files rendered end to end: the daemon's loop and agents over real sockets against
simulated ComfyUI servers, judged by the simulators' own execution records."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import threading
from collections import Counter
from pathlib import Path

import structlog
from structlog.testing import capture_logs
from support import log_lines, logged, wait_for

import config
import daemon
from instances.agent import InstanceAgent
from simulator import SimConfig, start_simulator
from statemachine import events as ev
from statemachine.log import EventLog
from statemachine.store import read_records
from statemachine.timeline import build_timeline

PROJECT = Path(__file__).resolve().parent.parent


def prompt_file(directory: Path, name: str, frames: int, extra: str = "") -> Path:
    path = directory / f"{name}.txt"
    path.write_text(f"{name}\n\n{frames}\n\nA test video of {name}{extra}.\n\nblurry\n")
    return path


def settings_for(state: Path, high: int, low: int, **overrides) -> config.Settings:
    return config.load_settings(None, {
        "COMFYUI_INSTANCES": [
            {"instance_id": "high_priority", "host": "127.0.0.1", "port": high,
             "job_types": ["HIGH"], "max_concurrent": 2},
            {"instance_id": "low_priority", "host": "127.0.0.1", "port": low,
             "job_types": ["LOW"], "max_concurrent": 2}],
        "STATE_DIR": str(state), "RETRY_DELAY": 0.05, "RETRY_DELAY_MAX": 1,
        "HEALTH_INTERVAL": 0.2, "PROBE_BACKOFF_MAX": 0.5, "CONNECT_TIMEOUT": 0.5,
        "REQUEST_TIMEOUT": 5, "FRAMES_PER_CHUNK": 101, **overrides})




def run(settings, files) -> daemon.RunResult:
    return daemon.run_files(settings, files, daemon.Stop())


def runs_by_job(*sims) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for sim in sims:
        for r in sim.executions():
            out.setdefault(r["job_id"], []).append({**r, "port": sim.port})
    return out


def test_three_videos_interleave_on_two_servers_in_dependency_order(tmp_path, sims):
    high, low = sims
    files = [prompt_file(tmp_path, n, f) for n, f in (("a", 303), ("b", 202), ("c", 250))]
    result = run(settings_for(tmp_path / "state", high.port, low.port), files)
    assert result.all_done, result.summary
    runs = runs_by_job(high, low)
    assert all(len(r) == 1 and r[0]["status"] == "success" for r in runs.values())
    for sim in (high, low):
        assert set(sim.counts().values()) == {1}, "a prompt_id ran twice"
    one = {job: r[0] for job, r in runs.items()}
    assert {r["kind"] for r in high.executions()} <= {"HIGH", "COMBINE"}
    assert {r["kind"] for r in low.executions()} <= {"LOW", "COMBINE"}
    for job, r in one.items():
        batch, step = job.split("/")
        kind, k = step[0], int(step[1:])
        if kind == "L":
            assert r["start"] >= one[f"{batch}/H{k}"]["end"]
        if kind == "H" and k > 1:
            assert r["start"] >= one[f"{batch}/L{k - 1}"]["end"]
        if kind == "C":
            renders = [v["end"] for j, v in one.items()
                       if j.split("/")[0] == batch and v["kind"] != "COMBINE"]
            assert r["start"] >= max(renders), "COMBINE before its gate"
    combines = sorted((r["start"], r["end"]) for r in one.values() if r["kind"] == "COMBINE")
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(combines)), "two COMBINE at once"
    assert both_busy_at_once(tmp_path / "state"), "the two servers never worked at the same time"
    assert "every batch done" in result.summary


def both_busy_at_once(state: Path) -> bool:
    """Whether the event log ever has a job in flight on each server at once (told by the
    order of its events, not by how long renders took)."""
    flying: dict[str, str] = {}  # prompt_id -> instance
    for line in log_lines(state):
        event = json.loads(line)
        if event["type"] == "job_dispatch_intent":
            flying[event["prompt_id"]] = event["instance_id"]
        elif "prompt_id" in event and event["type"] not in ("job_queued", "job_started"):
            flying.pop(event["prompt_id"], None)
        if len(set(flying.values())) == 2:
            return True
    return False


def test_each_job_is_narrated_in_order_once_its_post_is_handed_over(tmp_path, sims,
                                                                      monkeypatch):
    high, low = sims
    original = InstanceAgent.submit

    def noted(agent, job_id, *args, **kwargs):
        structlog.get_logger("test").info("handed over", job=job_id)
        return original(agent, job_id, *args, **kwargs)

    monkeypatch.setattr(InstanceAgent, "submit", noted)
    with capture_logs() as logs:
        result = run(settings_for(tmp_path / "state", high.port, low.port),
                     [prompt_file(tmp_path, "a", 202)])
    assert result.all_done
    said = [(line["event"].split(" ")[0], line.get("job")) for line in logs if "job" in line]
    for job in (f"b0001/{step}" for step in ("H1", "L1", "H2", "L2", "C1", "C2")):
        handed, executing = said.index(("handed", job)), said.index(("🔄", job))
        assert handed < executing < said.index(("✔️", job))
    assert [job for word, job in said if word == "✔️"] == \
        ["b0001/H1", "b0001/L1", "b0001/H2", "b0001/L2", "b0001/C1", "b0001/C2"]


def test_single_instance_mode_runs_everything_on_one_server(tmp_path, sims):
    high, low = sims
    settings = settings_for(tmp_path / "state", high.port, low.port, ENABLE_DUAL_INSTANCE=False,
                            SINGLE_INSTANCE_CONFIG={"port": high.port})
    result = run(settings, [prompt_file(tmp_path, "solo", 202)])
    assert result.all_done
    assert Counter(r["kind"] for r in high.executions()) == {"HIGH": 2, "LOW": 2, "COMBINE": 2}
    assert low.executions() == []


def test_a_server_down_from_the_start_falls_back_to_the_other(tmp_path, sims):
    high, low = sims
    low.stop()
    files = [prompt_file(tmp_path, "x", 202), prompt_file(tmp_path, "y", 101)]
    result = run(settings_for(tmp_path / "state", high.port, low.port), files)
    assert result.all_done
    assert Counter(r["kind"] for r in high.executions()) == {"HIGH": 3, "LOW": 3, "COMBINE": 3}


def test_a_server_out_of_work_steals_from_the_slower_kind(tmp_path):
    """LOW takes six times as long as HIGH: the HIGH server, allowed to, takes LOW jobs
    once it has learned that (nothing configured), and every job still runs once, after
    its dependencies."""
    slow_low = SimConfig(durations={"HIGH": 0.05, "LOW": 0.3, "COMBINE": 0.02},
                         switch_cost=0.02)
    with start_simulator(0, slow_low) as high, start_simulator(0, slow_low) as low:
        settings = settings_for(tmp_path / "state", high.port, low.port)
        instances = [dataclasses.replace(settings.instances[0], steal_types=frozenset({"LOW"})),
                     settings.instances[1]]
        files = [prompt_file(tmp_path, n, 303) for n in ("a", "b", "c")]
        result = run(dataclasses.replace(settings, instances=tuple(instances)), files)
        assert result.all_done, result.summary
        runs = runs_by_job(high, low)
    assert all(len(r) == 1 and r[0]["status"] == "success" for r in runs.values())
    stolen = [r["job_id"] for r in high.executions() if r["kind"] == "LOW"]
    assert stolen, "the HIGH server never took a LOW job"
    assert {r["kind"] for r in low.executions()} <= {"LOW", "COMBINE"}
    one = {job: r[0] for job, r in runs.items()}
    for job in stolen:
        assert one[job]["start"] >= one[job.replace("/L", "/H")]["end"]


def test_a_server_killed_mid_job_and_restarted_reruns_the_job(tmp_path, sims):
    high, low = sims
    low.set_faults(hang=True)  # the first LOW job is still running when the server dies
    killed: list[str] = []
    state = tmp_path / "state"

    def kill_first_low_job():
        wait_for(lambda: any(r["kind"] == "LOW" for r in low.executions()), "a LOW job",
                 timeout=60)
        killed.append(low.executions()[0]["job_id"])
        low.kill()
        try:
            wait_for(lambda: [e for e in logged(state, "instance_down")
                              if e.instance_id == "low_priority"],
                     "the killed server seen down", timeout=60)
        finally:
            low.set_faults(hang=False)
            low.start()

    killer = threading.Thread(target=kill_first_low_job)
    killer.start()
    result = run(settings_for(state, high.port, low.port), [prompt_file(tmp_path, "k", 202)])
    killer.join()
    assert result.all_done
    statuses = [r["status"] for r in runs_by_job(high, low)[killed[0]]]
    assert statuses[0] == "lost" and statuses[-1] == "success"


def test_an_invalid_workflow_fails_its_batch_and_the_others_go_on(tmp_path, sims):
    high, low = sims
    flows = tmp_path / "flows"
    shutil.copytree(PROJECT / "workflows" / "demo", flows)
    bindings = flows / "low.bindings.toml"  # EmptyImage.batch_size allows at most 4096
    text = bindings.read_text().replace("[bind]\n", '[bind]\nframes = "1.inputs.batch_size"\n')
    bindings.write_text(text)
    huge = tmp_path / "huge.toml"
    huge.write_text('name = "huge"\nframes = 5000\nframes_per_chunk = 5000\npositive = "p"\n')
    settings = settings_for(tmp_path / "state", high.port, low.port, WORKFLOWS={
        k: str(flows / f"{k.lower()}.json") for k in ("HIGH", "LOW", "COMBINE")})
    result = run(settings, [huge, prompt_file(tmp_path, "fine", 101)])
    assert not result.all_done
    assert "huge" in result.summary and "failed" in result.summary
    states = {b.batch_id: b.state for b in _spans(tmp_path / "state")}
    assert sorted(states.values()) == ["done", "failed"]
    lines = log_lines(tmp_path / "state")
    failed = [json.loads(line) for line in lines if b'"job_failed"' in line]
    assert len(failed) == 1 and "batch_size" in failed[0]["error"]
    assert "value_bigger_than_max" in failed[0]["error"]


def test_execution_errors_are_retried_with_backoff_then_fail(tmp_path, sims):
    high, low = sims
    low.set_faults(fail_rate=1.0)
    settings = settings_for(tmp_path / "state", high.port, low.port, MAX_RETRIES=2)
    result = run(settings, [prompt_file(tmp_path, "doomed", 101)])
    assert not result.all_done
    lows = [r for r in low.executions() if r["job_id"].endswith("/L1")]
    assert [r["status"] for r in lows] == ["error"] * 3
    records = list(read_records(EventLog(tmp_path / "state")))
    delays = [round(r.event.eligible_at - r.ts, 3) for r in records
              if isinstance(r.event, ev.JobAttemptFailed)]
    assert delays == [0.05, 0.1]
    assert [r.event.type for r in records][-1] == "batch_failed"


def _spans(state: Path):
    return build_timeline(read_records(EventLog(state))).batches.values()


def test_snapshots_every_few_events_and_at_the_stop_keep_the_whole_history(tmp_path, sims):
    high, low = sims
    state = tmp_path / "state"
    settings = settings_for(state, high.port, low.port, SNAPSHOT_EVERY=10)
    files = [prompt_file(tmp_path, "one", 202), prompt_file(tmp_path, "two", 101)]
    result = run(settings, files)
    assert result.all_done
    snapshots = sorted((state / "snapshots").iterdir())
    segments = sorted((state / "segments").iterdir())
    assert len(snapshots) == 2 and len(segments) >= 3  # the two newest; every segment
    assert (state / "events.jsonl").read_bytes() == b""  # a clean stop: nothing to replay
    seqs = [json.loads(line)["seq"] for line in log_lines(state)]
    assert seqs == list(range(1, len(seqs) + 1))
    again = run(settings, files)  # the same files: the batches it finished, from the snapshot
    assert again.all_done and again.batch_ids == result.batch_ids
    assert sum(len(s.executions()) for s in sims) == 9  # nothing rendered twice
