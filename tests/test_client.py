"""The ComfyUI client: pure parsing of recorded bodies, then the real thing over sockets
against the in-process simulator (both queue-item and history-message shapes)."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import websocket
from support import wait_for

from instances.artifacts import output_files
from instances.client import (
    ComfyClient,
    EventStream,
    JobOutcome,
    QueueSnapshot,
    StreamedRun,
    StreamEvent,
    WorkflowRejected,
    backoff_delay,
    execution_error_text,
    parse_history,
    parse_queue,
    parse_ws_message,
    rejection_text,
    ws_url,
)
from instances.workflow import load_workflow
from simulator import SimConfig, SimulatorHandle, start_simulator
from statemachine.errors import (
    BadConfig,
    InstanceTrouble,
    InstanceUnreachable,
    PermanentDispatchError,
    ServerError,
)
from statemachine.planner import PromptSpec, plan_batch

RECORDED = Path(__file__).resolve().parent / "recorded"


def _recorded(name: str) -> Any:
    return json.loads((RECORDED / f"{name}.json").read_text())


def _body(name: str) -> Any:
    return _recorded(name)["response"]["body"]


def _as_upstream_queue(body: dict[str, Any]) -> dict[str, Any]:
    """The fork's object items in upstream's array form ``[number, prompt_id, ...]``."""
    def item(i: dict[str, Any]) -> list[Any]:
        return [i["priority"], i["prompt_id"], i["prompt"], i["extra_data"], i["good_outputs"]]
    return {k: [item(i) for i in body[k]] for k in ("queue_running", "queue_pending")}


ERROR_DATA = {"prompt_id": "p1", "node_id": "1", "node_type": "LoadImage", "executed": [],
              "exception_message": "cannot identify image file 'corrupt.png'\n",
              "exception_type": "PIL.UnidentifiedImageError", "traceback": []}


def _upstream_entry(status_str: str, *messages: list[Any]) -> dict[str, Any]:
    return {"p1": {"prompt": [0, "p1", {}, {}, []], "outputs": {},
                   "status": {"status_str": status_str, "completed": status_str == "success",
                              "messages": [["execution_start", {"prompt_id": "p1"}],
                                           *messages]}}}


def test_history_fork_success_has_outputs() -> None:
    body = _body("history_success")
    (prompt_id,) = body
    outcome = parse_history(body, prompt_id)
    assert outcome == JobOutcome("success", body[prompt_id]["outputs"], None)
    assert outcome.outputs["2"]["images"][0]["filename"] == "ok_00001_.png"


def test_history_fork_error_takes_the_message_text() -> None:
    body = _body("history_execution_error")
    (prompt_id,) = body
    outcome = parse_history(body, prompt_id)
    assert outcome is not None and outcome.status == "error" and outcome.outputs == {}
    assert outcome.error == ("cannot identify image file "
                             "'/srv/comfyui/run-8188/input/corrupt.png'")


def test_history_upstream_error_uses_the_structured_data() -> None:
    outcome = parse_history(_upstream_entry("error", ["execution_error", ERROR_DATA]), "p1")
    assert outcome == JobOutcome("error", {}, "PIL.UnidentifiedImageError: cannot identify "
                                              "image file 'corrupt.png' (node 1, LoadImage)")


@pytest.mark.parametrize("message", [
    ["execution_interrupted", {"prompt_id": "p1", "node_id": "3", "node_type": "ImageScale",
                               "executed": ["1", "2"]}],
    "execution_interrupted",
])
def test_history_interrupted_in_both_shapes(message: Any) -> None:
    outcome = parse_history(_upstream_entry("error", message), "p1")
    assert outcome is not None and outcome.status == "interrupted"


def test_history_unknown_or_unfinished_is_none() -> None:
    assert parse_history(_body("history_unknown_id"), "no-such-prompt") is None
    assert parse_history({"other": {}}, "p1") is None


@pytest.mark.parametrize("shape", ["fork", "upstream"])
def test_queue_reads_prompt_ids_from_both_item_shapes(shape: str) -> None:
    body = _body("queue_running_and_pending")
    snap = parse_queue(body if shape == "fork" else _as_upstream_queue(body))
    assert snap.running == ("d30abb36-bf08-479e-9ed3-c69ca2dff735",)
    assert snap.pending == ("8c260381-b4ee-435a-b294-2bbb759ea580",
                            "5b47d087-a889-492a-a647-916311f831cd",
                            "65ef5d67-974e-477a-9dbf-3a8a39ef1d77")
    assert "5b47d087-a889-492a-a647-916311f831cd" in snap and "x" not in snap
    assert parse_queue(_body("queue_empty")) == QueueSnapshot((), ())


def test_rejection_text_lists_top_level_and_node_errors() -> None:
    assert rejection_text(_body("prompt_invalid_bad_link")) == (
        "prompt_outputs_failed_validation: Prompt outputs failed validation (Exception when "
        "validating node: '99'); node 2 (SaveImage): exception_during_validation: Exception "
        "when validating node ('99')")
    assert rejection_text(_body("prompt_invalid_unknown_class_type")) == (
        "missing_node_type: Node 'NoSuchNode' not found. The custom node may not be "
        "installed. (Node ID '#1')")
    assert rejection_text(_body("prompt_invalid_no_output_node")) == (
        "prompt_no_outputs: Prompt has no outputs")


def test_rejection_text_names_every_node_error() -> None:
    body = {"error": {"type": "prompt_outputs_failed_validation",
                      "message": "Prompt outputs failed validation", "details": ""},
            "node_errors": {
                "53": {"class_type": "KSampler", "errors": [
                    {"type": "value_smaller_than_min", "message": "steps 0 < 1",
                     "details": "steps"},
                    {"type": "required_input_missing", "message": "Required input is missing",
                     "details": "model"}]},
                "9": {"class_type": "SaveImage", "errors": [
                    {"type": "invalid_input_type", "message": "bad type", "details": ""}]}}}
    assert rejection_text(body).split("; ") == [
        "prompt_outputs_failed_validation: Prompt outputs failed validation",
        "node 53 (KSampler): value_smaller_than_min: steps 0 < 1 (steps)",
        "node 53 (KSampler): required_input_missing: Required input is missing (model)",
        "node 9 (SaveImage): invalid_input_type: bad type",
    ]


def test_ws_messages_become_stream_events_in_order() -> None:
    recorded = _recorded("ws_sequence_with_progress_upscale")
    events = [e for m in recorded["messages"]
              if (e := parse_ws_message(json.dumps(m["msg"]))) is not None]
    pid = recorded["response"]["body"]["prompt_id"]
    assert {e.prompt_id for e in events} == {pid}
    kinds = [e.kind for e in events]
    assert kinds[0] == "started" and kinds[-2:] == ["success", "finished"]
    assert "executing" in kinds
    progress = [e.data for e in events if e.kind == "progress"]
    assert len(progress) == 4 and all(p.keys() == {"node", "value", "max"} for p in progress)
    assert progress[-1]["value"] == progress[-1]["max"]


def test_ws_error_interrupted_and_junk() -> None:
    error = parse_ws_message(json.dumps({"type": "execution_error", "data": ERROR_DATA}))
    assert error == StreamEvent("error", "p1", ERROR_DATA)
    assert execution_error_text(error.data) == (
        "PIL.UnidentifiedImageError: cannot identify image file 'corrupt.png' "
        "(node 1, LoadImage)")
    terminal = _recorded("interrupt_with_prompt_id")["terminal_ws_msg"]
    interrupted = parse_ws_message(json.dumps(terminal))
    assert interrupted is not None and interrupted.kind == "interrupted"
    assert parse_ws_message(b'{"type": "status", "data": {"status": {}}}') is None
    assert parse_ws_message("not json") is None
    assert parse_ws_message('["a list"]') is None


def _run_of(events: list[StreamEvent]) -> StreamedRun:
    """A run fed a job's stream events as the agent feeds it."""
    run = StreamedRun()
    for event in events:
        run.add(event)
    return run


