"""Contract tests of the ComfyUI simulator against responses recorded on a real server.

Each recorded case is replayed against the simulator and the answer must have the same
status and the same structure (keys and value types, recursively; ids, timestamps and
numbers may differ). The ``server`` fixture also runs every contract test against a real
ComfyUI:

    COMFYUI_URL=http://host:port pytest -m real_comfyui tests/test_simulator_contract.py

The real server must be idle, run on CPU with no models (the workflows are model-free)
and accept that these tests clear its queue and history. The tests after the contract
section cover what only the simulator has: its execution ledger, fault knobs, crashes.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import requests
import websocket
from support import wait_for

from simulator import SimConfig, SimulatorHandle, start_simulator
from simulator.files import tiny_latent, tiny_png
from statemachine.errors import BadConfig

RECORDED = Path(__file__).parent / "recorded"
REPO = Path(__file__).parent.parent
SLOW_KIND = "SLOW"
# The recorded server is a fork: object queue items, plain-string history messages.
FORK = SimConfig(default_duration=0.02, durations={SLOW_KIND: 60.0},
                 queue_item_shape="object", history_message_shape="string")
UPSTREAM = SimConfig(default_duration=0.02, durations={SLOW_KIND: 60.0})


def recorded(name: str) -> dict[str, Any]:
    return json.loads((RECORDED / f"{name}.json").read_text(encoding="utf-8"))


# --- structure comparison ------------------------------------------------------------------


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", type(None): "null", dict: "object", list: "array"}[type(value)]


def shape_diff(recorded_value: Any, actual: Any, path: str = "$") -> list[str]:
    """Where ``actual`` differs in structure from ``recorded_value`` (empty: same shape).

    Objects need the same keys; lists of equal length compare item by item, otherwise
    every actual item against the first recorded one (an empty side matches anything).
    """
    if _kind(recorded_value) != _kind(actual):
        return [f"{path}: {_kind(recorded_value)} expected, got {_kind(actual)}"]
    if isinstance(recorded_value, dict):
        if set(recorded_value) != set(actual):
            return [f"{path}: keys {sorted(recorded_value)} != {sorted(actual)}"]
        return [d for k in recorded_value for d in shape_diff(recorded_value[k], actual[k],
                                                              f"{path}.{k}")]
    if isinstance(recorded_value, list) and recorded_value and actual:
        pairs = (zip(recorded_value, actual, strict=True) if len(recorded_value) == len(actual)
                 else ((recorded_value[0], a) for a in actual))
        return [d for i, (r, a) in enumerate(pairs) for d in shape_diff(r, a, f"{path}[{i}]")]
    return []


def assert_same_shape(recorded_value: Any, actual: Any) -> None:
    diff = shape_diff(recorded_value, actual)
    assert not diff, "\n".join(diff)


def test_shape_diff_compares_structure_not_values() -> None:
    assert not shape_diff({"a": [1, "x"], "b": None}, {"a": [2.5, "y"], "b": None})
    assert not shape_diff({"l": [{"k": 1}]}, {"l": [{"k": 2}, {"k": 3}]})
    assert shape_diff({"a": 1}, {"a": 1, "b": 2}) == ["$: keys ['a'] != ['a', 'b']"]
    assert shape_diff({"a": [True]}, {"a": [1]}) == ["$.a[0]: bool expected, got number"]


# --- talking to a server -------------------------------------------------------------------


def fresh_color() -> int:
    """A colour no earlier run used, so a real server cannot answer from its cache."""
    return uuid.uuid4().int % 16_777_216


def graph_basic(prefix: str = "ok") -> dict[str, Any]:
    return {"1": {"class_type": "EmptyImage",
                  "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": fresh_color()}},
            "2": {"class_type": "SaveImage",
                  "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


def graph_slow(prefix: str = "slow") -> dict[str, Any]:
    """Several seconds on a real CPU server; ``SLOW_KIND`` makes it 60 s on the simulator."""
    return {"1": {"class_type": "EmptyImage",
                  "inputs": {"width": 512, "height": 512, "batch_size": 8, "color": fresh_color()}},
            "2": {"class_type": "ImageBlur",
                  "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 5.0}},
            "3": {"class_type": "ImageScale",
                  "inputs": {"image": ["2", 0], "upscale_method": "nearest-exact", "width": 64,
                             "height": 64, "crop": "disabled"}},
            "4": {"class_type": "SaveImage",
                  "inputs": {"images": ["3", 0], "filename_prefix": prefix}}}


def graph_load_image(name: str) -> dict[str, Any]:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage",
                  "inputs": {"images": ["2", 0], "filename_prefix": "loaded"}}}


def graph_video() -> dict[str, Any]:
    return {"1": {"class_type": "EmptyImage",
                  "inputs": {"width": 64, "height": 64, "batch_size": 16, "color": fresh_color()}},
            "2": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 8.0}},
            "3": {"class_type": "SaveVideo",
                  "inputs": {"video": ["2", 0], "filename_prefix": "video/test", "format": "auto",
                             "codec": "auto"}}}


def graph_webp() -> dict[str, Any]:
    return {"1": {"class_type": "EmptyImage",
                  "inputs": {"width": 64, "height": 64, "batch_size": 8, "color": fresh_color()}},
            "2": {"class_type": "SaveAnimatedWEBP",
                  "inputs": {"images": ["1", 0], "filename_prefix": "anim", "fps": 6.0,
                             "lossless": False, "quality": 80, "method": "default"}}}


def graph_upscale() -> dict[str, Any]:
    """Needs ``tiny_compact_x1.safetensors`` in a real server's ``models/upscale_models``."""
    return {"1": {"class_type": "EmptyImage",
                  "inputs": {"width": 512, "height": 512, "batch_size": 2, "color": fresh_color()}},
            "2": {"class_type": "UpscaleModelLoader",
                  "inputs": {"model_name": "tiny_compact_x1.safetensors"}},
            "3": {"class_type": "ImageUpscaleWithModel",
                  "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
            "4": {"class_type": "ImageScale",
                  "inputs": {"image": ["3", 0], "upscale_method": "nearest-exact", "width": 64,
                             "height": 64, "crop": "disabled"}},
            "5": {"class_type": "SaveImage",
                  "inputs": {"images": ["4", 0], "filename_prefix": "upscaled"}}}


def item_id(item: list[Any] | dict[str, Any]) -> str:
    """The prompt_id of a queue item, upstream array or fork object."""
    return item[1] if isinstance(item, list) else item["prompt_id"]


def _plain(message: Any) -> str:
    if isinstance(message, str):
        return message
    event, data = message
    return f"{event}: {data['exception_message']}" if event == "execution_error" else event


def as_recorded(entry: dict[str, Any]) -> dict[str, Any]:
    """A history entry comparable with the recorded ones: upstream ``[event, data]``
    messages as the fork's strings, and without the ``SLOW_KIND`` tag in ``extra_data``."""
    prompt = list(entry["prompt"])
    prompt[3] = {k: v for k, v in prompt[3].items() if k != "comfy_dual"}
    status = {**entry["status"], "messages": [_plain(m) for m in entry["status"]["messages"]]}
    return {**entry, "prompt": prompt, "status": status}


class Listener:
    """A websocket client of ``/ws`` that keeps every JSON message it receives."""

    def __init__(self, url: str, client_id: str, timeout: float) -> None:
        parsed = urlparse(url)
        self.ws = websocket.create_connection(
            f"ws://{parsed.netloc}/ws?clientId={client_id}", timeout=timeout)
        self.timeout = timeout
        self.messages: list[dict[str, Any]] = []

    def until(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Read until a message matches ``predicate`` (binary preview frames are skipped)."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            frame = self.ws.recv()
            if isinstance(frame, str):
                self.messages.append(json.loads(frame))
                if predicate(self.messages[-1]):
                    return self.messages[-1]
        raise AssertionError("no matching websocket message in time")

    def until_executing(self, prompt_id: str, node: str | None) -> dict[str, Any]:
        return self.until(lambda m: m["type"] == "executing"
                          and m["data"].get("prompt_id") == prompt_id
                          and m["data"]["node"] == node)

    def window(self, prompt_id: str) -> list[dict[str, Any]]:
        """Messages from the first to the last one carrying ``prompt_id`` (as recorded)."""
        marks = [i for i, m in enumerate(self.messages)
                 if isinstance(m["data"], dict) and m["data"].get("prompt_id") == prompt_id]
        return self.messages[marks[0]: marks[-1] + 1]

    def close(self) -> None:
        self.ws.close()


@dataclass
class Target:
    """A ComfyUI server under test: the simulator or a real one (``sim`` is then None)."""

    url: str
    sim: SimulatorHandle | None = None
    timeout: float = 10.0

    def get(self, path: str, **params: Any) -> requests.Response:
        return requests.get(self.url + path, params=params, timeout=self.timeout)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=self.timeout, **kwargs)

    def submit(self, graph: dict[str, Any], slow: bool = False, **fields: Any) -> dict[str, Any]:
        """POST /prompt (``slow`` tags it so that the simulator takes a minute); 200 body."""
        body: dict[str, Any] = {"prompt": graph, **fields}
        if slow:
            body.setdefault("extra_data", {})["comfy_dual"] = {"kind": SLOW_KIND}
        response = self.post("/prompt", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    def history(self, prompt_id: str) -> dict[str, Any]:
        return self.get(f"/history/{prompt_id}").json()

    def wait_done(self, prompt_id: str) -> dict[str, Any]:
        """The history entry of ``prompt_id`` once it is written."""
        return wait_for(lambda: self.history(prompt_id).get(prompt_id),
                        f"history of {prompt_id}", self.timeout)

    def wait_running(self, prompt_id: str) -> None:
        wait_for(lambda: [i for i in self.get("/queue").json()["queue_running"]
                          if item_id(i) == prompt_id], f"{prompt_id} to run", self.timeout)

    def listen(self, client_id: str) -> Listener:
        return Listener(self.url, client_id, self.timeout)

    def upload(self, name: str, data: bytes, **fields: str) -> requests.Response:
        return self.post("/upload/image", files={"image": (name, data, "image/png")},
                         data={"overwrite": "true", "type": "input", **fields})

    def settle(self) -> None:
        """Leave the server idle: drop pending prompts and interrupt the running one."""
        self.post("/queue", json={"clear": True})
        self.post("/interrupt")
        wait_for(lambda: not self.get("/queue").json()["queue_running"], "idle", self.timeout)


@pytest.fixture(params=["sim", pytest.param("real", marks=pytest.mark.real_comfyui)])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    """Each contract test runs on a fresh simulator, and with -m real_comfyui on COMFYUI_URL."""
    if request.param == "real":
        url = os.environ.get("COMFYUI_URL")
        if not url:
            pytest.skip("COMFYUI_URL is not set")
        target = Target(url.rstrip("/"), timeout=120.0)
        yield target
        target.settle()
        return
    with start_simulator(config=FORK, output_dir=tmp_path / "output",
                         input_dir=tmp_path / "input") as sim:
        yield Target(sim.url, sim)


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimulatorHandle]:
    """A simulator in the upstream flavour with short jobs, for the simulator-only tests."""
    with start_simulator(config=UPSTREAM, output_dir=tmp_path / "output",
                         input_dir=tmp_path / "input") as handle:
        yield handle


def sim_target(handle: SimulatorHandle) -> Target:
    return Target(handle.url, handle)


# --- contract: POST /prompt -----------------------------------------------------------------


def test_prompt_success(server: Target) -> None:
    case = recorded("prompt_success")
    response = server.post("/prompt", json={**case["request"]["json"], "prompt": graph_basic()})
    assert response.status_code == case["response"]["status"]
    assert_same_shape(case["response"]["body"], response.json())


@pytest.mark.parametrize(("case_name", "sent", "expected"), [
    ("prompt_client_prompt_id", "client-chosen-id-0001", "client-chosen-id-0001"),
    ("prompt_client_prompt_id_integer", 12345, "12345"),
])
def test_client_chosen_prompt_id(server: Target, case_name: str, sent: Any,
                                 expected: str) -> None:
    server.post("/history", json={"delete": [str(sent)]})
    case = recorded(case_name)
    body = server.submit(graph_basic("cid"), client_id="contract", prompt_id=sent)
    assert body["prompt_id"] == expected
    assert_same_shape(case["response"]["body"], body)
    entry = as_recorded(server.wait_done(body["prompt_id"]))
    assert entry["prompt"][:2] == [body["number"], body["prompt_id"]]
    assert_same_shape(next(iter(case["history_after"].values())), entry)


def test_reused_prompt_id_runs_again_and_overwrites_history(server: Target) -> None:
    prompt_id = f"reused-{uuid.uuid4()}"
    first = server.submit(graph_basic("cid"), client_id="contract", prompt_id=prompt_id)
    server.wait_done(prompt_id)
    second = server.submit(graph_basic("cid2"), client_id="contract", prompt_id=prompt_id)
    entry = wait_for(lambda: (server.history(prompt_id)[prompt_id]["prompt"][0]
                              == second["number"] and server.history(prompt_id)[prompt_id]),
                     "rerun", server.timeout)
    assert second["number"] != first["number"]
    assert entry["outputs"]["2"]["images"][0]["filename"].startswith("cid2_")
    if server.sim:
        assert server.sim.counts()[prompt_id] == 2


def test_explicit_number_is_a_float_and_front_is_negative(server: Target) -> None:
    numbers = recorded("prompt_explicit_number_field")
    server.submit(graph_basic("num"))  # the counter is past 0, so front gives a negative number
    for key, sent in (("post_number_100", 100), ("post_number_-5.5", -5.5)):
        body = server.submit(graph_basic("num"), number=sent)
        assert_same_shape(numbers[key]["response"]["body"], body)
        assert body["number"] == float(sent) and isinstance(body["number"], float)
    front = recorded("prompt_front_true")["front_d"]["response"]["body"]
    body = server.submit(graph_basic("front"), front=True)
    assert_same_shape(front, body)
    assert body["number"] < 0


INVALID_PROMPTS = ["prompt_invalid_bad_link", "prompt_invalid_combo_value",
                   "prompt_invalid_empty_prompt", "prompt_invalid_loadimage_missing_file",
                   "prompt_invalid_malformed_json_body", "prompt_invalid_missing_required_input",
                   "prompt_invalid_no_output_node", "prompt_invalid_no_prompt_key",
                   "prompt_invalid_prompt_is_list", "prompt_invalid_unknown_class_type",
                   "prompt_invalid_value_out_of_range", "prompt_invalid_wrong_type"]


def _error_types(body: dict[str, Any]) -> tuple[str, dict[str, list[str]]]:
    return body["error"]["type"], {node: [e["type"] for e in err["errors"]]
                                   for node, err in body["node_errors"].items()}


@pytest.mark.parametrize("case_name", INVALID_PROMPTS)
def test_invalid_prompt_is_refused_like_comfyui(server: Target, case_name: str) -> None:
    case = recorded(case_name)
    request = case["request"]
    sent = {"json": request["json"]} if "json" in request else {"data": request["data"]}
    response = server.post(urlparse(request["url"]).path, **sent)
    expected = case["response"]
    assert response.status_code == expected["status"]
    if isinstance(expected["body"], str):
        assert response.headers["Content-Type"] == expected["content_type"]
        assert response.text == expected["body"]
        return
    assert_same_shape(expected["body"], response.json())
    assert _error_types(response.json()) == _error_types(expected["body"])


# --- contract: queue and interrupt ----------------------------------------------------------


def test_queue_empty(server: Target) -> None:
    case = recorded("queue_empty")
    response = server.get("/queue")
    assert response.status_code == case["response"]["status"]
    assert response.json() == case["response"]["body"]


def _without_extra_data(queue: dict[str, Any]) -> dict[str, Any]:
    """A fork-shaped queue without ``extra_data``, whose keys depend on the request."""
    return {part: [{k: v for k, v in item.items() if k != "extra_data"} for item in items]
            for part, items in queue.items()}


def test_queue_running_pending_delete_and_clear(server: Target) -> None:
    shapes = recorded("queue_running_and_pending")["response"]["body"]
    running = server.submit(graph_slow("qa"), slow=True, client_id="contract")["prompt_id"]
    server.wait_running(running)
    pending = [server.submit(graph_slow("qx"), slow=True)["prompt_id"] for _ in range(3)]
    pending.append(server.submit(graph_slow("qd"), slow=True, front=True)["prompt_id"])
    queue = server.get("/queue").json()
    assert [item_id(i) for i in queue["queue_running"]] == [running]
    assert sorted(item_id(i) for i in queue["queue_pending"]) == sorted(pending)
    if isinstance(queue["queue_running"][0], dict):  # the recorded fork's shape
        assert_same_shape(_without_extra_data(shapes), _without_extra_data(queue))
        assert all("create_time" in i["extra_data"]
                   for i in queue["queue_running"] + queue["queue_pending"])

    delete = server.post("/queue", json={"delete": [pending[0], "no-such-id", running]})
    expected = recorded("queue_delete")["delete_call"]["response"]
    assert (delete.status_code, delete.text) == (expected["status"], expected["body"])
    queue = server.get("/queue").json()
    assert [item_id(i) for i in queue["queue_running"]] == [running]
    assert sorted(item_id(i) for i in queue["queue_pending"]) == sorted(pending[1:])

    clear = server.post("/queue", json={"clear": True})
    expected = recorded("queue_clear")["clear_call"]["response"]
    assert (clear.status_code, clear.text) == (expected["status"], expected["body"])
    assert server.get("/queue").json()["queue_pending"] == []
    assert all(server.history(p) == {} for p in pending)


def test_interrupt_with_prompt_id_only_stops_that_prompt(server: Target) -> None:
    case = recorded("interrupt_with_prompt_id")
    listener = server.listen("contract-int")
    running = server.submit(graph_slow("int"), slow=True, client_id="contract-int")["prompt_id"]
    waiting = server.submit(graph_basic("int2"), client_id="contract-int")["prompt_id"]
    listener.until(lambda m: m["type"] == "executing" and m["data"].get("node") is not None)
    missed = server.post("/interrupt", json={"prompt_id": waiting})
    assert (missed.status_code, missed.text) == (200, "")
    assert [item_id(i) for i in server.get("/queue").json()["queue_running"]] == [running]

    hit = server.post("/interrupt", json={"prompt_id": running})
    assert (hit.status_code, hit.text) == (200, "")
    listener.until_executing(running, None)
    terminal = next(m for m in listener.messages if m["type"] == "execution_interrupted")
    assert_same_shape(case["terminal_ws_msg"], terminal)
    entry = as_recorded(server.wait_done(running))
    assert_same_shape(case["history_interrupted"][next(iter(case["history_interrupted"]))],
                      entry)
    assert entry["status"]["messages"][-1] == "execution_interrupted"
    assert server.wait_done(waiting)["status"]["status_str"] == "success"
    listener.close()


def test_interrupt_without_body_stops_whatever_runs(server: Target) -> None:
    case = recorded("interrupt_global_no_body")
    running = server.submit(graph_slow("int3"), slow=True, client_id="contract")["prompt_id"]
    server.wait_running(running)
    response = server.post("/interrupt")
    assert (response.status_code, response.text) == (200, "")
    entry = as_recorded(server.wait_done(running))
    assert_same_shape(next(iter(case["history"].values())), entry)


def test_interrupt_when_idle_is_harmless(server: Target) -> None:
    case = recorded("interrupt_when_idle")
    response = server.post("/interrupt", json={})
    assert (response.status_code, response.text) == (case["response"]["status"], "")
    prompt_id = server.submit(graph_basic())["prompt_id"]
    assert server.wait_done(prompt_id)["status"]["status_str"] == "success"


# --- contract: history ----------------------------------------------------------------------


def test_history_of_a_success(server: Target) -> None:
    case = recorded("history_success")
    prompt_id = server.submit(graph_basic(), client_id="contract")["prompt_id"]
    server.wait_done(prompt_id)
    response = server.get(f"/history/{prompt_id}")
    assert response.status_code == case["response"]["status"]
    entry = as_recorded(response.json()[prompt_id])
    assert_same_shape(next(iter(case["response"]["body"].values())), entry)
    assert entry["status"] == {"status_str": "success", "completed": True,
                               "messages": ["execution_start", "execution_cached",
                                            "execution_success"]}


def test_history_of_an_unknown_id_is_empty(server: Target) -> None:
    case = recorded("history_unknown_id")
    response = server.get("/history/no-such-prompt")
    assert (response.status_code, response.json()) == (200, case["response"]["body"])


def test_history_pages_delete_and_clear(server: Target) -> None:
    ids = [server.submit(graph_basic("page"))["prompt_id"] for _ in range(3)]
    for prompt_id in ids:
        server.wait_done(prompt_id)
    keys = list(server.get("/history").json())
    assert keys[-3:] == ids
    assert list(server.get("/history", max_items=2).json()) == keys[-2:]
    assert list(server.get("/history", max_items=2, offset=1).json()) == keys[1:3]

    deleted = server.post("/history", json={"delete": [ids[0]]})
    assert (deleted.status_code, deleted.text) == (recorded("history_delete")["response"]
                                                   ["status"], "")
    assert server.history(ids[0]) == {} and ids[1] in server.history(ids[1])
    cleared = server.post("/history", json={"clear": True})
    assert (cleared.status_code, cleared.text) == (200, "")
    assert server.get("/history").json() == recorded("history_clear")["history_after"]


def test_history_of_an_execution_error(server: Target) -> None:
    case = recorded("history_execution_error")
    assert server.upload("corrupt.png", b"this is not an image").status_code == 200
    prompt_id = server.submit(graph_load_image("corrupt.png"), client_id="contract")["prompt_id"]
    entry = as_recorded(server.wait_done(prompt_id))
    assert_same_shape(next(iter(case["response"]["body"].values())), entry)
    assert entry["status"]["messages"][-1].startswith("execution_error: cannot identify image")


@pytest.mark.parametrize(("graph", "case_name"), [(graph_video, "history_video_output"),
                                                  (graph_webp, "history_animated_webp_output")])
def test_history_of_animated_outputs(server: Target, graph: Callable[[], dict[str, Any]],
                                     case_name: str) -> None:
    case = recorded(case_name)
    expected = (case["history_entry_outputs"] if "history_entry_outputs" in case
                else next(iter(case.values()))["outputs"])
    prompt_id = server.submit(graph(), client_id="contract")["prompt_id"]
    outputs = server.wait_done(prompt_id)["outputs"]
    assert_same_shape(expected, outputs)
    node = next(iter(outputs.values()))
    assert node["animated"] == [True]
    assert node["images"][0]["subfolder"] == next(iter(expected.values()))["images"][0]["subfolder"]


# --- contract: files ------------------------------------------------------------------------


def _view(server: Target, image: dict[str, Any]) -> requests.Response:
    return server.get("/view", filename=image["filename"], subfolder=image["subfolder"],
                      type=image["type"])


def test_view_serves_outputs(server: Target) -> None:
    png = recorded("view_output_png")["response"]
    prompt_id = server.submit(graph_basic())["prompt_id"]
    image = server.wait_done(prompt_id)["outputs"]["2"]["images"][0]
    response = _view(server, image)
    assert response.status_code == png["status"]
    assert response.headers["Content-Type"] == png["content_type"]
    assert response.headers["Content-Disposition"] == f'filename="{image["filename"]}"'
    assert response.content.startswith(bytes.fromhex(png["body"]["_first_bytes_hex"][:16]))

    video = recorded("view_output_video_subfolder")["response"]
    prompt_id = server.submit(graph_video())["prompt_id"]
    response = _view(server, server.wait_done(prompt_id)["outputs"]["3"]["images"][0])
    assert response.headers["Content-Type"] == video["content_type"]
    assert response.content[4:8] == b"ftyp"


@pytest.mark.parametrize("case_name", ["view_missing_file", "view_path_traversal"])
def test_view_refuses_missing_and_escaping_paths(server: Target, case_name: str) -> None:
    case = recorded(case_name)
    url = urlparse(case["request"]["url"])
    response = requests.get(f"{server.url}{url.path}?{url.query}", timeout=server.timeout)
    assert (response.status_code, response.content) == (case["response"]["status"], b"")


def test_upload_feeds_load_image(server: Target) -> None:
    case = recorded("upload_image")
    response = server.upload("red.png", tiny_png(rgb=(255, 0, 0)))
    assert response.status_code == case["response"]["status"]
    assert response.json() == case["response"]["body"]
    info = server.get("/object_info/LoadImage").json()
    assert "red.png" in info["LoadImage"]["input"]["required"]["image"][0]
    prompt_id = server.submit(graph_load_image("red.png"))["prompt_id"]
    assert server.wait_done(prompt_id)["status"]["status_str"] == "success"


# --- contract: server information -----------------------------------------------------------


@pytest.mark.parametrize(("case_name", "method"), [
    ("system_stats", "GET"), ("object_info_SaveImage", "GET"), ("object_info_unknown_node", "GET"),
    ("get_prompt_queue_remaining", "GET"), ("get_features", "GET"), ("free", "POST"),
])
def test_information_endpoints(server: Target, case_name: str, method: str) -> None:
    case = recorded(case_name)
    path = urlparse(case["request"]["url"]).path
    response = requests.request(method, server.url + path, json=case["request"].get("json"),
                                timeout=server.timeout)
    assert response.status_code == case["response"]["status"]
    if case["response"]["body"] == "":
        assert response.text == ""
    else:
        assert_same_shape(case["response"]["body"], response.json())


def test_object_info_lists_every_node_class(server: Target) -> None:
    info = server.get("/object_info").json()
    assert {"SaveImage", "EmptyImage", "LoadLatent", "SaveVideo"} <= set(info)
    assert info["SaveImage"] == recorded("object_info_SaveImage")["response"]["body"]["SaveImage"]


# --- contract: websocket --------------------------------------------------------------------


def _types(messages: list[dict[str, Any]]) -> list[str]:
    return [m["type"] for m in messages]


def _assert_messages_like(recorded_messages: list[dict[str, Any]],
                          actual: list[dict[str, Any]]) -> None:
    """Each message type's data has the recorded shape (first occurrence of each type)."""
    firsts = {}
    for message in reversed(recorded_messages):
        firsts[message["type"]] = message
    for kind, message in firsts.items():
        assert_same_shape(message["data"], next(m for m in actual if m["type"] == kind)["data"])


def test_ws_connect_sends_status_with_sid(server: Target) -> None:
    case = recorded("ws_connect_initial_messages")
    listener = server.listen("contract-connect")
    first = listener.until(lambda m: True)
    assert_same_shape(case["messages"][0]["msg"], first)
    assert first["data"]["sid"] == "contract-connect"
    listener.close()


@pytest.mark.parametrize(("case_name", "graph"), [
    ("ws_sequence_success", graph_basic),
    ("ws_sequence_slow_multinode", graph_slow),
    ("ws_sequence_execution_error", lambda: graph_load_image("corrupt.png")),
])
def test_ws_sequence(server: Target, case_name: str,
                     graph: Callable[[], dict[str, Any]]) -> None:
    case = recorded(case_name)
    server.upload("corrupt.png", b"this is not an image")
    listener = server.listen("contract-seq")
    prompt_id = server.submit(graph(), client_id="contract-seq")["prompt_id"]
    listener.until_executing(prompt_id, None)
    assert server.history(prompt_id), "history is written before executing {node: null}"
    recorded_messages = [m["msg"] for m in case["messages"]]
    window = listener.window(prompt_id)
    assert _types(window) == _types(recorded_messages)
    _assert_messages_like(recorded_messages, window)
    listener.close()


def _skeleton(messages: list[dict[str, Any]]) -> list[str]:
    """Types without heartbeats (progress, progress_state, status before the end), de-duplicated."""
    types = _types(messages)
    end = max(i for i, t in enumerate(types) if t.startswith("execution_") and t not in (
        "execution_start", "execution_cached"))
    kept = [t for i, t in enumerate(types)
            if i >= end or t not in ("progress", "progress_state", "status")]
    return [t for i, t in enumerate(kept) if i == 0 or t != kept[i - 1]]


def test_ws_sequence_interrupted(server: Target) -> None:
    case = recorded("interrupt_with_prompt_id")
    listener = server.listen("contract-int-seq")
    prompt_id = server.submit(graph_slow("int"), slow=True, client_id="contract-int-seq")
    listener.until(lambda m: m["type"] == "executing" and m["data"].get("node") is not None)
    server.post("/interrupt", json={"prompt_id": prompt_id["prompt_id"]})
    listener.until_executing(prompt_id["prompt_id"], None)
    recorded_messages = [m["msg"] for m in case["ws_messages_interrupted_prompt"]]
    window = listener.window(prompt_id["prompt_id"])
    assert _skeleton(window) == _skeleton(recorded_messages)
    _assert_messages_like(recorded_messages, window)
    listener.close()


def test_ws_progress_of_nodes_with_a_progress_bar(server: Target) -> None:
    case = recorded("ws_sequence_with_progress_upscale")
    recorded_messages = [m["msg"] for m in case["messages"]]
    listener = server.listen("contract-progress")
    prompt_id = server.submit(graph_upscale(), client_id="contract-progress")["prompt_id"]
    listener.until_executing(prompt_id, None)
    window = listener.window(prompt_id)
    progress = [m for m in window if m["type"] == "progress"]
    assert {m["data"]["node"] for m in progress} == {"3"}
    assert [m["data"]["value"] for m in progress] == list(range(1, len(progress) + 1))
    assert _skeleton(window) == _skeleton(recorded_messages)
    assert_same_shape(next(m for m in recorded_messages if m["type"] == "progress"), progress[0])
    listener.close()


def test_ws_messages_go_only_to_the_submitting_client(server: Target) -> None:
    case = recorded("ws_client_id_routing_and_history_race")
    mine, other = server.listen("contract-mine"), server.listen("contract-other")
    prompt_id = server.submit(graph_basic(), client_id="contract-mine")["prompt_id"]
    mine.until_executing(prompt_id, None)
    anonymous = server.submit(graph_basic())["prompt_id"]
    server.wait_done(anonymous)
    markers = {listener: server.submit(graph_basic(), client_id=name)["prompt_id"]
               for listener, name in ((mine, "contract-mine"), (other, "contract-other"))}
    for listener, marker in markers.items():
        listener.until_executing(marker, None)
    before_marker = other.messages[: other.messages.index(other.window(markers[other])[0])]
    allowed = {seen[0] for seen in case["prompt_without_client_id"]["messages_to_other_listener"]}
    assert set(_types(before_marker)) <= allowed
    assert not [m for m in before_marker if m["data"].get("prompt_id") == prompt_id]
    assert not [m for m in mine.messages + other.messages
                if m["type"].startswith("execution_") and m["data"]["prompt_id"] == anonymous]
    mine.close()
    other.close()


# --- simulator only: the execution ledger and ordering ---------------------------------------


def _tagged(kind: str, model: str | None = None, job_id: str | None = None) -> dict[str, Any]:
    tag = {"kind": kind, "job_id": job_id or f"b0001/{kind[0]}1"}
    if model:
        tag["model"] = model
    return {"comfy_dual": tag}


def test_counts_executions_per_prompt_id(sim: SimulatorHandle) -> None:
    target = sim_target(sim)
    first = target.submit(graph_basic(), prompt_id="A")["prompt_id"]
    target.wait_done(first)
    target.submit(graph_basic(), prompt_id="B")
    target.submit(graph_basic(), prompt_id="A")
    wait_for(lambda: sim.counts() == {"A": 2, "B": 1}
             and all(e["status"] == "success" for e in sim.executions()), "three runs", 10)
    listed = target.get("/debug/executions").json()
    assert listed["counts"] == {"A": 2, "B": 1}
    assert [e["prompt_id"] for e in listed["executions"]] == ["A", "B", "A"]


def _start_hung(sim: SimulatorHandle, target: Target) -> str:
    """A prompt that runs until interrupted; later prompts run normally."""
    sim.set_faults(hang=True)
    prompt_id = target.submit(graph_basic())["prompt_id"]
    target.wait_running(prompt_id)
    sim.set_faults(hang=False)
    return prompt_id


def test_one_job_at_a_time_in_number_order(sim: SimulatorHandle) -> None:
    target = sim_target(sim)
    hung = _start_hung(sim, target)
    b = target.submit(graph_basic(), prompt_id="B")
    late = target.submit(graph_basic(), prompt_id="LATE", number=100)
    c = target.submit(graph_basic(), prompt_id="C")
    early = target.submit(graph_basic(), prompt_id="EARLY", number=-5.5)
    d = target.submit(graph_basic(), prompt_id="D", front=True)
    assert (b["number"], c["number"], d["number"]) == (1, 2, -3)
    assert (late["number"], early["number"]) == (100.0, -5.5)
    target.post("/interrupt")
    target.wait_done("LATE")
    runs = sim.executions()
    assert [r["prompt_id"] for r in runs] == [hung, "EARLY", "D", "B", "C", "LATE"]
    assert [r["status"] for r in runs] == ["interrupted"] + ["success"] * 5
    assert all(a["end"] <= b["start"] for a, b in itertools.pairwise(runs))


def test_duplicate_prompt_id_while_running_runs_twice(sim: SimulatorHandle) -> None:
    target = sim_target(sim)
    sim.set_faults(hang=True)
    target.submit(graph_basic(), prompt_id="dup-id-X")
    target.wait_running("dup-id-X")
    sim.set_faults(hang=False)
    target.submit(graph_basic("dupB"), prompt_id="dup-id-X")
    queue = target.get("/queue").json()
    assert [item_id(i) for i in queue["queue_running"] + queue["queue_pending"]] == [
        "dup-id-X", "dup-id-X"]
    target.post("/interrupt", json={"prompt_id": "dup-id-X"})
    wait_for(lambda: [e["status"] for e in sim.executions()] == ["interrupted", "success"],
             "the second run", 10)
    assert sim.counts() == {"dup-id-X": 2}
    assert target.wait_done("dup-id-X")["status"]["status_str"] == "success"


def test_durations_kinds_and_switch_cost(tmp_path: Path) -> None:
    config = SimConfig(durations={"HIGH": 0.03, "LOW": 0.01}, default_duration=0.0,
                       switch_cost=0.02)
    with start_simulator(config=config, output_dir=tmp_path) as handle:
        target = sim_target(handle)
        jobs = [("HIGH", "wan-high"), ("HIGH", "wan-high"), ("LOW", "wan-low"), ("LOW", None),
                ("HIGH", "wan-high")]
        ids = [target.submit(graph_basic(), extra_data=_tagged(kind, model, f"b1/{i}"))["prompt_id"]
               for i, (kind, model) in enumerate(jobs)]
        target.wait_done(ids[-1])
        runs = handle.executions()
    assert [(r["kind"], r["model"], r["job_id"]) for r in runs] == [
        ("HIGH", "wan-high", "b1/0"), ("HIGH", "wan-high", "b1/1"), ("LOW", "wan-low", "b1/2"),
        ("LOW", "LOW", "b1/3"), ("HIGH", "wan-high", "b1/4")]
    assert [r["switch_cost"] for r in runs] == [0.02, 0.0, 0.02, 0.02, 0.02]


def test_progress_nodes_are_configurable(tmp_path: Path) -> None:
    config = SimConfig(default_duration=0.02, progress_nodes=frozenset({"ImageBlur"}),
                       progress_steps=3)
    with start_simulator(config=config, output_dir=tmp_path) as handle:
        listener = sim_target(handle).listen("progress")
        prompt_id = sim_target(handle).submit(graph_slow(), client_id="progress")["prompt_id"]
        listener.until_executing(prompt_id, None)
        listener.close()
    progress = [(m["data"]["node"], m["data"]["value"], m["data"]["max"])
                for m in listener.messages if m["type"] == "progress"]
    assert progress == [("2", 1, 3), ("2", 2, 3), ("2", 3, 3)]


def test_upstream_flavour_queue_arrays_and_history_pairs(sim: SimulatorHandle) -> None:
    target = sim_target(sim)
    hung = _start_hung(sim, target)
    pending = target.submit(graph_basic(), extra_data={"my_tag": "abc"})["prompt_id"]
    queue = target.get("/queue").json()
    number, prompt_id, graph, extra, outputs = queue["queue_pending"][0]
    assert (number, prompt_id, outputs, extra["my_tag"]) == (1, pending, ["2"], "abc")
    assert queue["queue_running"][0][1] == hung and graph["2"]["class_type"] == "SaveImage"
    target.post("/interrupt")
    messages = target.wait_done(pending)["status"]["messages"]
    assert [m[0] for m in messages] == ["execution_start", "execution_cached", "execution_success"]
    assert messages[0][1]["prompt_id"] == pending


def test_partly_valid_prompt_runs_its_good_outputs(sim: SimulatorHandle) -> None:
    target = sim_target(sim)
    graph = graph_basic()
    graph["3"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "broken"}}
    body = target.submit(graph)
    assert body["node_errors"]["3"]["errors"][0]["type"] == "required_input_missing"
    entry = target.wait_done(body["prompt_id"])
    assert entry["prompt"][4] == ["2"] and list(entry["outputs"]) == ["2"]


