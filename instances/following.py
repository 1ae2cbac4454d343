"""Following the prompts posted to one server until they end: over the websocket first,
with ``/history`` and ``/queue`` looked up behind it.

A run the websocket showed from its start is reported as the stream told it (its outputs
are the ones ``/history`` would list); only the others are looked up in ``/history``.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import structlog

from instances.client import (
    ComfyClient,
    EventStream,
    JobOutcome,
    QueueSnapshot,
    StreamedRun,
    StreamEvent,
)
from instances.messages import Checked, Finished, Progress, Started
from statemachine.errors import ComfyDualError

log = structlog.get_logger("comfy_dual.instances")

HISTORY_RACE_RETRIES = 5  # the history entry can trail the "finished" message briefly


class Following:
    """The prompts one agent follows, shared by its threads (HTTP, websocket, watch): the
    job of each, those whose POST has not returned yet, and the runs the stream showed
    from their start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, str] = {}  # prompt_id -> job_id, posted or being posted
        self._streamed: dict[str, StreamedRun] = {}  # followed runs seen from their start
        self._posting: set[str] = set()  # prompts whose POST has not returned yet

    def posting(self, job_id: str, prompt_id: str) -> None:
        """Follow a prompt about to be posted. Followed before the POST: a short job can
        start and finish before the POST returns, and its stream messages must not be
        dropped. The poller leaves it alone until ``posted`` (it would take it for lost
        before it arrived)."""
        with self._lock:
            self._jobs[prompt_id] = job_id
            self._posting.add(prompt_id)

    def posted(self, prompt_id: str) -> None:
        """The POST of ``prompt_id`` returned (whatever it answered)."""
        with self._lock:
            self._posting.discard(prompt_id)

    def follow(self, job_id: str, prompt_id: str) -> None:
        with self._lock:
            self._jobs[prompt_id] = job_id

    def forget(self, prompt_id: str) -> None:
        with self._lock:
            self._jobs.pop(prompt_id, None)
            self._streamed.pop(prompt_id, None)

    def end(self, prompt_id: str) -> bool:
        """Forget a prompt that finished; False if it was not followed (any more): its end
        was reported already (the stream and the poller both saw it)."""
        with self._lock:
            self._streamed.pop(prompt_id, None)
            return self._jobs.pop(prompt_id, None) is not None

    def any_posting(self, prompt_ids: Sequence[str]) -> bool:
        with self._lock:
            return any(p in self._posting for p in prompt_ids)

    def posted_ones(self) -> list[tuple[str, str]]:
        """``(prompt_id, job_id)`` of every prompt followed whose POST returned."""
        with self._lock:
            return [(p, j) for p, j in self._jobs.items() if p not in self._posting]

    def track(self, event: StreamEvent) -> tuple[bool, StreamedRun | None]:
        """Whether ``event`` is about a prompt followed here, and that prompt's run as
        streamed since its start. A connection that comes or goes forgets every run: what
        was said while it was down is lost."""
        with self._lock:
            if event.prompt_id is None:
                if event.kind in ("connected", "disconnected"):
                    self._streamed.clear()
                return False, None
            if event.prompt_id not in self._jobs:
                return False, None
            if event.kind == "started":
                self._streamed[event.prompt_id] = StreamedRun()
            return True, self._streamed.get(event.prompt_id)


