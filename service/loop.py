"""The single writer: one thread owns the store and the event log.

Agents, timers and the spool only ``post`` messages. Each turn (``run_once(now)``) takes
the messages already received, records what they mean, runs the scheduler, records
dispatch intents, commits once (one fsync), and only then lets the network calls go: a
dispatch intent is durable before its ``POST /prompt`` is sent.

The work is done by parts with one job each, which record events in the store and defer
their effects to the end of the turn: intake (files and commands), the tracker (what the
servers say about jobs), the fleet (instance health and fallback), timeouts, the
dispatcher, the output fetcher, the narrator (log lines) and the status report.
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from instances.messages import (
    Checked,
    Finished,
    Health,
    Posted,
    PostFailed,
    Progress,
    Started,
    Validated,
    Withdrawn,
)
from instances.workflow import Workflow
from service.agents import Agent, Effect
from service.dispatcher import Dispatcher
from service.fleet import Fleet
from service.intake import Intake, SubmitFile
from service.journal import Journal
from service.narrator import Narrator
from service.outputs import VideoFetcher
from service.status import BusyMeter
from service.status_report import Publish, StatusReport
from service.timeouts import Timeouts
from service.tracking import Tracker
from spool.folder import DropFolder
from spool.watcher import SpoolHint
from statedir import StateDir
from statemachine import events as ev
from statemachine import failpoints
from statemachine.job import BATCH_FINAL
from statemachine.plan import JobKind
from statemachine.rules import missing_follow_ups
from statemachine.store import Store

log = structlog.get_logger("comfy_dual.loop")


class Loop:
    """Turns messages into events and ready jobs into dispatches, one turn at a time."""

    def __init__(self, settings: Any, store: Store, agents: Mapping[str, Agent],
                 workflows: Mapping[JobKind, Workflow], *,
                 inbox: queue.SimpleQueue[object] | None = None,
                 status_path: Path | None = None, daemon_info: Mapping[str, Any] | None = None,
                 spool: DropFolder | None = None, commands: Path | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.agents = agents
        self.clock = clock
        self.inbox: queue.SimpleQueue[object] = inbox or queue.SimpleQueue()
        self.outputs_dir = StateDir(settings.state_dir).outputs
        self._effects: list[Effect] = []
        self._received: list[object] = []
        self._resumed = False
        self.journal = Journal(store, settings.snapshot_every)
        start = clock()
        self.status = StatusReport(settings, store, start=start, outputs_dir=self.outputs_dir,
                                   path=status_path, daemon_info=daemon_info)
        self.narrator = Narrator(store)
        self.intake = Intake(settings, store, self.defer, spool=spool, commands=commands)
        self.fleet = Fleet(settings, store, agents, self.defer)
        self.dispatcher = Dispatcher(settings, store, agents, workflows, self.defer)
        self.tracker = Tracker(store, agents, workflows, self.defer,
                               repost=self.dispatcher.post,
                               instance_down=self.fleet.mark_down)
        self.timeouts = Timeouts(settings, store, start)
        self.outputs = VideoFetcher(store, agents, self.outputs_dir, self.defer)
        self._handlers: dict[type, Callable[[Any, float], None]] = {
            Health: self._on_health, Validated: self.fleet.on_validated,
            Withdrawn: self.fleet.on_withdrawn, Posted: self.tracker.on_posted,
            PostFailed: self.tracker.on_post_failed, Started: self.tracker.on_started,
            Progress: self.tracker.on_progress, Finished: self.tracker.on_finished,
            Checked: self.tracker.on_checked, SubmitFile: self.intake.on_file,
            SpoolHint: self.intake.on_spool_hint,
        }

    def post(self, message: object) -> None:
        self.inbox.put(message)

    def wait(self, timeout: float) -> None:
        """Block until a message arrives, ``timeout`` seconds at most."""
        with contextlib.suppress(queue.Empty):
            self._received.append(self.inbox.get(timeout=timeout))

    # --- one turn ------------------------------------------------------------------------

    def run_once(self, now: float) -> bool:
        """One turn over the messages received so far: record, dispatch, commit, then run
        the effects the turn decided, then log what its events mean. True if the turn did
        anything (took a message, recorded an event or ran an effect)."""
        seq = self.store.seq
        try:
            messages = self._take()
            ran = self._turn(messages, now)
        finally:
            self.narrator.flush()
        return bool(messages) or ran or self.store.seq != seq

    def burst(self, *, max_turns: int = 100_000) -> int:
        """Run turns until one does nothing (every reply the agents posted is handled);
        returns the number of turns."""
        for turns in range(1, max_turns + 1):
            if not self.run_once(self.clock()):
                return turns
        raise RuntimeError(f"the loop was still busy after {max_turns} turns")

    def _turn(self, messages: Sequence[object], now: float) -> bool:
        if not self._resumed:
            self._resume(now)
        for message in messages:
            self._handlers[type(message)](message, now)
        self.fleet.stop_if_unfit(self.journal.commit)
        self.fleet.expire(now)
        self.timeouts.expire(now)
        self.fleet.withdraw_abandoned(now)
        if self.log_error is None:
            self.intake.turn(now)
            if self.fleet.started:
                self.dispatcher.dispatch(now)
        if not self.journal.commit():
            self.write_status(now)
            return False  # nothing leaves the process until what caused it is durable
        effects, self._effects = self._effects, []
        if effects:
            failpoints.hit("after_intent")
        for effect in effects:
            effect()
        self.dispatcher.hand_over()
        self.write_status(now)
        self.journal.snapshot_if_due()
        return bool(effects)

    def _take(self) -> list[object]:
        messages, self._received = self._received, []
        while True:
            try:
                messages.append(self.inbox.get_nowait())
            except queue.Empty:
                return messages

    def defer(self, effect: Effect) -> None:
        """Run ``effect`` after this turn's commit (a file move, a reply, a POST)."""
        self._effects.append(effect)

    def _resume(self, now: float) -> None:
        """First turn: record the follow-ups a torn last turn may have left out, and send
        jobs in flight on an instance no longer configured back to ready."""
        self._resumed = True
        for event in missing_follow_ups(self.store):
            self.store.record(event, now)
        for job in list(self.store.in_flight.values()):
            if job.instance_id not in self.agents:
                self.store.record(ev.JobLost(job.job_id, job.flying_prompt_id,
                                             f"{job.instance_id} is no longer configured"),
                                  now)

    def _on_health(self, m: Health, now: float) -> None:
        if self.fleet.heard(m, now):
            self.outputs.instance_up(m.instance_id)
            self.tracker.reconcile(m.instance_id)

    # --- what the daemon and the status page read ------------------------------------

    def write_status(self, now: float, *, force: bool = False) -> None:
        self.status.publish(now, progress=self.tracker.progress, log_error=self.log_error,
                            force=force)

    @property
    def log_error(self) -> str | None:
        """Why the event log cannot be written, if so (dispatch is paused)."""
        return self.journal.error

    @property
    def on_status(self) -> list[Publish]:
        return self.status.on_status

    @property
    def busy(self) -> BusyMeter:
        return self.status.busy

    @property
    def submitted(self) -> dict[int, str | None]:
        return self.intake.submitted

    @property
    def reconciled(self) -> bool:
        """Every instance answered, and every job found in flight on a reachable server
        was looked up."""
        return self.fleet.started and not self.tracker.checking

    def wait_budget(self, now: float, longest: float = 0.5) -> float:
        """How long the next turn may wait for messages."""
        return self.intake.next_turn_in(now, longest)

    def status_line(self) -> str:
        """One line for systemd's STATUS=: batches, jobs and instances that are down."""
        active = sum(1 for _ in self.store.open_batches())
        down = self.fleet.down()
        line = (f"{active} batches active; {len(self.store.ready)} jobs ready, "
                f"{len(self.store.in_flight)} in flight")
        if down:
            line += f"; DOWN: {', '.join(down)}"
        if self.log_error:
            line += "; EVENT LOG NOT WRITABLE"
        return line

    def run_until(self, done: Callable[[], bool], *, stop: Callable[[], bool] = lambda: False
                  ) -> None:
        while not done() and not stop():
            self.wait(0.2)
            self.run_once(self.clock())

    def batches_finished(self, batch_ids: Sequence[str]) -> bool:
        return all(self.store.batches[b].state in BATCH_FINAL for b in batch_ids)