# --- simulator only: files -------------------------------------------------------------------


def test_latents_flow_through_the_input_directory(sim: SimulatorHandle) -> None:
    target = sim_target(sim)
    load = {"1": {"class_type": "LoadLatent", "inputs": {"latent": "chunk1.latent"}},
            "2": {"class_type": "SaveLatent",
                  "inputs": {"samples": ["1", 0], "filename_prefix": "latents/chunk2"}}}
    refused = target.post("/prompt", json={"prompt": load}).json()
    assert refused["node_errors"]["1"]["errors"][0]["details"] == (
        "latent - Invalid latent file: chunk1.latent")
    (sim.input_dir / "chunk1.latent").write_bytes(tiny_latent())
    assert "chunk1.latent" in target.get("/object_info/LoadLatent").json()[
        "LoadLatent"]["input"]["required"]["latent"][0]
    outputs = target.wait_done(target.submit(load)["prompt_id"])["outputs"]
    assert outputs == {"2": {"latents": [{"filename": "chunk2_00001_.latent",
                                          "subfolder": "latents", "type": "output"}]}}
    assert (sim.output_dir / "latents" / "chunk2_00001_.latent").read_bytes() == tiny_latent()


def test_upload_without_overwrite_renames_a_different_file(sim: SimulatorHandle) -> None:
    target = sim_target(sim)
    first = target.upload("red.png", tiny_png(), overwrite="false", subfolder="s").json()
    same = target.upload("red.png", tiny_png(), overwrite="false", subfolder="s").json()
    other = target.upload("red.png", tiny_png(rgb=(1, 2, 3)), overwrite="false",
                          subfolder="s").json()
    assert [first["name"], same["name"], other["name"]] == ["red.png", "red.png", "red (1).png"]
    assert (sim.input_dir / "s" / "red (1).png").is_file()
    assert target.upload("x.png", b"x", subfolder="../../etc").status_code == 400


