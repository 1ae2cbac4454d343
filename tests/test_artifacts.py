"""Files handed from job to job and the finished video brought home: naming a job's input
files from what its dependencies reported (pure), copying them between two simulated
servers over HTTP, reading them in place from a shared directory, start-up validation
against each server's node list, and fetching the final outputs."""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
from support import dispatch, make_plan, wait_for

import config
import daemon
from instances import fetching
from instances.agent import InstanceAgent
from instances.artifacts import (
    ArtifactMissing,
    Handoff,
    OutputFile,
    TransferFailed,
    Upload,
    final_files,
    local_path,
    output_files,
    resolve_inputs,
    save_files,
    unwritten_artifacts,
)
from instances.messages import Health, Validated
from instances.workflow import load_workflow
from simulator import SimConfig, start_simulator
from statemachine import events as ev
from statemachine.errors import (
    BadConfig,
    InstanceTrouble,
    InstanceUnreachable,
    PermanentDispatchError,
)
from statemachine.log import EventLog, MemoryLog
from statemachine.plan import JobKind
from statemachine.store import Store, read_records

PROJECT = Path(__file__).resolve().parent.parent
DEMO = PROJECT / "workflows" / "demo"
DURATIONS = {"HIGH": 0.05, "LOW": 0.05, "COMBINE": 0.02}
WORKFLOWS = {kind: load_workflow(DEMO / f"{kind.value.lower()}.json") for kind in JobKind}


def _file(name: str, sub: str = "b0001-video_b0001", kind: str = "output") -> dict[str, str]:
    return {"filename": name, "subfolder": sub, "type": kind}


HIGH_OUT = {"2": {"latents": [_file("high_001_00001_.latent")]}}
LOW_OUT = {"5": {"images": [{"abs_path": "/srv/out/x.png", **_file("low_001_00001_.png")}]},
           "7": {"images": [_file("low_001_00002_.mp4")], "animated": [True]},
           "11": {"latents": [_file("low_001_00003_.latent")]}}


# --- what ComfyUI reported ----------------------------------------------------------------


def test_output_files_reads_every_shape_of_report() -> None:
    vhs = {"gifs": [{**_file("c_00001.mp4"), "format": "video/h264-mp4", "frame_rate": 16.0,
                     "fullpath": "/x/c_00001.mp4"}]}
    outputs = {**LOW_OUT, "9": vhs, "4": {"images": [_file("p.png", "", "temp")]},
               "12": {"text": ["not a file"]}}
    assert [f.filename for f in output_files(outputs)] == [
        "low_001_00001_.png", "low_001_00002_.mp4", "low_001_00003_.latent", "c_00001.mp4",
        "p.png"]
    assert output_files(outputs, "9") == [OutputFile("c_00001.mp4", "b0001-video_b0001")]
    assert output_files(outputs, "99") == [] and output_files(None) == []
    assert [f.filename for f in final_files(outputs)][-1] == "c_00001.mp4"


def test_output_file_names() -> None:
    file = OutputFile("a_00001_.png", "b0001-x")
    assert (file.relative, file.annotated) == ("b0001-x/a_00001_.png",
                                               "b0001-x/a_00001_.png [output]")
    assert OutputFile("a.png").annotated == "a.png [output]"


# --- naming a job's input files -----------------------------------------------------------


def _store() -> Store:
    store = Store(MemoryLog())
    store.record(ev.BatchAccepted(make_plan("b0001", frames=303)), 1.0)
    return store


def _succeed(store: Store, job_id: str, instance: str, outputs: dict[str, Any]) -> None:
    prompt_id = dispatch(store, job_id, instance, 2.0)
    store.record(ev.JobQueued(job_id, prompt_id, 1), 2.0)
    store.record(ev.JobStarted(job_id, prompt_id), 2.0)
    store.record(ev.JobSucceeded(job_id, prompt_id, outputs), 2.0)