def _streamed(messages: list[dict[str, Any]]) -> StreamedRun:
    """A run fed recorded websocket messages."""
    return _run_of([e for m in messages if (e := parse_ws_message(json.dumps(m["msg"])))])


def test_a_run_followed_on_the_stream_tells_its_outcome_as_history_would() -> None:
    success = _recorded("ws_sequence_success")
    assert _streamed(success["messages"]).outcome() == JobOutcome(
        "success", _body("history_success")[success["prompt_id"]]["outputs"], None)
    error = _streamed(_recorded("ws_sequence_execution_error")["messages"]).outcome()
    assert error is not None and error.status == "error" and error.outputs == {}
    assert str(error.error).startswith("PIL.UnidentifiedImageError: cannot identify image file")
    interrupt = _recorded("interrupt_with_prompt_id")
    interrupted = _streamed(interrupt["ws_messages_interrupted_prompt"]).outcome()
    assert interrupted == JobOutcome("interrupted", {}, "interrupted at node 3")
    pid = interrupt["terminal_ws_msg"]["data"]["prompt_id"]
    from_history = parse_history(interrupt["history_interrupted"], pid)
    assert from_history is not None and from_history.status == "interrupted"


def test_a_run_the_stream_cannot_vouch_for_is_left_to_history() -> None:
    cached = _recorded("ws_sequence_cached_rerun")["messages"]
    assert _streamed(cached).outcome() is None  # cached nodes: not every server reports them
    assert _streamed(_recorded("ws_sequence_success")["messages"][:3]).outcome() is None


