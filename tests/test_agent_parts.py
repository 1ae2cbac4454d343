"""The parts an instance agent is made of, each on its own against a scripted client: what
they report, in which order, and what they leave followed."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from support import wait_for

from instances import fetching
from instances.artifacts import Handoff, OutputFile, TransferFailed, Upload
from instances.client import JobOutcome, QueueSnapshot, StreamEvent
from instances.fetching import OutputFetcher, Tries
from instances.following import Following, Poller
from instances.health import HealthWatch
from instances.messages import (
    Checked,
    Finished,
    Health,
    Posted,
    PostFailed,
    Started,
    Validated,
    Withdrawn,
)
from instances.posting import Poster, Withdrawer
from statemachine.errors import InstanceUnreachable, PermanentDispatchError, ServerError

DONE = JobOutcome("success", {}, None)
FILE = OutputFile("high_001_00001_.latent", "b0001-x")


class Client:
    """Answers as scripted: ``queues`` one snapshot a look (the last one stays),
    ``histories`` an outcome a prompt; ``fail`` is raised by every call while set."""

    def __init__(self, *, queues: list[QueueSnapshot] | None = None,
                 histories: dict[str, JobOutcome] | None = None) -> None:
        self.queues = queues or [QueueSnapshot((), ())]
        self.histories = histories or {}
        self.fail: Exception | None = None
        self.calls: list[tuple[Any, ...]] = []

    def _call(self, *call: Any) -> None:
        self.calls.append(call)
        if self.fail is not None:
            raise self.fail

    def queue(self) -> QueueSnapshot:
        self._call("queue")
        return self.queues.pop(0) if len(self.queues) > 1 else self.queues[0]

    def history(self, prompt_id: str) -> JobOutcome | None:
        self._call("history", prompt_id)
        return self.histories.get(prompt_id)

    def delete_from_queue(self, prompt_ids: Iterable[str]) -> None:
        self._call("delete", *prompt_ids)

    def interrupt(self, prompt_id: str) -> bool:
        self._call("interrupt", prompt_id)
        return True

    def submit(self, graph: Any, *, prompt_id: str, client_id: str, extra_data: Any) -> int:
        self._call("submit", prompt_id)
        return 7

    def upload(self, data: bytes, filename: str, subfolder: str) -> dict[str, Any]:
        self._call("upload", filename)
        return {"name": filename, "subfolder": subfolder}

    def system_stats(self) -> dict[str, Any]:
        self._call("system_stats")
        return {"system": {"comfyui_version": "0.3"}}

    def object_info(self) -> dict[str, Any]:
        self._call("object_info")
        return {}


@pytest.fixture
def no_wait(monkeypatch: pytest.MonkeyPatch) -> Tries:
    monkeypatch.setattr(fetching, "FETCH_RETRY_WAIT", 0.0)
    return Tries(threading.Event())


# --- Following -----------------------------------------------------------------------------


def test_a_prompt_being_posted_is_followed_but_not_polled_and_ends_once() -> None:
    following = Following()
    following.posting("job", "p")
    assert following.track(StreamEvent("started", "p", {}))[0]
    assert following.posted_ones() == [] and following.any_posting(["p"])
    following.posted("p")
    assert following.posted_ones() == [("p", "job")] and not following.any_posting(["p"])
    assert following.end("p") and not following.end("p")
    assert not following.track(StreamEvent("started", "p", {}))[0]


def test_a_reconnection_forgets_what_the_stream_showed() -> None:
    following = Following()
    following.follow("job", "p")
    _, run = following.track(StreamEvent("started", "p", {}))
    assert run is not None and following.track(StreamEvent("progress", "p", {}))[1] is run
    following.track(StreamEvent("connected", None, {}))
    assert following.track(StreamEvent("progress", "p", {})) == (True, None)


# --- Poller ----------------------------------------------------------------------------------


def test_a_poll_reports_each_followed_prompt_as_it_stands() -> None:
    client = Client(queues=[QueueSnapshot(("run",), ())], histories={"done": DONE})
    following, said, trouble = Following(), list[object](), []
    for prompt_id in ("done", "run", "lost"):
        following.follow(f"job-{prompt_id}", prompt_id)
    following.posting("job-new", "new")  # its POST has not returned: left alone
    Poller("s", client, following, said.append, lambda: trouble.append(1)).poll()
    assert said == [Finished("s", "done", DONE), Started("s", "run"),
                    Checked("s", "job-lost", "lost", "gone")]
    assert sorted(following.posted_ones()) == [("run", "job-run")]
    assert ("history", "new") not in client.calls and trouble == []


def test_a_check_follows_a_queued_prompt_and_a_failed_look_is_trouble() -> None:
    client = Client(queues=[QueueSnapshot((), ("p",))])
    following, said, trouble = Following(), list[object](), []
    poller = Poller("s", client, following, said.append, lambda: trouble.append(1))
    poller.check("job", "p")
    assert said == [Checked("s", "job", "p", "queue")]
    assert following.posted_ones() == [("p", "job")]
    client.fail = InstanceUnreachable("refused")
    poller.check("job", "q")
    poller.poll()
    assert len(said) == 1 and trouble == [1, 1]


# --- Poster and Withdrawer -----------------------------------------------------------------


def _handoff(failures: int) -> Handoff:
    tries: list[int] = []

    def fetch() -> bytes:
        tries.append(1)
        if len(tries) <= failures:
            raise InstanceUnreachable("GET /view: reset")
        return b"latent"
    return Handoff(Upload("gpu0", FILE), fetch)


def test_a_post_after_a_transfer_tried_again_is_reported_posted(no_wait: Tries) -> None:
    client, following, said, taken = Client(), Following(), list[object](), threading.Event()
    poster = Poster("s", client, "cid", following, said.append, no_wait, lambda: None)
    poster.submit("job", "p", {}, {}, [_handoff(fetching.FETCH_ATTEMPTS - 1)], taken.set)
    assert taken.is_set() and said == [Posted("s", "job", "p", 7)]
    assert client.calls == [("upload", FILE.filename), ("submit", "p")]
    assert following.posted_ones() == [("p", "job")]


def test_a_failed_post_is_reported_and_forgotten(no_wait: Tries) -> None:
    client, following, said, trouble = Client(), Following(), list[object](), []
    poster = Poster("s", client, "cid", following, said.append, no_wait,
                    lambda: trouble.append(1))
    poster.submit("job", "p", {}, {}, [_handoff(fetching.FETCH_ATTEMPTS)], lambda: None)
    (failed,) = said
    assert isinstance(failed, PostFailed) and isinstance(failed.error, TransferFailed)
    assert trouble == []  # the source's trouble, not this server's
    client.fail = InstanceUnreachable("refused")
    poster.submit("job", "q", {}, {}, [], lambda: None)
    failed = said[-1]
    assert isinstance(failed, PostFailed) and isinstance(failed.error, InstanceUnreachable)
    assert trouble == [1]
    client.fail = ServerError("HTTP 500")
    poster.submit("job", "s", {}, {}, [], lambda: None)
    assert trouble == [1, 1]  # the server's own trouble too
    client.fail = PermanentDispatchError("HTTP 400")
    poster.submit("job", "r", {}, {}, [], lambda: None)
    assert trouble == [1, 1] and following.posted_ones() == []
    assert not following.any_posting(["p", "q", "r", "s"])


def test_a_withdrawal_looks_again_until_the_queue_lets_go() -> None:
    queues = [QueueSnapshot(("a",), ("b", "other")), QueueSnapshot((), ("b",)),
              QueueSnapshot((), ("other",))]
    client, following, said = Client(queues=queues), Following(), list[object]()
    following.posting("job", "c")  # on its way: may arrive after any look
    stopping = threading.Event()
    withdrawer = Withdrawer("s", client, following, said.append, stopping, backoff_max=0.01)
    done = threading.Thread(target=withdrawer.withdraw, args=(("a", "b", "c"),))
    done.start()
    wait_for(lambda: len(client.calls) >= 6, "three looks")
    following.posted("c")
    done.join(timeout=10)
    assert said == [Withdrawn("s", ("a", "b", "c"))] and ("interrupt", "a") in client.calls
    assert ("delete", "b") in client.calls and not any("other" in c for c in client.calls)


# --- HealthWatch and OutputFetcher -----------------------------------------------------------


@pytest.fixture
def watched() -> Iterator[tuple[Client, list[object], list[int], threading.Event]]:
    client, said, polls = Client(), list[object](), []
    client.fail = InstanceUnreachable("refused")
    wake, stopping = threading.Event(), threading.Event()
    watch = HealthWatch("s", "http://gpu0", client, said.append, lambda: polls.append(1),
                        wake=wake, stopping=stopping, workflows=(), health_interval=60,
                        probe_backoff_max=60, poll_interval=0.01)
    watch.start()
    try:
        yield client, said, polls, wake
    finally:
        stopping.set()
        wake.set()
        watch.join(timeout=5)


def test_a_server_that_comes_back_is_validated_then_up_then_polled(watched) -> None:
    client, said, polls, wake = watched
    wait_for(lambda: said, "the first probe")
    assert said == [Health("s", False, "refused")] and polls == []
    client.fail = None
    wake.set()  # what a failed request does: probe now, not after the backoff
    wait_for(lambda: polls, "a poll")
    assert said[1:] == [Validated("s", ()), Health("s", True, "ComfyUI 0.3")]


def test_a_doubted_server_is_probed_at_once_and_reported_even_if_unchanged() -> None:
    """A POST got HTTP 500 and the loop took the server DOWN; the server is well again by
    the probe: it must still be reported UP, or it would stay DOWN for good."""
    client, said = Client(), list[object]()
    wake, stopping = threading.Event(), threading.Event()
    watch = HealthWatch("s", "http://gpu0", client, said.append, lambda: None, wake=wake,
                        stopping=stopping, workflows=(), health_interval=3600,
                        probe_backoff_max=3600, poll_interval=3600)
    watch.start()
    try:
        wait_for(lambda: Health("s", True, "ComfyUI 0.3") in said, "the first probe")
        watch.doubt()
        wait_for(lambda: said.count(Health("s", True, "ComfyUI 0.3")) == 2, "a second UP")
    finally:
        stopping.set()
        wake.set()
        watch.join(timeout=5)


def test_a_finished_video_is_fetched_again_after_a_failure(tmp_path: Path, no_wait: Tries
                                                           ) -> None:
    failures = [InstanceUnreachable("reset")]

    def download(file: OutputFile) -> bytes:
        if failures:
            raise failures.pop()
        return b"video"
    with ThreadPoolExecutor(max_workers=1) as executor:
        fetcher = OutputFetcher("s", download, executor, no_wait)
        fetcher.fetch("b0001", [OutputFile("v.mp4")], tmp_path)
        fetcher.drain(timeout=10)
    assert (tmp_path / "b0001" / "v.mp4").read_bytes() == b"video"