def _resolve(store: Store, job_id: str, target: str, transfer: str = "http"):
    job = store.jobs[job_id]
    deps = [store.jobs[d] for d in job.spec.deps]
    return resolve_inputs(job, deps, WORKFLOWS, target=target, transfer=transfer)


def test_a_reader_on_the_writers_server_reads_the_file_in_place() -> None:
    store = _store()
    _succeed(store, "b0001/H1", "gpu0", HIGH_OUT)
    resolved = _resolve(store, "b0001/L1", "gpu0")
    assert resolved.params["latent_path"] == \
        "b0001-video_b0001/high_001_00001_.latent [output]"
    assert resolved.uploads == ()


def test_http_names_the_uploaded_copy_and_orders_the_upload() -> None:
    store = _store()
    _succeed(store, "b0001/H1", "gpu0", HIGH_OUT)
    resolved = _resolve(store, "b0001/L1", "gpu1")
    assert resolved.params["latent_path"] == "b0001-video_b0001/high_001_00001_.latent"
    assert resolved.uploads == (Upload("gpu0", OutputFile("high_001_00001_.latent",
                                                          "b0001-video_b0001")),)
    planned = store.jobs["b0001/L1"].spec.params
    assert {k: v for k, v in resolved.params.items() if k != "latent_path"} == \
        {k: v for k, v in planned.items() if k != "latent_path"}


def test_path_mode_reads_from_the_shared_output_directory() -> None:
    store = _store()
    _succeed(store, "b0001/H1", "gpu0", HIGH_OUT)
    resolved = _resolve(store, "b0001/L1", "gpu1", transfer="path")
    assert resolved.params["latent_path"].endswith(" [output]") and resolved.uploads == ()


def test_next_chunk_and_combine_read_what_low_and_the_previous_combine_wrote() -> None:
    store = _store()
    _succeed(store, "b0001/H1", "gpu0", HIGH_OUT)
    _succeed(store, "b0001/L1", "gpu1", LOW_OUT)
    high2 = _resolve(store, "b0001/H2", "gpu0")
    assert high2.params["prev_ref_image_path"] == "b0001-video_b0001/low_001_00001_.png"
    assert [u.source for u in high2.uploads] == ["gpu1"]
    combine1 = _resolve(store, "b0001/C1", "gpu1")
    assert combine1.params["chunk_video_path"] == \
        "b0001-video_b0001/low_001_00002_.mp4 [output]"
    planned = store.jobs["b0001/C1"].spec.params
    assert combine1.params["ref_image_path"] == planned["ref_image_path"]  # not bound
    assert combine1.params["prev_combined_path"] is None


def test_a_dependency_that_reported_no_file_fails_the_reader_for_good() -> None:
    store = _store()
    _succeed(store, "b0001/H1", "gpu0", {"9": {"images": []}})
    with pytest.raises(ArtifactMissing, match=r"b0001/L1 reads latent_path from b0001/H1, "
                                              r"whose node 2 reported no file"):
        _resolve(store, "b0001/L1", "gpu1")
    assert unwritten_artifacts(WORKFLOWS[JobKind.LOW], {"5": LOW_OUT["5"]}) == [
        "chunk_video_path (node 7)", "low_latent (node 11)"]


# --- copying ------------------------------------------------------------------------------

LATENT = OutputFile("high_001_00001_.latent", "b0001-x")


def test_a_handoff_fetches_then_stores_under_the_same_name() -> None:
    stored: list[tuple[bytes, str, str]] = []

    def store(data: bytes, name: str, sub: str) -> dict[str, str]:
        stored.append((data, name, sub))
        return {"name": name, "subfolder": sub, "type": "input"}

    Handoff(Upload("gpu0", LATENT), lambda: b"latent").deliver(store)
    assert stored == [(b"latent", "high_001_00001_.latent", "b0001-x")]