def test_ws_url_and_backoff() -> None:
    assert ws_url("http://127.0.0.1:8188/", "c 1") == "ws://127.0.0.1:8188/ws?clientId=c%201"
    assert ws_url("https://gpu:443", "c").startswith("wss://gpu:443/ws?")
    for attempt in range(40):
        delay = backoff_delay(attempt, 10.0)
        assert min(10.0, 0.1 * 2**attempt) / 2 <= delay <= 10.0
    with pytest.raises(BadConfig, match="must look like http://host:port"):
        ComfyClient("127.0.0.1:8188")



class ScriptedSocket:
    """Plays a websocket's side of ``recv_data``: frames, timeouts and failures in order."""

    def __init__(self, *script: Any) -> None:
        self.script = list(script)
        self.pings = 0

    def recv_data(self, control_frame: bool = False) -> tuple[int, bytes]:
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step

    def ping(self) -> None:
        self.pings += 1


TIMEOUT = websocket.WebSocketTimeoutException("timed out")
PONG = (websocket.ABNF.OPCODE_PONG, b"")


def test_stream_keeps_a_quiet_link_that_answers_pings() -> None:
    seen: list[StreamEvent] = []
    stream = EventStream("http://127.0.0.1:1", "c", seen.append, idle_timeout=15.0)
    sock = ScriptedSocket(
        TIMEOUT, PONG, TIMEOUT, PONG,
        (websocket.ABNF.OPCODE_BINARY, b"\x00\x00\x00\x01preview"),
        (websocket.ABNF.OPCODE_TEXT, b'{"type": "execution_start", "data": {"prompt_id": "p"}}'),
        ConnectionResetError("reset by peer"))
    assert stream._receive(sock) == "ConnectionResetError: reset by peer"
    assert sock.pings == 2
    assert seen == [StreamEvent("started", "p", {"prompt_id": "p"})]


def test_stream_drops_a_link_that_stays_silent_after_a_ping() -> None:
    stream = EventStream("http://127.0.0.1:1", "c", lambda e: None, idle_timeout=15.0)
    sock = ScriptedSocket(TIMEOUT, TIMEOUT)
    assert stream._receive(sock) == "no answer for 30 s"
    assert sock.pings == 1


# --- against the simulator ---------------------------------------------------------------