def test_prefix_outside_the_output_directory_is_an_execution_error(sim: SimulatorHandle) -> None:
    target = sim_target(sim)
    prompt_id = target.submit(graph_basic("../escape"))["prompt_id"]
    assert target.wait_done(prompt_id)["status"]["status_str"] == "error"


# --- simulator only: crashes and faults ------------------------------------------------------


def test_kill_and_restart_forget_queue_and_history_but_keep_files(sim: SimulatorHandle) -> None:
    case = recorded("restart_after_sigkill")
    target = sim_target(sim)
    done = target.submit(graph_basic("beforekill"))["prompt_id"]
    target.wait_done(done)
    listener = target.listen("crash")
    running = _start_hung(sim, target)
    target.submit(graph_basic())
    port = sim.port
    sim.kill()
    with pytest.raises((websocket.WebSocketException, ConnectionError, OSError)):
        listener.until(lambda m: False)
    with pytest.raises(requests.ConnectionError):
        target.get("/queue")
    sim.restart()
    assert sim.port == port
    assert target.get("/queue").json() == case["queue_after_restart"]
    assert target.history(done) == target.history(running) == {}
    body = target.submit(graph_basic("beforekill"))
    assert body["number"] == case["first_post_after_restart"]["number"]
    outputs = target.wait_done(body["prompt_id"])["outputs"]
    assert outputs["2"]["images"][0]["filename"] == "beforekill_00002_.png"
    assert (sim.output_dir / "beforekill_00001_.png").is_file()
    assert [e["status"] for e in sim.executions()] == ["success", "lost", "success"]