def test_a_failed_fetch_or_a_renamed_upload_is_a_transient_transfer_failure() -> None:
    def unreachable() -> bytes:
        raise InstanceUnreachable("GET http://gpu0/view: refused")

    with pytest.raises(TransferFailed, match=r"cannot fetch b0001-x/high_001_00001_\.latent "
                                             r"from gpu0 to hand it on: GET"):
        Handoff(Upload("gpu0", LATENT), unreachable).deliver(lambda *a: {})
    with pytest.raises(TransferFailed, match=r"stored it as b0001-x/high_001_00001_ \(1\)"):
        Handoff(Upload("gpu0", LATENT), lambda: b"x").deliver(
            lambda data, name, sub: {"name": "high_001_00001_ (1).latent", "subfolder": sub})
    # the job is retried (not failed for good), and its server is not marked down
    assert not issubclass(TransferFailed, PermanentDispatchError | InstanceTrouble)


def test_save_files_writes_whole_files_named_after_the_server_file(tmp_path: Path) -> None:
    files = [OutputFile("combine_002_00001_.mp4", "b0001-x"), OutputFile("c.png", "sub")]
    saved = save_files(files, lambda f: f.filename.encode(), tmp_path, "b0001")
    assert saved == [tmp_path / "b0001" / "combine_002_00001_.mp4", tmp_path / "b0001" / "c.png"]
    assert saved[0].read_bytes() == b"combine_002_00001_.mp4"
    assert sorted(os.listdir(tmp_path / "b0001")) == ["c.png", "combine_002_00001_.mp4"]
    assert local_path(tmp_path, "b0001", OutputFile("../../etc/x", "s")) == \
        tmp_path / "b0001" / "x"
    assert final_files({"7": {"images": [_file(".."), _file(""), _file("v.mp4")]}}) == \
        [OutputFile("v.mp4", "b0001-video_b0001")]


# --- two simulated servers ----------------------------------------------------------------


def prompt_file(directory: Path, name: str, frames: int) -> Path:
    path = directory / f"{name}.txt"
    path.write_text(f"{name}\n\n{frames}\n\nA test video of {name}.\n\nblurry\n")
    return path


def settings_for(tmp_path: Path, high: int, low: int, **overrides: Any) -> config.Settings:
    return config.load_settings(None, {
        "COMFYUI_INSTANCES": [
            {"instance_id": "high_priority", "host": "127.0.0.1", "port": high,
             "job_types": ["HIGH"]},
            {"instance_id": "low_priority", "host": "127.0.0.1", "port": low,
             "job_types": ["LOW"]}],
        "STATE_DIR": str(tmp_path / "state"), "RETRY_DELAY": 0.05, "RETRY_DELAY_MAX": 0.2,
        "HEALTH_INTERVAL": 0.2, "PROBE_BACKOFF_MAX": 0.5, "CONNECT_TIMEOUT": 0.5,
        "REQUEST_TIMEOUT": 5, **overrides})


@pytest.fixture
def sims(tmp_path: Path):
    """Two servers, each with its own input and output directory (two hosts)."""
    made = [start_simulator(0, SimConfig(durations=DURATIONS), input_dir=tmp_path / f"{n}/in",
                            output_dir=tmp_path / f"{n}/out") for n in ("high", "low")]
    yield made
    for sim in made:
        sim.stop()


def _events(tmp_path: Path, kind: str) -> list[Any]:
    log = EventLog(tmp_path / "state")
    try:
        return [r.event for r in read_records(log) if r.event.type == kind]
    finally:
        log.close()


def _run(settings: config.Settings, *files: Path) -> daemon.RunResult:
    return daemon.run_files(settings, list(files), daemon.Stop())


