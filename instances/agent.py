"""One ComfyUI server as the daemon sees it: health probing, checking the workflows
against its node list, posting prompts (after copying in the files they read), following
them over the websocket with ``/history`` polling behind it, stopping them, and fetching
finished videos.

A run the websocket showed from its start is reported as the stream told it (its outputs
are the ones ``/history`` would list); only the others are looked up in ``/history``.

An agent never changes state. It does the network work on its own threads and reports
what it learned as messages (the dataclasses below) through ``post``; the daemon's loop,
the single writer, turns them into events.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import structlog

from instances.artifacts import Handoff, OutputFile, TransferFailed, save_files
from instances.client import ComfyClient, EventStream, JobOutcome, StreamedRun, StreamEvent
from instances.workflow import Workflow
from statemachine.errors import ComfyDualError, InstanceUnreachable

log = structlog.get_logger("comfy_dual.instances")

POLL_INTERVAL = 1.0  # seconds between /history checks of prompts in flight
HISTORY_RACE_RETRIES = 5  # the history entry can trail the "finished" message briefly
FETCH_ATTEMPTS = 3  # tries to fetch a file (a finished video, a job's input) from a server
FETCH_RETRY_WAIT = 1.0  # seconds before the second try, twice that before the third
WITHDRAW_RETRY_WAIT = 0.2  # seconds before looking again at prompts being withdrawn


class InstanceSettings(Protocol):
    instance_id: str
    host: str
    port: int

    @property
    def url(self) -> str: ...


# --- what agents report to the loop --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Health:
    instance_id: str
    up: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Validated:
    """The workflows were checked against the server's ``/object_info`` on (re)connection,
    before its Health(up); ``problems`` is empty when they fit."""

    instance_id: str
    problems: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Posted:
    instance_id: str
    job_id: str
    prompt_id: str
    number: int


@dataclass(frozen=True, slots=True)
class PostFailed:
    instance_id: str
    job_id: str
    prompt_id: str
    error: ComfyDualError


@dataclass(frozen=True, slots=True)
class Started:
    instance_id: str
    prompt_id: str


@dataclass(frozen=True, slots=True)
class Progress:
    instance_id: str
    prompt_id: str
    node: str
    value: int
    max: int


@dataclass(frozen=True, slots=True)
class Finished:
    instance_id: str
    prompt_id: str
    outcome: JobOutcome


@dataclass(frozen=True, slots=True)
class Withdrawn:
    """The server shows none of ``prompt_ids`` queued or running (any more)."""

    instance_id: str
    prompt_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Checked:
    """Where a prompt stands on its server: finished (``outcome``), still queued, or gone
    (in neither history nor queue: never arrived, or the server restarted and forgot it)."""

    instance_id: str
    job_id: str
    prompt_id: str
    where: Literal["history", "running", "queue", "gone"]
    outcome: JobOutcome | None = None


class InstanceAgent:
    """Talks to one server for the loop. ``post`` receives every message."""

    def __init__(self, config: InstanceSettings, post: Callable[[object], None], *,
                 health_interval: float, probe_backoff_max: float,
                 connect_timeout: float, read_timeout: float,
                 poll_interval: float = POLL_INTERVAL,
                 workflows: Sequence[Workflow] = ()) -> None:
        self.config = config
        self.instance_id = config.instance_id
        self._post = post
        self._workflows = tuple(workflows)  # checked against the server's nodes
        self.client = ComfyClient(config.url, connect_timeout=connect_timeout,
                                  read_timeout=read_timeout)
        self.client_id = f"comfy-dual-{uuid.uuid4()}"
        self.stream = EventStream(config.url, self.client_id, self._on_stream,
                                  connect_timeout=connect_timeout)
        self._health_interval = health_interval
        self._probe_backoff_max = probe_backoff_max
        self._poll_interval = poll_interval
        self._http = ThreadPoolExecutor(max_workers=4, thread_name_prefix=config.instance_id)
        self._lock = threading.Lock()
        self._following: dict[str, str] = {}  # prompt_id -> job_id, posted or being posted
        self._streamed: dict[str, StreamedRun] = {}  # followed runs seen from their start
        self._posting: set[str] = set()  # prompts whose POST has not returned yet
        self._fetching: set[futures.Future[None]] = set()  # finished videos being saved
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._monitor = threading.Thread(target=self._watch, daemon=True,
                                         name=f"watch {config.instance_id}")
        self.up: bool | None = None

    # --- life --------------------------------------------------------------------------

    def start(self) -> None:
        self.stream.start()
        self._monitor.start()

    def stop(self) -> None:
        """Stop threads without touching the server's queue: renders there go on and are
        re-attached by the next start."""
        self._stopping.set()
        self._wake.set()
        self.stream.stop()
        self._http.shutdown(wait=False, cancel_futures=True)
        self._monitor.join(timeout=2)
        self.client.close()

    # --- orders from the loop ----------------------------------------------------------

    def submit(self, job_id: str, prompt_id: str, graph: Mapping[str, Any],
               extra_data: Mapping[str, Any], handoffs: Sequence[Handoff] = ()
               ) -> threading.Event:
        """Copy in the files the job reads (``handoffs``), then post it, on an HTTP thread.

        Returns at once with an event set when that thread has taken the job (the loop
        waits for its turn's hand-overs, see ``Dispatcher.hand_over``).
        """
        taken = threading.Event()
        self._http.submit(self._submit, job_id, prompt_id, graph, extra_data, handoffs,
                          taken.set)
        return taken

    def check(self, job_id: str, prompt_id: str) -> None:
        """Find out where ``prompt_id`` stands (after a restart or a reconnection)."""
        self._http.submit(self._check_and_report, job_id, prompt_id)

    def follow(self, job_id: str, prompt_id: str) -> None:
        with self._lock:
            self._following[prompt_id] = job_id

    def forget(self, prompt_id: str) -> None:
        with self._lock:
            self._following.pop(prompt_id, None)
            self._streamed.pop(prompt_id, None)

    def withdraw(self, prompt_ids: Sequence[str]) -> None:
        """Make sure none of ``prompt_ids`` runs here: delete the queued ones, interrupt
        the running one (by its id), and look again, with backoff, until ``/queue`` shows
        none of them; then report ``Withdrawn``. Until the agent stops: a server that
        will not let go of a prompt keeps being asked, and gets no new work meanwhile."""
        ids = tuple(prompt_ids)
        for prompt_id in ids:
            self.forget(prompt_id)
        self._http.submit(self._withdraw, ids)

    def download(self, file: OutputFile) -> bytes:
        """The bytes of a file this server wrote (runs on the caller's thread)."""
        return self.client.view(file.filename, file.subfolder, file.type)

    def fetch_outputs(self, batch_id: str, files: Sequence[OutputFile], outputs_dir: Path
                      ) -> None:
        """Save a finished batch's files under ``outputs_dir/<batch_id>/``."""
        future = self._http.submit(self._fetch_outputs, batch_id, files, outputs_dir)
        with self._lock:
            self._fetching = {f for f in self._fetching if not f.done()} | {future}

    def drain(self, timeout: float) -> None:
        """Wait (up to ``timeout`` seconds) for finished videos still being fetched."""
        with self._lock:
            pending = list(self._fetching)
        futures.wait(pending, timeout=timeout)

    # --- work on the HTTP threads ------------------------------------------------------

    def _submit(self, job_id: str, prompt_id: str, graph: Mapping[str, Any],
                extra_data: Mapping[str, Any], handoffs: Sequence[Handoff],
                taken: Callable[[], None]) -> None:
        taken()
        # Followed before the POST: a short job can start and finish before the POST
        # returns, and its stream messages must not be dropped. The poller leaves it
        # alone until the POST returned (it would take it for lost before it arrived).
        with self._lock:
            self._following[prompt_id] = job_id
            self._posting.add(prompt_id)
        try:
            for handoff in handoffs:
                self._deliver(handoff)
            number = self.client.submit(graph, prompt_id=prompt_id, client_id=self.client_id,
                                        extra_data=extra_data)
        except ComfyDualError as exc:
            self.forget(prompt_id)
            self._post(PostFailed(self.instance_id, job_id, prompt_id, exc))
            if isinstance(exc, InstanceUnreachable):
                self._wake.set()
            return
        finally:
            with self._lock:
                self._posting.discard(prompt_id)
        self._post(Posted(self.instance_id, job_id, prompt_id, number))

    def _deliver(self, handoff: Handoff) -> None:
        """Copy one file in, fetching it FETCH_ATTEMPTS times at most from the server that
        wrote it: that server told on the stream that the job is done, which does not
        prove its HTTP side answers (busy, failing for a while, restarting)."""
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            try:
                handoff.deliver(self.client.upload)
                return
            except TransferFailed:
                if not self._may_retry(attempt):
                    raise

    def _may_retry(self, attempt: int) -> bool:
        """After the failed try number ``attempt`` of a fetch, wait for the next one; False
        if there is none (that was the last try, or the agent is stopping)."""
        return attempt < FETCH_ATTEMPTS and not self._stopping.wait(FETCH_RETRY_WAIT * attempt)

    def _check_and_report(self, job_id: str, prompt_id: str) -> None:
        try:
            checked = self._check(job_id, prompt_id)
        except ComfyDualError as exc:
            log.warning("cannot check prompt", instance=self.instance_id, job=job_id,
                        prompt_id=prompt_id, error=str(exc))
            self._wake.set()
            return
        if checked.where in ("queue", "running"):
            self.follow(job_id, prompt_id)
        self._post(checked)

    def _check(self, job_id: str, prompt_id: str) -> Checked:
        """History, then queue, then history again: a prompt that finishes between the
        first two looks is found by the third instead of being taken for lost."""
        for look in ("history", "queue", "history"):
            if look == "queue":
                queue = self.client.queue()
                if prompt_id in queue.running:
                    return Checked(self.instance_id, job_id, prompt_id, "running")
                if prompt_id in queue.pending:
                    return Checked(self.instance_id, job_id, prompt_id, "queue")
                continue
            outcome = self.client.history(prompt_id)
            if outcome is not None:
                return Checked(self.instance_id, job_id, prompt_id, "history", outcome)
        return Checked(self.instance_id, job_id, prompt_id, "gone")

    def _finish_from_history(self, prompt_id: str) -> None:
        """After the stream said "finished": read the outcome (it may trail a moment)."""
        for attempt in range(HISTORY_RACE_RETRIES):
            try:
                outcome = self.client.history(prompt_id)
            except ComfyDualError:
                return  # the poller will try again
            if outcome is not None:
                self._report_finished(prompt_id, outcome)
                return
            time.sleep(0.05 * (attempt + 1))

    def _report_finished(self, prompt_id: str, outcome: JobOutcome) -> None:
        with self._lock:
            self._streamed.pop(prompt_id, None)
            if self._following.pop(prompt_id, None) is None:
                return  # already reported (stream and poller both saw it)
        self._post(Finished(self.instance_id, prompt_id, outcome))

    def _fetch_outputs(self, batch_id: str, files: Sequence[OutputFile], outputs_dir: Path
                       ) -> None:
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            try:
                saved = save_files(files, self.download, outputs_dir, batch_id)
            except (ComfyDualError, OSError) as exc:
                log.warning("⚠️ could not fetch the finished video", batch=batch_id,
                            instance=self.instance_id, attempt=attempt, error=str(exc),
                            on_server=[f.relative for f in files])
                if not self._may_retry(attempt):
                    return
                continue
            log.info("🎞️ finished video saved", batch=batch_id, files=[str(p) for p in saved])
            return

    def _withdraw(self, prompt_ids: tuple[str, ...]) -> None:
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
            wait = min(wait * 2, self._probe_backoff_max)

    def _withdraw_once(self, prompt_ids: tuple[str, ...]) -> bool:
        """One round; whether any of them may still be on the server (a POST of one of
        them not yet answered counts: it may arrive after the look)."""
        with self._lock:
            posting = any(p in self._posting for p in prompt_ids)
        queue = self.client.queue()
        waiting = [p for p in prompt_ids if p in queue.pending]
        running = [p for p in prompt_ids if p in queue.running]
        self.client.delete_from_queue(waiting)
        for prompt_id in running:
            self.client.interrupt(prompt_id)
        return posting or bool(waiting or running)

    # --- the stream --------------------------------------------------------------------

    def _on_stream(self, event: StreamEvent) -> None:
        ours, run = self._track(event)
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

    def _track(self, event: StreamEvent) -> tuple[bool, StreamedRun | None]:
        """Whether ``event`` is about a prompt followed here, and that prompt's run as
        streamed since its start. A connection that comes or goes forgets every run: what
        was said while it was down is lost."""
        with self._lock:
            if event.prompt_id is None:
                if event.kind in ("connected", "disconnected"):
                    self._streamed.clear()
                return False, None
            if event.prompt_id not in self._following:
                return False, None
            if event.kind == "started":
                self._streamed[event.prompt_id] = StreamedRun()
            return True, self._streamed.get(event.prompt_id)

    def _finished(self, prompt_id: str, run: StreamedRun | None) -> None:
        """The stream said "finished": report the run as it told it, or ask ``/history``
        when it cannot tell (joined the run late, cached nodes)."""
        outcome = run.outcome() if run is not None else None
        if outcome is not None:
            self._report_finished(prompt_id, outcome)
        else:
            self._http.submit(self._finish_from_history, prompt_id)

    # --- health and polling ------------------------------------------------------------

    def _watch(self) -> None:
        failures = 0
        next_probe = 0.0
        while not self._stopping.is_set():
            if time.monotonic() >= next_probe or self._wake.is_set():
                self._wake.clear()
                failures = 0 if self._probe() else failures + 1
                delay = (self._health_interval if failures == 0
                         else min(self._probe_backoff_max, 2 ** (failures - 1)))
                next_probe = time.monotonic() + delay
            if self.up:
                self._poll()
            self._wake.wait(min(self._poll_interval, max(0.0, next_probe - time.monotonic())))

    def _probe(self) -> bool:
        """Health check; on each (re)connection the workflows are checked against the
        server's node list before it is reported up, so nothing is posted to it before."""
        try:
            stats = self.client.system_stats()
            if self.up is not True:
                self._post(Validated(self.instance_id, self._validate()))
        except ComfyDualError as exc:
            self._set_health(False, str(exc))
            return False
        version = stats.get("system", {}).get("comfyui_version", "unknown version")
        self._set_health(True, f"ComfyUI {version}")
        return True

    def _validate(self) -> tuple[str, ...]:
        if not self._workflows:
            return ()
        info = self.client.object_info()
        server = f"{self.instance_id} ({self.config.url})"
        return tuple(p for wf in self._workflows for p in wf.check(info, server=server))

    def _set_health(self, up: bool, detail: str) -> None:
        if up != self.up:
            self.up = up
            self._post(Health(self.instance_id, up, detail))

    def _poll(self) -> None:
        with self._lock:
            following = [(p, j) for p, j in self._following.items() if p not in self._posting]
        for prompt_id, job_id in following:
            try:
                checked = self._check(job_id, prompt_id)
            except ComfyDualError:
                self._wake.set()
                return
            if checked.where == "history":
                self._report_finished(prompt_id, checked.outcome)
            elif checked.where == "running":
                # the stream may have missed "execution_start" (connected late, dropped)
                self._post(Started(self.instance_id, prompt_id))
            elif checked.where == "gone":
                self.forget(prompt_id)
                self._post(checked)