class StreamFollower:
    """Reads the server's websocket (its own thread) and reports the start, progress and
    end of the prompts followed. ``defer`` runs a lookup on an HTTP thread."""

    def __init__(self, instance_id: str, url: str, client: ComfyClient, following: Following,
                 post: Callable[[object], None], defer: Callable[..., Any], *,
                 connect_timeout: float) -> None:
        self.instance_id = instance_id
        self._client = client
        self._following = following
        self._post = post
        self._defer = defer
        self.client_id = f"comfy-dual-{uuid.uuid4()}"  # the stream tells this id's prompts
        self.stream = EventStream(url, self.client_id, self.on_event,
                                  connect_timeout=connect_timeout)

    def start(self) -> None:
        self.stream.start()

    def stop(self) -> None:
        self.stream.stop()

    def on_event(self, event: StreamEvent) -> None:
        ours, run = self._following.track(event)
        if not ours:
            return
        if run is not None:
            run.add(event)
        prompt_id = str(event.prompt_id)
        if event.kind == "started":
            self._post(Started(self.instance_id, prompt_id))
        elif event.kind == "progress":
            d = event.data
            self._post(Progress(self.instance_id, prompt_id, str(d.get("node")),
                                int(d.get("value") or 0), int(d.get("max") or 0)))
        elif event.kind == "finished":
            self._finished(prompt_id, run)

    def _finished(self, prompt_id: str, run: StreamedRun | None) -> None:
        """The stream said "finished": report the run as it told it, or ask ``/history``
        when it cannot tell (joined the run late, cached nodes)."""
        outcome = run.outcome() if run is not None else None
        if outcome is not None:
            self._report(prompt_id, outcome)
        else:
            self._defer(self.finish_from_history, prompt_id)

    def finish_from_history(self, prompt_id: str) -> None:
        """After the stream said "finished": read the outcome (it may trail a moment)."""
        for attempt in range(HISTORY_RACE_RETRIES):
            try:
                outcome = self._client.history(prompt_id)
            except ComfyDualError:
                return  # the poller will try again
            if outcome is not None:
                self._report(prompt_id, outcome)
                return
            time.sleep(0.05 * (attempt + 1))

    def _report(self, prompt_id: str, outcome: JobOutcome) -> None:
        if self._following.end(prompt_id):
            self._post(Finished(self.instance_id, prompt_id, outcome))


class Looks(Protocol):
    """What a Poller asks of a server (``ComfyClient`` has it)."""

    def history(self, prompt_id: str) -> JobOutcome | None: ...
    def queue(self) -> QueueSnapshot: ...


class Poller:
    """Looks up where prompts stand: one prompt when the loop asks (``check``, after a
    restart or a reconnection), and every prompt followed while the server is up
    (``poll``, behind the stream). ``trouble`` is told when the server does not answer."""

    def __init__(self, instance_id: str, client: Looks, following: Following,
                 post: Callable[[object], None], trouble: Callable[[], None]) -> None:
        self.instance_id = instance_id
        self._client = client
        self._following = following
        self._post = post
        self._trouble = trouble

    def check(self, job_id: str, prompt_id: str) -> None:
        """Report where ``prompt_id`` stands (``Checked``), and follow it if it is still
        to run or running."""
        try:
            checked = self.look(job_id, prompt_id)
        except ComfyDualError as exc:
            log.warning("cannot check prompt", instance=self.instance_id, job=job_id,
                        prompt_id=prompt_id, error=str(exc))
            self._trouble()
            return
        if checked.where in ("queue", "running"):
            self._following.follow(job_id, prompt_id)
        self._post(checked)

    def look(self, job_id: str, prompt_id: str) -> Checked:
        """History, then queue, then history again: a prompt that finishes between the
        first two looks is found by the third instead of being taken for lost."""
        for look in ("history", "queue", "history"):
            if look == "queue":
                queue = self._client.queue()
                if prompt_id in queue.running:
                    return Checked(self.instance_id, job_id, prompt_id, "running")
                if prompt_id in queue.pending:
                    return Checked(self.instance_id, job_id, prompt_id, "queue")
                continue
            outcome = self._client.history(prompt_id)
            if outcome is not None:
                return Checked(self.instance_id, job_id, prompt_id, "history", outcome)
        return Checked(self.instance_id, job_id, prompt_id, "gone")

    def poll(self) -> None:
        """One look at every prompt followed whose POST returned."""
        for prompt_id, job_id in self._following.posted_ones():
            try:
                checked = self.look(job_id, prompt_id)
            except ComfyDualError:
                self._trouble()
                return
            if checked.outcome is not None:  # where is "history": it finished
                if self._following.end(prompt_id):
                    self._post(Finished(self.instance_id, prompt_id, checked.outcome))
            elif checked.where == "running":
                # the stream may have missed "execution_start" (connected late, dropped)
                self._post(Started(self.instance_id, prompt_id))
            elif checked.where == "gone":
                self._following.forget(prompt_id)
                self._post(checked)