def test_http_hands_every_file_across_and_brings_the_video_home(tmp_path: Path, sims) -> None:
    high, low = sims
    result = _run(settings_for(tmp_path, high.port, low.port),
                  prompt_file(tmp_path, "city", 202))
    assert result.all_done, result.summary
    sub = "b0001-city"
    assert sorted(p.name for p in (low.input_dir / sub).iterdir()) == \
        ["high_001_00001_.latent", "high_002_00001_.latent"]
    first_ref = _reported(tmp_path, "b0001/L1")["5"]["images"][0]["filename"]
    assert [p.name for p in (high.input_dir / sub).glob("*.png")] == [first_ref]
    (final,) = final_files(_reported(tmp_path, "b0001/C2"))
    home = tmp_path / "state" / "outputs" / "b0001" / final.filename
    on_server = next(s for s in sims if (s.output_dir / final.relative).exists())
    assert home.read_bytes() == (on_server.output_dir / final.relative).read_bytes()
    status = json.loads((tmp_path / "state" / "status.json").read_text())
    assert status["batches"][0]["saved_outputs"] == [str(home)]


def _reported(tmp_path: Path, job_id: str) -> dict[str, Any]:
    """The outputs ``job_succeeded`` recorded for ``job_id``."""
    return next(e.outputs for e in _events(tmp_path, "job_succeeded") if e.job_id == job_id)