DEMO = Path(__file__).resolve().parent.parent / "workflows" / "demo"
DEADLINE = 10.0
SIMPLE = {"1": {"class_type": "EmptyImage",
                "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 7}},
          "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                      "filename_prefix": "t/simple"}}}
WITH_PROGRESS = {
    "1": {"class_type": "EmptyImage",
          "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 9}},
    "2": {"class_type": "UpscaleModelLoader",
          "inputs": {"model_name": "tiny_compact_x1.safetensors"}},
    "3": {"class_type": "ImageUpscaleWithModel",
          "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "up"}},
}
SLOW = {"comfy_dual": {"kind": "SLOW"}}


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def make_sim() -> Iterator[Callable[..., SimulatorHandle]]:
    handles: list[SimulatorHandle] = []

    def make(**config: Any) -> SimulatorHandle:
        config = {"default_duration": 0.02, "durations": {"SLOW": 60.0}, **config}
        handles.append(start_simulator(config=SimConfig(**config)))
        return handles[-1]

    yield make
    for handle in handles:
        handle.stop()


@pytest.fixture
def sim(make_sim: Callable[..., SimulatorHandle]) -> SimulatorHandle:
    return make_sim()


@pytest.fixture
def client(sim: SimulatorHandle) -> Iterator[ComfyClient]:
    with ComfyClient(sim.url, read_timeout=5.0) as c:
        yield c


def run(client: ComfyClient, graph: dict[str, Any], **extra: Any) -> JobOutcome:
    prompt_id = new_id()
    client.submit(graph, prompt_id=prompt_id, client_id="tests", extra_data=extra or None)
    return wait_for(lambda: client.history(prompt_id), f"history of {prompt_id}")


def test_health_and_object_info(client: ComfyClient) -> None:
    assert client.system_stats()["system"]["comfyui_version"]
    assert "EmptyImage" in client.object_info()
    assert client.object_info("SaveImage")["SaveImage"]["output_node"] is True
    assert client.object_info("NoSuchNode") == {}


@pytest.mark.parametrize("shape", ["pair", "string"])
def test_submit_then_history_success_with_outputs(make_sim: Callable[..., SimulatorHandle],
                                                  shape: str) -> None:
    with ComfyClient(make_sim(history_message_shape=shape).url) as c:
        prompt_id = new_id()
        number = c.submit(SIMPLE, prompt_id=prompt_id, client_id="tests")
        assert isinstance(number, int)
        outcome = wait_for(lambda: c.history(prompt_id), "history")
        assert outcome.status == "success" and outcome.error is None
        (image,) = outcome.outputs["2"]["images"]
        assert image["filename"].startswith("simple_") and image["subfolder"] == "t"
        assert c.view(image["filename"], image["subfolder"])[:4] == b"\x89PNG"


@pytest.mark.parametrize("shape", ["pair", "string"])
def test_execution_error_in_both_history_shapes(make_sim: Callable[..., SimulatorHandle],
                                                shape: str) -> None:
    sim = make_sim(history_message_shape=shape)
    sim.set_faults(fail_rate=1.0)
    with ComfyClient(sim.url) as c:
        outcome = run(c, SIMPLE)
    assert outcome.status == "error"
    assert "simulated failure (fault injection)" in str(outcome.error)


def test_demo_workflows_run_for_planned_jobs(client: ComfyClient) -> None:
    """Each job reads the files earlier jobs wrote, by the names the server reported
    (one server, so in place: ``sub/name [output]``, as instances/artifacts.py does)."""
    spec = PromptSpec(name="demo", frames=20, positive='say "hi" {x}\n', priority=0)
    plan = plan_batch(spec, batch_id="b0001", sha256="ab" * 32, source="demo.txt",
                      frames_per_chunk=10, width=64, height=48)
    written: dict[str, str] = {}  # planned artifact path -> the file the server wrote
    for job in plan.jobs:
        workflow = load_workflow(DEMO / f"{job.kind.value.lower()}.json")
        params = {k: written.get(v, v) if isinstance(v, str) else v
                  for k, v in job.params.items()}
        outcome = run(client, workflow.render(params),
                      comfy_dual={"kind": job.kind.value, "job_id": job.job_id})
        assert outcome.status == "success", (job.job_id, outcome.error)
        for artifact, node in workflow.produces.items():
            if artifact in job.params:  # LOW's low_latent is a must-write, read by no one
                written[job.params[artifact]] = output_files(outcome.outputs, node)[0].annotated
        files = [f for out in outcome.outputs.values() for key in ("images", "latents")
                 for f in out.get(key, []) if f["type"] == "output"]  # not previews
        assert files and all(f["subfolder"] == "b0001-demo" for f in files), outcome.outputs
        assert all(f["filename"].startswith(job.params["output_prefix"].split("/")[1])
                   for f in files)


def test_invalid_workflow_is_permanent_with_node_errors(client: ComfyClient) -> None:
    bad = json.loads(json.dumps(SIMPLE))
    bad["1"]["inputs"]["width"] = 0
    with pytest.raises(WorkflowRejected) as caught:
        client.submit(bad, prompt_id=new_id(), client_id="tests")
    assert "node 1 (EmptyImage): value_smaller_than_min" in str(caught.value)
    assert "prompt_outputs_failed_validation" in str(caught.value)
    assert caught.value.node_errors["1"]["class_type"] == "EmptyImage"
    assert isinstance(caught.value, PermanentDispatchError)
    with pytest.raises(PermanentDispatchError, match="missing_node_type: Node 'Nope'"):
        client.submit({"1": {"class_type": "Nope", "inputs": {}}}, prompt_id=new_id(),
                      client_id="tests")


def test_a_proxy_named_in_the_environment_is_used_unless_no_proxy_says_otherwise(
        sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", sim.url)  # aiohttp answers absolute-form requests
    monkeypatch.setenv("NO_PROXY", "")
    through = ComfyClient("http://gpu.comfy-dual.invalid:8188", connect_timeout=1.0)
    assert through.system_stats()["system"]["comfyui_version"]
    monkeypatch.setenv("NO_PROXY", "gpu.comfy-dual.invalid")
    with pytest.raises(InstanceUnreachable):
        ComfyClient("http://gpu.comfy-dual.invalid:8188", connect_timeout=1.0).system_stats()


def test_http_500_is_the_instance_s_trouble(sim: SimulatorHandle, client: ComfyClient
                                            ) -> None:
    sim.set_faults(http_500=True)
    with pytest.raises(ServerError, match="HTTP 500") as caught:
        client.submit(SIMPLE, prompt_id=new_id(), client_id="tests")
    assert isinstance(caught.value, InstanceTrouble)
    with pytest.raises(ServerError):
        client.queue()
    sim.set_faults(http_500=False)
    assert client.queue() == QueueSnapshot((), ())


def test_slow_answer_is_unreachable(sim: SimulatorHandle) -> None:
    sim.set_faults(response_delay=1.0)
    with ComfyClient(sim.url, read_timeout=0.2) as c, \
            pytest.raises(InstanceUnreachable, match="ReadTimeout"):
        c.system_stats()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_closed_port_is_unreachable_never_a_raw_exception() -> None:
    c = ComfyClient(f"http://127.0.0.1:{_closed_port()}", connect_timeout=1.0)
    calls: list[Callable[[], Any]] = [
        c.system_stats, c.queue, lambda: c.history("x"), lambda: c.view("a.png"),
        lambda: c.submit(SIMPLE, prompt_id=new_id(), client_id="t"),
        lambda: c.upload(b"x", "a.png"), lambda: c.interrupt("x"),
    ]
    for call in calls:
        with pytest.raises(InstanceUnreachable, match="ConnectionError"):
            call()


@pytest.mark.parametrize("shape", ["array", "object"])
def test_queue_delete_and_interrupt_only_the_running_id(
        make_sim: Callable[..., SimulatorHandle], shape: str) -> None:
    with ComfyClient(make_sim(queue_item_shape=shape).url) as c:
        first, second, third = new_id(), new_id(), new_id()
        for prompt_id in (first, second, third):
            c.submit(SIMPLE, prompt_id=prompt_id, client_id="tests", extra_data=SLOW)
        snap = wait_for(lambda: (s := c.queue()).running and s, "a running job")
        assert snap == QueueSnapshot((first,), (second, third))
        c.delete_from_queue([third, "unknown-id", first])
        assert c.queue() == QueueSnapshot((first,), (second,))
        assert c.interrupt(second) is False
        assert c.queue().running == (first,)
        assert c.interrupt(first) is True
        outcome = wait_for(lambda: c.history(first), "interrupted history")
        assert outcome.status == "interrupted"
        assert wait_for(lambda: c.queue().running, "second running") == (second,)
        assert c.history(third) is None


def test_upload_then_view(client: ComfyClient) -> None:
    data = bytes(range(256)) * 4
    stored = client.upload(data, "ref.png", subfolder="b0001")
    assert stored == {"name": "ref.png", "subfolder": "b0001", "type": "input"}
    assert client.view("ref.png", "b0001", type="input") == data
    with pytest.raises(PermanentDispatchError, match="HTTP 404"):
        client.view("missing.png", "b0001", type="input")


def test_client_is_shared_by_threads(client: ComfyClient) -> None:
    errors: list[BaseException] = []

    def poll() -> None:
        try:
            for _ in range(20):
                client.queue()
                client.history(new_id())
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=poll) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


class Recorder:
    """Collects stream events; raises on ``executing`` to prove the stream survives it."""

    def __init__(self) -> None:
        self.events: queue.Queue[StreamEvent] = queue.Queue()

    def __call__(self, event: StreamEvent) -> None:
        self.events.put(event)
        if event.kind == "executing":
            raise ValueError("a buggy handler")

    def next(self, kind: str) -> StreamEvent:
        """Skip to the next event of ``kind``."""
        deadline = time.monotonic() + DEADLINE
        while True:
            event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            if event.kind == kind:
                return event

    def job(self, prompt_id: str) -> list[StreamEvent]:
        """This job's events, up to and including ``finished``."""
        seen: list[StreamEvent] = []
        while not seen or seen[-1].kind != "finished":
            event = self.events.get(timeout=DEADLINE)
            if event.prompt_id == prompt_id:
                seen.append(event)
        return seen


def _kinds_in_order(events: list[StreamEvent]) -> list[str]:
    kinds = [e.kind for e in events]
    return [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]


def test_event_stream_follows_a_job_and_reconnects(sim: SimulatorHandle,
                                                   client: ComfyClient) -> None:
    recorder = Recorder()
    stream = EventStream(sim.url, "stream-1", recorder, reconnect_max_delay=0.2)
    stream.start()
    try:
        recorder.next("connected")
        assert stream.connected
        first = new_id()
        client.submit(WITH_PROGRESS, prompt_id=first, client_id="stream-1")
        events = recorder.job(first)
        assert _kinds_in_order(events) == ["started", "cached", "executing", "progress",
                                           "executing", "executed", "success", "finished"]
        progress = [e.data for e in events if e.kind == "progress"]
        assert progress[-1] == {"node": "3", "value": 4, "max": 4}
        outcome = _run_of(events).outcome()
        assert outcome is not None and outcome.status == "success"
        assert outcome == client.history(first)

        sim.kill()
        recorder.next("disconnected")
        sim.start()
        recorder.next("connected")
        second = new_id()
        client.submit(SIMPLE, prompt_id=second, client_id="stream-1")
        assert [e.kind for e in recorder.job(second)][-2:] == ["success", "finished"]
    finally:
        stream.stop()
    assert not stream.connected


def test_event_stream_reports_errors_and_stops_while_retrying(sim: SimulatorHandle,
                                                              client: ComfyClient) -> None:
    recorder = Recorder()
    stream = EventStream(sim.url, "stream-2", recorder, reconnect_max_delay=0.2)
    stream.start()
    recorder.next("connected")
    sim.set_faults(fail_rate=1.0)
    prompt_id = new_id()
    client.submit(SIMPLE, prompt_id=prompt_id, client_id="stream-2")
    events = recorder.job(prompt_id)
    (error,) = [e for e in events if e.kind == "error"]
    assert error.data["exception_type"] == "SimulatedFailure"
    outcome = _run_of(events).outcome()
    assert outcome is not None and outcome.status == "error"
    assert outcome == client.history(prompt_id)
    sim.kill()
    recorder.next("disconnected")
    stream.stop()
    assert not stream.connected
