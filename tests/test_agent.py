"""The instance agent follows its prompts over the websocket: a run seen from its start is
reported as the stream told it, without asking ``/history``; any other run is looked up."""

from __future__ import annotations

import queue
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pytest
from support import wait_for

from instances.agent import InstanceAgent
from instances.client import JobOutcome, QueueSnapshot, StreamEvent
from instances.messages import Finished, Health
from simulator import SimConfig, start_simulator

M = TypeVar("M")

GRAPH = {"1": {"class_type": "EmptyImage",
               "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 7}},
         "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                     "filename_prefix": "t/agent"}}}
OUTPUT = {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}
STARTED = StreamEvent("started", "p", {})
EXECUTED = StreamEvent("executed", "p", {"node": "2", "output": OUTPUT})
ENDED = [StreamEvent("success", "p", {}), StreamEvent("finished", "p", {})]


@dataclass(frozen=True)
class Server:
    instance_id: str
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _agent(port: int, post: Callable[[object], None]) -> InstanceAgent:
    """Health checks and polling far apart: only the stream (and what it falls back on)
    asks about prompts."""
    return InstanceAgent(Server("s", "127.0.0.1", port), post, health_interval=60,
                         probe_backoff_max=1, connect_timeout=1, read_timeout=5,
                         poll_interval=60)


def _drain(inbox: queue.SimpleQueue[object]) -> list[object]:
    messages = []
    while not inbox.empty():
        messages.append(inbox.get())
    return messages


def _next(inbox: queue.SimpleQueue[object], kind: type[M]) -> M:
    return wait_for(lambda: next((m for m in _drain(inbox) if isinstance(m, kind)), None),
                    kind.__name__, timeout=10)


def test_a_run_followed_from_its_start_is_reported_without_a_history_lookup(
        monkeypatch: pytest.MonkeyPatch) -> None:
    inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
    prompt_id, looked_up = str(uuid.uuid4()), []
    with start_simulator(0, SimConfig(default_duration=0.0)) as sim:
        agent = _agent(sim.port, inbox.put)
        history = agent.client.history
        monkeypatch.setattr(agent.client, "history", lambda p: looked_up.append(p))
        agent.start()
        try:
            assert _next(inbox, Health).up
            wait_for(lambda: agent.follower.stream.connected, "the websocket")
            agent.submit("job-1", prompt_id, GRAPH, {})
            finished = _next(inbox, Finished)
        finally:
            agent.stop()
        assert finished.prompt_id == prompt_id and looked_up == []
        assert finished.outcome.status == "success"
        assert finished.outcome == history(prompt_id)  # just what the server's history says


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch
            ) -> Iterator[tuple[InstanceAgent, queue.SimpleQueue[object], list[str]]]:
    """An agent of a server that is not there, fed stream events by hand; its ``/history``
    lookups are noted instead of made."""
    inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
    agent = _agent(9, inbox.put)
    looked_up: list[str] = []
    monkeypatch.setattr(agent.follower, "finish_from_history", looked_up.append)
    agent.start()
    try:
        yield agent, inbox, looked_up
    finally:
        agent.stop()


def test_a_run_seen_from_its_start_is_reported_as_streamed(offline) -> None:
    agent, inbox, looked_up = offline
    agent.following.follow("job", "p")
    for event in [STARTED, EXECUTED, *ENDED]:
        agent.follower.on_event(event)
    finished = [m for m in _drain(inbox) if isinstance(m, Finished)]
    assert finished == [Finished("s", "p", JobOutcome("success", {"2": OUTPUT}, None))]
    assert looked_up == []


@pytest.mark.parametrize("events", [
    [EXECUTED, *ENDED],  # joined after its start
    [STARTED, EXECUTED, StreamEvent("disconnected", None, {}),
     StreamEvent("connected", None, {}), *ENDED],  # messages may have been lost
], ids=["joined-late", "reconnected"])
def test_a_run_the_stream_may_have_missed_parts_of_is_looked_up(offline, events) -> None:
    agent, inbox, looked_up = offline
    agent.following.follow("job", "p")
    for event in events:
        agent.follower.on_event(event)
    wait_for(lambda: looked_up == ["p"], "the /history lookup")
    assert not [m for m in _drain(inbox) if isinstance(m, Finished)]


# --- stopping a prompt -------------------------------------------------------------------

def _short_then(next_duration: float) -> SimConfig:
    return SimConfig(durations={"ENDING": 0.3, "NEXT": next_duration})


def _post(agent: InstanceAgent, kind: str) -> str:
    prompt_id = str(uuid.uuid4())
    agent.client.submit(GRAPH, prompt_id=prompt_id, client_id="tests",
                        extra_data={"comfy_dual": {"kind": kind, "job_id": kind}})
    return prompt_id


@pytest.mark.parametrize("form", ["named", "global"])
def test_a_stop_that_lands_after_its_prompt_ended_leaves_the_next_one_alone(form) -> None:
    """The worst moment to stop a prompt: the agent finds it running, then it ends and the
    next one starts before the interrupt arrives. ComfyUI (and the simulator) apply
    ``{"prompt_id": ...}`` only to that prompt, so the next one runs on; a bodiless
    ``POST /interrupt`` would stop whatever runs then: the next prompt, at its first node.

    The agent's first look at the queue is answered, once the next prompt runs, with what
    the server said while the first one still ran; the next prompt runs long enough for
    the bodiless interrupt to find it whatever the pace of this thread."""
    with start_simulator(config=_short_then(2.0 if form == "named" else 60.0)) as sim:
        agent = _agent(sim.port, lambda message: None)
        agent.start()
        try:
            ending, following = _post(agent, "ENDING"), _post(agent, "NEXT")
            look = agent.client.queue
            stale = [QueueSnapshot((ending,), (following,))]

            def stale_look():  # first, what the server said just before the first one ended
                if stale:
                    wait_for(lambda: look().running == (following,), "the next to start")
                    return stale.pop()
                return look()

            agent.client.queue = stale_look  # type: ignore[method-assign]
            if form == "named":
                agent.withdraw([ending])
            else:  # what the daemon must never send
                assert ending in stale_look().running
                agent.client._request("POST", "/interrupt")
            outcome = wait_for(lambda: agent.client.history(following), "the next one's end")
        finally:
            agent.stop()
        if form == "named":
            assert outcome == JobOutcome("success", outcome.outputs, None)
            assert [r["status"] for r in sim.executions()] == ["success", "success"]
        else:
            assert (outcome.status, outcome.error) == ("interrupted", "interrupted at node 1")
            assert [r["status"] for r in sim.executions()] == ["success", "interrupted"]