def test_path_mode_reads_in_place_from_a_shared_output_directory(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    made = [start_simulator(0, SimConfig(durations=DURATIONS), output_dir=shared,
                            input_dir=tmp_path / f"in{n}") for n in range(2)]
    try:
        result = _run(settings_for(tmp_path, made[0].port, made[1].port,
                                   ARTIFACT_TRANSFER="path", ARTIFACT_DIR=str(shared)),
                      prompt_file(tmp_path, "fog", 202))
    finally:
        for sim in made:
            sim.stop()
    assert result.all_done, result.summary
    assert [list(sim.input_dir.iterdir()) for sim in made] == [[], []], "nothing uploaded"
    assert (tmp_path / "state" / "outputs" / "b0001").is_dir()


def test_path_mode_without_a_shared_directory_fails_the_reader_clearly(tmp_path: Path, sims,
                                                                       capsys) -> None:
    """The server refuses the LoadLatent branch and runs the rest (ComfyUI's partial
    acceptance): the job must fail, naming what it did not write, not pass without it."""
    high, low = sims
    result = _run(settings_for(tmp_path, high.port, low.port, ARTIFACT_TRANSFER="path"),
                  prompt_file(tmp_path, "lost", 101))
    assert not result.all_done
    (failed,) = _events(tmp_path, "job_failed")
    assert failed.job_id == "b0001/L1"
    assert failed.error.startswith("finished without writing low_latent (node 11)")
    said = capsys.readouterr()  # stdout, or stderr once a test set up the daemon's logging
    assert "Invalid latent file: b0001-lost/high_001_00001_.latent [output]" in \
        said.out + said.err


@pytest.mark.parametrize("failures", [1, fetching.FETCH_ATTEMPTS])
def test_a_failed_transfer_is_tried_again_then_a_retried_attempt_not_a_crash(
        tmp_path: Path, sims, monkeypatch, failures: int) -> None:
    high, low = sims
    real, calls = InstanceAgent.download, []

    def flaky(agent: InstanceAgent, file: OutputFile) -> bytes:
        calls.append(file.filename)
        if len(calls) <= failures:
            raise InstanceUnreachable(f"GET {agent.config.url}/view: connection reset")
        return real(agent, file)

    monkeypatch.setattr(InstanceAgent, "download", flaky)
    monkeypatch.setattr(fetching, "FETCH_RETRY_WAIT", 0.01)
    result = _run(settings_for(tmp_path, high.port, low.port),
                  prompt_file(tmp_path, "flaky", 101))
    assert result.all_done, result.summary
    attempts = _events(tmp_path, "job_attempt_failed")  # none while the agent tries again
    assert len(attempts) == (failures == fetching.FETCH_ATTEMPTS)
    for attempt in attempts:
        assert attempt.job_id == "b0001/L1" and "cannot fetch b0001-flaky/high_001_00001_" \
            ".latent from high_priority" in attempt.error


# --- start-up validation ------------------------------------------------------------------


def test_a_workflow_a_server_cannot_run_stops_the_daemon_before_any_post(tmp_path: Path,
                                                                         sims) -> None:
    high, low = sims
    flows = tmp_path / "flows"
    shutil.copytree(DEMO, flows)
    (flows / "low.json").write_text((flows / "low.json").read_text().replace(
        '"ImageBlur"', '"ImageBlurPlus"'))
    settings = settings_for(tmp_path, high.port, low.port, WORKFLOWS={
        k: str(flows / f"{k.lower()}.json") for k in ("HIGH", "LOW", "COMBINE")})
    with pytest.raises(BadConfig) as caught:
        _run(settings, prompt_file(tmp_path, "never", 101))
    assert f"workflow 'low' on low_priority (http://127.0.0.1:{low.port}): node 3: unknown " \
           "class_type 'ImageBlurPlus' (custom node not installed?)" in str(caught.value)
    assert high.executions() == [] and low.executions() == []
    assert _events(tmp_path, "job_dispatch_intent") == []


def test_workflows_are_checked_again_on_each_reconnection(tmp_path: Path) -> None:
    inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
    instance = config.load_settings(overrides={"ENABLE_DUAL_INSTANCE": False}).instances[0]
    with start_simulator(0, input_dir=tmp_path / "in", output_dir=tmp_path / "out") as sim:
        agent = InstanceAgent(_at(instance, sim.port), inbox.put, health_interval=0.1,
                              probe_backoff_max=0.2, connect_timeout=0.5, read_timeout=5,
                              workflows=list(WORKFLOWS.values()))
        seen: list[object] = []
        agent.start()
        try:
            _await(inbox, seen, up=True)
            sim.kill()
            _await(inbox, seen, up=False)
            sim.start()
            _await(inbox, seen, up=True)
        finally:
            agent.stop()
    kinds = [(type(m).__name__, getattr(m, "up", None)) for m in seen]
    assert kinds == [("Validated", None), ("Health", True), ("Health", False),
                     ("Validated", None), ("Health", True)]
    assert all(m.problems == () for m in seen if isinstance(m, Validated))


def _at(instance: config.InstanceConfig, port: int) -> config.InstanceConfig:
    return config.InstanceConfig(instance.instance_id, "127.0.0.1", port, instance.job_types,
                                 instance.max_concurrent, True)


def _await(inbox: queue.SimpleQueue[object], seen: list[object], *, up: bool) -> None:
    """Collect the agent's messages into ``seen`` until it reports health ``up``."""
    def found() -> bool:
        while not inbox.empty():
            seen.append(inbox.get())
            if isinstance(seen[-1], Health) and seen[-1].up is up:
                return True
        return False
    wait_for(found, f"Health(up={up})", timeout=10)


# --- a real ComfyUI ---------------------------------------------------------------------


@pytest.mark.real_comfyui
def test_demo_workflows_render_a_video_on_a_real_server(tmp_path: Path) -> None:
    """COMFYUI_URL=http://host:port pytest -m real_comfyui tests/test_artifacts.py"""
    url = os.environ.get("COMFYUI_URL")
    if not url:
        pytest.skip("COMFYUI_URL is not set")
    host, _, port = url.split("://", 1)[1].rstrip("/").rpartition(":")
    settings = config.load_settings(None, {
        "ENABLE_DUAL_INSTANCE": False, "STATE_DIR": str(tmp_path / "state"),
        "SINGLE_INSTANCE_CONFIG": {"host": host, "port": int(port)}, "RETRY_DELAY": 1,
        "REQUEST_TIMEOUT": 120, "MAX_RETRIES": 0})
    result = _run(settings, prompt_file(tmp_path, f"real_{threading.get_ident()}", 202))
    assert result.all_done, result.summary
    (saved,) = (tmp_path / "state" / "outputs" / "b0001").iterdir()
    assert saved.suffix == ".mp4" and saved.stat().st_size > 0
    final = orjson.loads((tmp_path / "state" / "status.json").read_bytes())["batches"][0]
    assert final["saved_outputs"] == [str(saved)]