def test_fail_rate_makes_execution_errors(sim: SimulatorHandle) -> None:
    target = sim_target(sim)
    sim.set_faults(fail_rate=1.0)
    listener = target.listen("faulty")
    prompt_id = target.submit(graph_basic(), client_id="faulty")["prompt_id"]
    listener.until_executing(prompt_id, None)
    error = next(m for m in listener.messages if m["type"] == "execution_error")["data"]
    assert (error["node_type"], error["exception_type"]) == ("SaveImage", "SimulatedFailure")
    entry = target.wait_done(prompt_id)
    assert entry["status"]["status_str"] == "error" and entry["outputs"] == {}
    assert sim.executions()[0]["status"] == "error"
    listener.close()


def test_hang_lasts_until_interrupted(sim: SimulatorHandle) -> None:
    target = sim_target(sim)
    listener = target.listen("hang")
    sim.set_faults(hang=True)
    prompt_id = target.submit(graph_basic(), client_id="hang")["prompt_id"]
    listener.until(lambda m: m["type"] == "executing")
    assert target.history(prompt_id) == {}
    assert sim.executions()[0]["status"] == "running"
    target.post("/interrupt", json={"prompt_id": prompt_id})
    listener.until_executing(prompt_id, None)
    assert target.history(prompt_id)[prompt_id]["status"]["status_str"] == "error"
    listener.close()


