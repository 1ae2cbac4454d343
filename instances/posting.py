"""Changing what a server's queue holds: posting prompts to it (after copying in the
files they read), and withdrawing them from it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import structlog

from instances.artifacts import Handoff, TransferFailed
from instances.client import QueueSnapshot
from instances.fetching import Tries
from instances.following import Following
from instances.messages import Posted, PostFailed, Withdrawn
from statemachine.errors import ComfyDualError, InstanceTrouble

log = structlog.get_logger("comfy_dual.instances")

WITHDRAW_RETRY_WAIT = 0.2  # seconds before looking again at prompts being withdrawn


class Posts(Protocol):
    """What a Poster asks of a server (``ComfyClient`` has it)."""

    def submit(self, graph: Mapping[str, Any], *, prompt_id: str, client_id: str,
               extra_data: Mapping[str, Any]) -> int: ...
    def upload(self, data: bytes, filename: str, subfolder: str) -> Mapping[str, Any]: ...


class Withdraws(Protocol):
    """What a Withdrawer asks of a server (``ComfyClient`` has it)."""

    def queue(self) -> QueueSnapshot: ...
    def delete_from_queue(self, prompt_ids: Iterable[str]) -> None: ...
    def interrupt(self, prompt_id: str) -> bool: ...


class Poster:
    """Posts one prompt (on the caller's thread, an HTTP one) and reports ``Posted`` or
    ``PostFailed``; tells ``trouble`` when the failure is the server's own
    (``InstanceTrouble``: unreachable, HTTP 5xx), for which the loop takes it DOWN."""

    def __init__(self, instance_id: str, client: Posts, client_id: str,
                 following: Following, post: Callable[[object], None], tries: Tries,
                 trouble: Callable[[], None]) -> None:
        self.instance_id = instance_id
        self._client = client
        self._client_id = client_id  # whose prompts the agent's websocket is told about
        self._following = following
        self._post = post
        self._tries = tries
        self._trouble = trouble

    def submit(self, job_id: str, prompt_id: str, graph: Mapping[str, Any],
               extra_data: Mapping[str, Any], handoffs: Sequence[Handoff],
               taken: Callable[[], None]) -> None:
        """Tell ``taken``, copy in the files the job reads (``handoffs``), post it."""
        taken()
        self._following.posting(job_id, prompt_id)
        try:
            for handoff in handoffs:
                self._deliver(handoff)
            number = self._client.submit(graph, prompt_id=prompt_id,
                                         client_id=self._client_id, extra_data=extra_data)
        except ComfyDualError as exc:
            self._following.forget(prompt_id)
            self._post(PostFailed(self.instance_id, job_id, prompt_id, exc))
            if isinstance(exc, InstanceTrouble):
                self._trouble()
            return
        finally:
            self._following.posted(prompt_id)
        self._post(Posted(self.instance_id, job_id, prompt_id, number))

    def _deliver(self, handoff: Handoff) -> None:
        """Copy one file in, fetching it from the server that wrote it as many times as
        ``Tries`` allows."""
        for attempt in self._tries.attempts():
            try:
                handoff.deliver(self._client.upload)
                return
            except TransferFailed:
                if not self._tries.again(attempt):
                    raise


class Withdrawer:
    """Makes sure prompts do not run on the server (on the caller's thread, an HTTP one):
    deletes the queued ones, interrupts the running one (by its id), and looks again,
    with backoff up to ``backoff_max``, until ``/queue`` shows none of them; then reports
    ``Withdrawn``. Until ``stopping``: a server that will not let go of a prompt keeps
    being asked."""

    def __init__(self, instance_id: str, client: Withdraws, following: Following,
                 post: Callable[[object], None], stopping: threading.Event,
                 backoff_max: float) -> None:
        self.instance_id = instance_id
        self._client = client
        self._following = following
        self._post = post
        self._stopping = stopping
        self._backoff_max = backoff_max

    def withdraw(self, prompt_ids: tuple[str, ...]) -> None:
        wait = WITHDRAW_RETRY_WAIT
        while not self._stopping.is_set():
            try:
                if not self._withdraw_once(prompt_ids):
                    self._post(Withdrawn(self.instance_id, prompt_ids))
                    return
            except ComfyDualError as exc:
                log.warning("⚠️ could not withdraw prompts; trying again",
                            instance=self.instance_id, prompts=len(prompt_ids),
                            error=str(exc), retry_in_s=wait)
            self._stopping.wait(wait)
            wait = min(wait * 2, self._backoff_max)

    def _withdraw_once(self, prompt_ids: tuple[str, ...]) -> bool:
        """One round; whether any of them may still be on the server (a POST of one of
        them not yet answered counts: it may arrive after the look)."""
        posting = self._following.any_posting(prompt_ids)
        queue = self._client.queue()
        waiting = [p for p in prompt_ids if p in queue.pending]
        running = [p for p in prompt_ids if p in queue.running]
        self._client.delete_from_queue(waiting)
        for prompt_id in running:
            self._client.interrupt(prompt_id)
        return posting or bool(waiting or running)