def test_http_500_and_response_delay_over_the_debug_endpoint(sim: SimulatorHandle) -> None:
    target = sim_target(sim)
    knobs = target.post("/debug/faults", json={"http_500": True}).json()
    assert knobs["http_500"] is True and sim.faults.http_500
    assert target.post("/prompt", json={"prompt": graph_basic()}).status_code == 500
    assert target.get("/queue").status_code == 500
    assert target.post("/queue", json={"clear": True}).status_code == 200
    assert target.get("/debug/executions").status_code == 200
    target.post("/debug/faults", json={"http_500": False, "response_delay": 0.2})
    started = time.monotonic()
    assert target.get("/queue").status_code == 200
    assert time.monotonic() - started >= 0.2
    refused = target.post("/debug/faults", json={"no_such_knob": 1})
    assert refused.status_code == 400 and "no_such_knob" in refused.json()["error"]


def test_fault_knobs_are_checked() -> None:
    with start_simulator() as handle:
        with pytest.raises(BadConfig):
            handle.set_faults(fail_rate=2.0)
        with pytest.raises(BadConfig):
            handle.set_faults(hang="yes")
        assert handle.set_faults(hang_rate=0.5).hang_rate == 0.5
    with pytest.raises(BadConfig):
        SimConfig(queue_item_shape="tuple")  # type: ignore[arg-type]


def test_process_mode_listens_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "simulator", "--port", "0", "--duration",
               "HIGH=0.01", "--switch-cost", "0", "--output-dir", str(tmp_path)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline() if process.stdout else ""
        url = line.rsplit(" ", 1)[-1].strip()
        assert url.startswith("http://127.0.0.1:")
        target = Target(url)
        prompt_id = target.submit(graph_basic(), extra_data=_tagged("HIGH"))["prompt_id"]
        target.wait_done(prompt_id)
        assert target.get("/debug/executions").json()["counts"] == {prompt_id: 1}
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.wait()
