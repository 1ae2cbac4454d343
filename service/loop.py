"""The single writer: one thread owns the store and the event log.

Agents, timers and the spool only ``post`` messages. Each turn of the loop takes the
waiting messages, records what they mean, runs the scheduler, records dispatch intents,
commits once (one fsync), and only then lets the network calls go: a dispatch intent is
durable before its ``POST /prompt`` is sent.
"""

from __future__ import annotations

import hashlib
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from instances.agent import (
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
from instances.artifacts import (
    ArtifactMissing,
    Handoff,
    OutputFile,
    Upload,
    final_files,
    local_path,
    resolve_inputs,
    unwritten_artifacts,
)
from instances.client import JobOutcome
from instances.workflow import Workflow
from service.status import BatchViews, BusyMeter, status_view, write_status_file
from spool.reading import read_prompt_file
from spool.watcher import SpoolHint
from statemachine import events as ev
from statemachine import failpoints
from statemachine.admission import record_file
from statemachine.errors import (
    BadConfig,
    BadInput,
    ComfyDualError,
    InstanceTrouble,
    LogWriteError,
    PermanentDispatchError,
)
from statemachine.job import BATCH_FINAL, Batch, BatchState, Job, JobState
from statemachine.plan import JobKind
from statemachine.rules import cancel_batch, failure_event, retry_batch, settle
from statemachine.scheduler import schedule
from statemachine.store import Store

if TYPE_CHECKING:
    from service.intake import Intake

log = structlog.get_logger("comfy_dual.loop")

STATUS_EVERY = 0.5  # seconds between status.json rewrites
HANDOVER_WAIT = 0.0005  # seconds a turn waits at most for HTTP threads to take its POSTs
JOB_ENDINGS = (ev.JobSucceeded, ev.JobAttemptFailed, ev.JobFailed, ev.JobLost,
               ev.JobCancelled)


def _hand_over(taken: Sequence[threading.Event]) -> None:
    """Wait, HANDOVER_WAIT at most, until HTTP threads have taken this turn's POSTs.

    They need the GIL, which the loop would otherwise keep through its next turn: a POST
    would start only at the loop's next system call (measured: 0.45 ms after the hand-over,
    p50, instead of 0.07 ms). One wait for the turn, not one per POST: the second POST is
    handed over before the first thread has built its request."""
    deadline = time.monotonic() + HANDOVER_WAIT
    for event in taken:
        event.wait(max(0.0, deadline - time.monotonic()))


_PROMPT_IDS = random.Random()  # seeded from the kernel's random source; its own, so that
# nobody's random.seed() makes ids repeat


def new_prompt_id() -> str:
    """A random UUID4 for a dispatch. ``uuid.uuid4`` reads the kernel's random source, a
    system call that lets go of the GIL, and the loop waited ~0.1 ms to get it back under
    load; an id needs to be unique, not unpredictable, so a generator seeded from that
    source when the daemon started does."""
    return str(uuid.UUID(int=_PROMPT_IDS.getrandbits(128), version=4))


@dataclass(frozen=True, slots=True)
class SubmitFile:
    """The ``index``-th prompt file named on the command line, to plan and record as a
    batch (a path named twice is two files)."""

    index: int
    path: Path
    force: bool = False


class Agent(Protocol):
    """What the loop needs of an instance agent (``instances.agent.InstanceAgent``)."""

    instance_id: str

    def submit(self, job_id: str, prompt_id: str, graph: Mapping[str, Any],
               extra_data: Mapping[str, Any], handoffs: Sequence[Handoff] = ()
               ) -> threading.Event | None: ...
    def check(self, job_id: str, prompt_id: str) -> None: ...
    def withdraw(self, prompt_ids: Sequence[str]) -> None: ...
    def download(self, file: OutputFile) -> bytes: ...
    def fetch_outputs(self, batch_id: str, files: Sequence[OutputFile], outputs_dir: Path
                      ) -> None: ...


class Loop:
    """Turns messages into events and ready jobs into dispatches, one turn at a time."""

    def __init__(self, settings: Any, store: Store, agents: Mapping[str, Agent],
                 workflows: Mapping[JobKind, Workflow], *,
                 inbox: queue.SimpleQueue[object] | None = None,
                 status_path: Path | None = None, daemon_info: Mapping[str, Any] | None = None,
                 intake: Intake | None = None, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.agents = agents
        self.workflows = workflows
        self.clock = clock
        self.inbox: queue.SimpleQueue[object] = inbox or queue.SimpleQueue()
        self.progress: dict[str, tuple[str, int, int]] = {}
        self.down_since: dict[str, float] = {}
        self.reported: set[str] = set()  # instances heard from since start
        self.checking: set[str] = set()  # prompts asked about after a (re)connection
        self.withdrawing: dict[str, float] = {}  # instance -> asked to withdraw prompts at
        self.fallback_kinds: frozenset[str] = frozenset()
        self.unfit: dict[str, tuple[str, ...]] = {}  # instance -> workflow problems there
        self.outputs_dir = Path(settings.state_dir) / "outputs"
        self.batch_views = BatchViews(self.outputs_dir)
        self.submitted: dict[int, str | None] = {}  # SubmitFile.index -> batch id or None
        self.intake = intake
        self._effects: list[Callable[[], object]] = []
        self._taken: list[threading.Event] = []  # set when this turn's POSTs are taken
        self._said: list[Callable[[], object]] = []  # INFO lines of this turn's events
        self._handlers: dict[type, Callable[[Any, float], None]] = {
            Health: self._on_health, Posted: self._on_posted, PostFailed: self._on_post_failed,
            Started: self._on_started, Progress: self._on_progress,
            Finished: self._on_finished, Checked: self._on_checked, SubmitFile: self._on_file,
            SpoolHint: self._on_spool_hint, Validated: self._on_validated,
            Withdrawn: self._on_withdrawn,
        }
        self.busy = BusyMeter(clock())
        # when each running job started (jobs found running after a restart: from now)
        self.running_since = {j.job_id: self.busy.start for j in store.in_flight.values()
                              if j.state is JobState.RUNNING}
        self.queued_since = {j.job_id: self.busy.start for j in store.in_flight.values()
                             if j.state is JobState.QUEUED}
        self.sick: set[str] = set()  # DOWN because they would not let go of a prompt
        self.status_path = status_path
        self.daemon_info = daemon_info
        self._status_written = float("-inf")
        self.on_status: list[Callable[[Mapping[str, Any], float], None]] = []  # the web page
        self.log_error: str | None = None  # why the event log cannot be written, if so
        self._status_error: str | None = None  # why status.json could not be written
        self._next_snapshot = store.snapshot_seq + settings.snapshot_every
        self._settle_and_forget_gone_instances()
        self.unfetched = self._unfetched_videos()
        store.listeners.append(self._narrate)
        store.listeners.append(self._meter)

    def post(self, message: object) -> None:
        self.inbox.put(message)

    # --- one turn --------------------------------------------------------------------

    def run_once(self, timeout: float = 0.2) -> None:
        """Handle waiting messages (waiting up to ``timeout`` for the first), dispatch,
        commit once, then start the network calls this turn decided, then log what the
        turn's events mean."""
        try:
            self._turn(timeout)
        finally:
            said, self._said = self._said, []
            for line in said:
                line()

    def _turn(self, timeout: float) -> None:
        messages = self._take(timeout)
        now = self.clock()
        for message in messages:
            self._handlers[type(message)](message, now)
        self._stop_if_unfit()
        self._expire_lost_instances(now)
        self._expire_hung_jobs(now)
        self._withdraw_abandoned(now)
        if self.intake is not None and self.log_error is None:
            self.intake.turn(self, now)
        if self.log_error is None:
            self._dispatch(now)
        if not self._commit():
            self.write_status(now)
            return  # nothing leaves the process until what caused it is durable
        if self._effects:
            failpoints.hit("after_intent")
        effects, self._effects = self._effects, []
        for effect in effects:
            effect()
        _hand_over(self._taken)
        self._taken.clear()
        self.write_status(now)
        if self.store.seq >= self._next_snapshot:
            self.snapshot()

    def snapshot(self) -> None:
        """Write a snapshot and start a new log segment (between turns, never inside a
        group commit). A disk that refuses it is reported and the snapshot tried again
        after a tenth of SNAPSHOT_EVERY more events: the log itself still holds it all."""
        every = self.settings.snapshot_every
        began = time.perf_counter()
        try:
            self.store.compact()
        except (LogWriteError, OSError) as exc:
            log.warning("⚠️ cannot write a snapshot of the event log; a restart replays "
                        "more until one is written", error=str(exc))
            self._next_snapshot = self.store.seq + max(1, every // 10)
            return
        self._next_snapshot = self.store.seq + every
        log.info("📸 snapshot written, new event-log segment", seq=self.store.seq,
                 ms=round((time.perf_counter() - began) * 1000, 1))

    def defer(self, effect: Callable[[], object]) -> None:
        """Run ``effect`` after this turn's commit (a file move, a reply, a POST)."""
        self._effects.append(effect)

    def wait_budget(self, now: float, longest: float = 0.5) -> float:
        """How long the next turn may wait for messages."""
        if self.intake is None:
            return longest
        return min(longest, self.intake.next_turn_in(now))

    def _on_spool_hint(self, hint: SpoolHint, now: float) -> None:
        if self.intake is not None:
            self.intake.spool.note(hint)

    def _commit(self) -> bool:
        """Group commit. While the log cannot be written (disk full, read-only), keep the
        events pending, send nothing, dispatch nothing, and say so; resume once it works."""
        try:
            self.store.commit()
        except LogWriteError as exc:
            if self.log_error is None:
                log.error("🛑 cannot write the event log: dispatch stopped until it can",
                          error=str(exc))
            self.log_error = str(exc)
            return False
        if self.log_error is not None:
            log.info("✅ event log writable again: dispatch resumes")
            self.log_error = None
        return True

    def write_status(self, now: float, *, force: bool = False) -> None:
        """Rewrite ``status.json`` (at most every STATUS_EVERY seconds unless forced). Best
        effort: it is a view of the log, so a disk that refuses it is reported once and
        the next rewrite tries again."""
        if self.status_path is None or (not force and now - self._status_written
                                        < STATUS_EVERY):
            return
        self._status_written = now
        view = status_view(self.store, self.settings.instances, now=now,
                           progress=self.progress, busy=self.busy.shares(now),
                           daemon=self.daemon_info, batches=self.batch_views)
        view["event_log_error"] = self.log_error
        for publish in self.on_status:  # the status page: even when the disk refuses
            publish(view, now)
        try:
            write_status_file(self.status_path, view)
        except OSError as exc:
            if self._status_error is None:
                log.warning("⚠️ cannot write status.json; trying again later",
                            error=str(exc))
            self._status_error = str(exc)
            return
        if self._status_error is not None:
            log.info("✅ status.json written again")
            self._status_error = None

    def _take(self, timeout: float) -> list[object]:
        try:
            messages = [self.inbox.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                messages.append(self.inbox.get_nowait())
            except queue.Empty:
                return messages

    @property
    def started(self) -> bool:
        """Every instance has answered (or failed) its first probe: dispatch may begin."""
        return self.reported >= set(self.agents)

    @property
    def reconciled(self) -> bool:
        """Started, and every job found in flight on a reachable server was looked up."""
        return self.started and not self.checking

    def status_line(self) -> str:
        """One line for systemd's STATUS=: batches, jobs and instances that are down."""
        active = sum(1 for _ in self.store.open_batches())
        down = [i for i in self.agents if self.store.instance_up.get(i) is False]
        line = (f"{active} batches active; {len(self.store.ready)} jobs ready, "
                f"{len(self.store.in_flight)} in flight")
        if down:
            line += f"; DOWN: {', '.join(down)}"
        if self.log_error:
            line += "; EVENT LOG NOT WRITABLE"
        return line

    # --- intake ----------------------------------------------------------------------

    def _on_file(self, message: SubmitFile, now: float) -> None:
        """One-shot mode: a file identical to an earlier batch is that batch (resumed if
        unfinished, reported if ended), unless ``force`` asks for a new render."""
        try:
            data = read_prompt_file(message.path, self.settings.max_file_bytes)
            earlier = self.batch_of(data)
            if earlier is not None and not message.force:
                log.info("↩️ same file as an earlier batch: taking that one",
                         file=str(message.path), batch=earlier.batch_id,
                         state=earlier.state.value)
                batch_id: str | None = earlier.batch_id
            else:
                batch_id = self.admit_file(data, message.path.name, now)
        except BadInput as exc:
            log.error("❌ prompt file refused", file=str(message.path), reason=str(exc))
            batch_id = None
        self.submitted[message.index] = batch_id

    def batch_of(self, data: bytes) -> Batch | None:
        """The latest batch recorded from a file of exactly these bytes, if any."""
        sha256 = hashlib.sha256(data).hexdigest()
        return self.store.batches.get(self.store.by_sha256.get(sha256, ""))

    def admit_file(self, data: bytes, name: str, now: float,
                   file_id: tuple[int, int, int] | None = None) -> str:
        """Plan and record a prompt file as the next batch; returns its id. BadInput, and
        nothing recorded, when the file cannot be a batch, whatever the reason."""
        plan = record_file(self.store, self.settings, data, name, now, file_id)
        log.info("📥 batch accepted", batch=plan.batch_id, video=plan.name, file=plan.source,
                 chunks=len(plan.jobs) // 3, frames=plan.total_frames)
        return plan.batch_id

    # --- commands from submit.py -----------------------------------------------------

    def run_command(self, command: str, batch_id: str, now: float) -> tuple[bool, str]:
        """``cancel``: stop and cancel every unfinished job; ``retry``: failed and
        cancelled jobs wait again with fresh attempts. Returns (ok, message)."""
        batch = self.store.batches.get(batch_id)
        if batch is None:
            return False, f"no batch {batch_id!r}"
        if command == "cancel":
            if batch.state in BATCH_FINAL:
                return False, f"{batch_id} already ended ({batch.state.value})"
            events = cancel_batch(batch, "cancelled by a user")
        elif batch.state in (BatchState.FAILED, BatchState.CANCELLED):
            events = retry_batch(batch)
        else:
            return False, f"{batch_id} is {batch.state.value}: only failed or cancelled " \
                          "batches can be retried"
        for event in events:
            self.store.record(event, now)
        return True, f"{batch_id} {'cancelled' if command == 'cancel' else 'retried'}"

    # --- dispatch --------------------------------------------------------------------

    def _dispatch(self, now: float) -> None:
        if not self.started or not self.store.ready:
            return
        s, store = self.settings, self.store
        picks = schedule(store.ready.values(), store.instance_views(s.instances, now=now),
                         now=now, fallback=s.fallback,
                         combine_concurrency=s.combine_concurrency,
                         combines_in_flight=store.combines_in_flight(),
                         costs=store.estimates.costs(), unfinished=store.coming_work(),
                         combines_coming=store.combines_coming())
        for pick in picks:
            if pick.stolen:
                log.info(f"🤝 Instance {pick.instance_id} is out of its own work and takes "
                         f"{pick.job_id}: its own instances would start it later than "
                         f"a model switch costs", job=pick.job_id)
            self._send(self.store.jobs[pick.job_id], pick.instance_id, now)

    def _send(self, job: Job, instance_id: str, now: float) -> None:
        if job.kind is JobKind.COMBINE:
            failpoints.hit("dispatch_combine")
        prompt_id = new_prompt_id()
        self.store.record(ev.JobDispatchIntent(job.job_id, instance_id, prompt_id), now)
        self._post_prompt(job, now)

    def _post_prompt(self, job: Job, now: float) -> None:
        """Name the files the job reads as its server will know them, render its workflow,
        and once this turn is committed copy those files over (if they must be) and post
        it. A job whose workflow cannot be rendered, or whose input file was never
        reported, fails for good (no attempt could do better)."""
        try:
            resolved = resolve_inputs(job, (self.store.jobs[d] for d in job.spec.deps),
                                      self.workflows, target=str(job.instance_id),
                                      transfer=self.settings.artifact_transfer)
            graph = self.workflows[job.kind].render(resolved.params)
            handoffs = [self._handoff(upload) for upload in resolved.uploads]
        except ComfyDualError as exc:
            self._fail(job, f"cannot prepare the workflow: {exc}", now, permanent=True)
            return
        self.defer(partial(self._hand, partial(
            self.agents[job.instance_id].submit, job.job_id, job.prompt_id, graph,
            self._extra_data(job), handoffs)))

    def _hand(self, submit: Callable[[], threading.Event | None]) -> None:
        """Run ``submit``; the turn waits for what it hands over (``_hand_over``)."""
        taken = submit()
        if taken is not None:
            self._taken.append(taken)

    def _handoff(self, upload: Upload) -> Handoff:
        source = self.agents.get(upload.source)
        if source is None:
            raise ArtifactMissing(f"{upload.file.relative} is on {upload.source}, which is no "
                                  "longer configured")
        return Handoff(upload, partial(source.download, upload.file))

    @staticmethod
    def _extra_data(job: Job) -> dict[str, Any]:
        """Stored by ComfyUI with the prompt: lets a person (and the simulator) see which
        job a queue entry is."""
        return {"comfy_dual": {"job_id": job.job_id, "kind": job.kind.value,
                               "model": job.kind.value}}

    # --- what the servers said -------------------------------------------------------

    def _flying(self, prompt_id: str) -> Job | None:
        return next((j for j in self.store.in_flight.values() if j.prompt_id == prompt_id),
                    None)

    def _on_posted(self, m: Posted, now: float) -> None:
        job = self._flying(m.prompt_id)
        if job is not None and job.state is JobState.DISPATCHING:
            self.store.record(ev.JobQueued(job.job_id, m.prompt_id, m.number), now)

    def _on_post_failed(self, m: PostFailed, now: float) -> None:
        job = self._flying(m.prompt_id)
        if job is None:
            return
        if isinstance(m.error, InstanceTrouble):
            # The server is unreachable or failing (HTTP 5xx): its trouble, not the job's.
            # The POST may or may not have arrived: ask again once the server is back.
            log.warning("⚠️ could not post to instance", job=job.job_id,
                        instance=m.instance_id, error=str(m.error))
            self._set_health(m.instance_id, False, str(m.error), now)
            return
        self._fail(job, str(m.error), now, permanent=isinstance(m.error, PermanentDispatchError))

    def _on_started(self, m: Started, now: float) -> None:
        job = self._flying(m.prompt_id)
        if job is not None and job.state in (JobState.DISPATCHING, JobState.QUEUED):
            self.store.record(ev.JobStarted(job.job_id, m.prompt_id), now)

    def _on_progress(self, m: Progress, now: float) -> None:
        job = self._flying(m.prompt_id)
        if job is not None:
            self.progress[job.job_id] = (m.node, m.value, m.max)

    def _on_finished(self, m: Finished, now: float) -> None:
        job = self._flying(m.prompt_id)
        if job is not None:
            self._outcome(job, m.outcome, now)

    def _outcome(self, job: Job, outcome: JobOutcome, now: float) -> None:
        """A success must have written every file its workflow produces: ComfyUI runs the
        outputs of a partly invalid graph that are valid, and calls that a success."""
        self.progress.pop(job.job_id, None)
        if outcome.status != "success":
            self._fail(job, outcome.error or f"ended {outcome.status} on the server", now,
                       permanent=False)
        elif unwritten := unwritten_artifacts(self.workflows[job.kind], outcome.outputs):
            self._fail(job, f"finished without writing {', '.join(unwritten)}: the server ran "
                            "only part of the graph (see 'prompt accepted with invalid "
                            "outputs' in the log)", now, permanent=True)
        else:
            self.store.record(ev.JobSucceeded(job.job_id, job.prompt_id, outcome.outputs), now)

    def _fail(self, job: Job, error: str, now: float, *, permanent: bool) -> None:
        self.progress.pop(job.job_id, None)
        self.store.record(failure_event(job, error, permanent=permanent, now=now,
                                        policy=self.store.policy), now)

    def _on_checked(self, m: Checked, now: float) -> None:
        self.checking.discard(m.prompt_id)
        job = self._flying(m.prompt_id)
        if job is None:
            return
        if m.where == "history":
            self._outcome(job, m.outcome, now)
        elif m.where in ("queue", "running"):
            if job.state is JobState.DISPATCHING:
                self.store.record(ev.JobQueued(job.job_id, m.prompt_id, None), now)
            if m.where == "running":
                self._on_started(Started(m.instance_id, m.prompt_id), now)
            log.info("🔗 re-attached to job", job=job.job_id, instance=m.instance_id)
        elif job.state is JobState.DISPATCHING:
            log.info("📤 posting again under the same prompt_id (it never arrived)",
                     job=job.job_id, instance=m.instance_id, prompt_id=m.prompt_id)
            self._post_prompt(job, now)
        else:
            self.store.record(ev.JobLost(job.job_id, m.prompt_id,
                                         "the server no longer knows it (restarted?)"), now)
            log.warning("♻️ instance forgot a job it had accepted; it will run again",
                        job=job.job_id, instance=m.instance_id)

    # --- instance health ---------------------------------------------------------------

    def _on_validated(self, m: Validated, now: float) -> None:
        """The agent checked the workflows against the server's node list before telling
        it is up, so nothing was posted to it yet."""
        if not m.problems:
            self.unfit.pop(m.instance_id, None)
            log.info(f"🧩 workflows fit instance {m.instance_id}")
            return
        self.unfit[m.instance_id] = m.problems
        for problem in m.problems:
            log.error(f"❌ {problem}")

    def _stop_if_unfit(self) -> None:
        """Stop once every instance has answered if a workflow does not fit a server (a
        missing custom node or model file): a person has to fix it, and every job would
        fail on it. Before anything was posted at start-up; mid-run, jobs in flight
        elsewhere go on and are picked up at the next start."""
        if not self.unfit or not self.started:
            return
        self._commit()
        problems = [p for found in self.unfit.values() for p in found]
        raise BadConfig(f"the workflows do not fit {', '.join(sorted(self.unfit))}; fix "
                        "these and start again:\n  " + "\n  ".join(problems))

    def _on_health(self, m: Health, now: float) -> None:
        self.reported.add(m.instance_id)
        if m.up and m.instance_id in self.sick:
            return  # it answers, but is UP again only once it lets go of its prompts
        self._set_health(m.instance_id, m.up, m.detail, now)
        self._log_fallback()
        if m.up:
            for batch in self.unfetched.pop(m.instance_id, ()):
                self._fetch_final(batch)
            for job in list(self.store.in_flight.values()):
                if job.instance_id == m.instance_id:
                    self.checking.add(job.prompt_id)
                    self.defer(partial(self.agents[m.instance_id].check, job.job_id,
                                       job.prompt_id))

    def _set_health(self, instance_id: str, up: bool, detail: str, now: float) -> None:
        if self.store.instance_up.get(instance_id) == up:
            return
        config = next(i for i in self.settings.instances if i.instance_id == instance_id)
        if up:
            self.down_since.pop(instance_id, None)
            self.store.record(ev.InstanceUp(instance_id), now)
            log.info(f"✅ Connected to instance {instance_id} at {config.host}:{config.port}",
                     detail=detail)
        else:
            self.down_since[instance_id] = now
            self.store.record(ev.InstanceDown(instance_id, detail), now)
            log.warning(f"❌ Instance {instance_id} at {config.host}:{config.port} is down",
                        detail=detail)
        self._log_fallback()

    def _log_fallback(self) -> None:
        """Fallback runs a type on another instance while all of its own are DOWN (told
        once every instance has answered its first probe, so start-up does not flap)."""
        if not self.settings.fallback or not self.started:
            return
        up = [i for i in self.settings.instances if self.store.instance_up.get(i.instance_id)]
        kinds = frozenset(k.value for k in JobKind if up and not any(i.accepts(k) for i in up))
        for kind in sorted(kinds - self.fallback_kinds):
            log.warning(f"🔀 Fallback on: {kind} jobs go to any instance that is up",
                        instances=[i.instance_id for i in up])
        for kind in sorted(self.fallback_kinds - kinds):
            log.info(f"🔀 Fallback off: {kind} jobs are back on their own instance")
        self.fallback_kinds = kinds

    def _expire_lost_instances(self, now: float) -> None:
        """Jobs on an instance DOWN for INSTANCE_LOST_TIMEOUT go back to ready."""
        for instance_id, since in list(self.down_since.items()):
            if now - since < self.settings.instance_lost_timeout:
                continue
            for job in [j for j in self.store.in_flight.values()
                        if j.instance_id == instance_id]:
                self.store.record(ev.JobLost(job.job_id, job.prompt_id,
                                             f"{instance_id} unreachable"), now)
                log.warning("⏱️ moving job off an unreachable instance; if that instance "
                            "comes back with the job queued, it may render it a second time",
                            job=job.job_id, instance=instance_id)
            del self.down_since[instance_id]

    def _expire_hung_jobs(self, now: float) -> None:
        """A server can hang without saying so. A render running longer than JOB_TIMEOUT
        fails its attempt (and is withdrawn: interrupted); a job queued longer than
        QUEUE_TIMEOUT goes back to ready without using an attempt (and is withdrawn); a
        server that has not let go of withdrawn prompts within INTERRUPT_GRACE is sick:
        DOWN, so its other jobs move after INSTANCE_LOST_TIMEOUT, until it lets go."""
        s = self.settings
        for job_id, since in list(self.running_since.items()):
            job = self.store.jobs[job_id]
            if now - since >= s.job_timeout and job.state is JobState.RUNNING:
                self._fail(job, f"ran longer than JOB_TIMEOUT ({s.job_timeout:g} s); "
                           "interrupted", now, permanent=False)
        for job_id, since in list(self.queued_since.items()):
            job = self.store.jobs[job_id]
            if now - since >= s.queue_timeout and job.state is JobState.QUEUED:
                self.store.record(ev.JobLost(
                    job.job_id, job.prompt_id, f"queued on {job.instance_id} longer than "
                    f"QUEUE_TIMEOUT ({s.queue_timeout:g} s)"), now)
        for instance_id, since in self.withdrawing.items():
            if now - since >= s.interrupt_grace and instance_id not in self.sick:
                self.sick.add(instance_id)
                self._set_health(instance_id, False, "it has not let go of prompts it was "
                                 f"told to stop for INTERRUPT_GRACE ({s.interrupt_grace:g} s)",
                                 now)

    def _withdraw_abandoned(self, now: float) -> None:
        """Prompts of jobs that left an instance without succeeding may still be queued or
        running there (a server that was unreachable, hung, or told to stop once): each UP
        instance is asked to withdraw them, and takes no new work until it has."""
        for instance_id, prompts in self.store.abandoned.items():
            agent = self.agents.get(instance_id)
            if agent is None or not self.store.instance_up.get(instance_id) \
                    or instance_id in self.withdrawing:
                continue
            self.withdrawing[instance_id] = now
            self.defer(partial(agent.withdraw, tuple(sorted(prompts))))

    def _on_withdrawn(self, m: Withdrawn, now: float) -> None:
        self.withdrawing.pop(m.instance_id, None)
        self.store.record(ev.PromptsWithdrawn(m.instance_id, m.prompt_ids), now)
        if m.instance_id in self.sick:
            self.sick.discard(m.instance_id)
            self._set_health(m.instance_id, True, "it let go of the prompts it was told to "
                             "stop", now)

    def _settle_and_forget_gone_instances(self) -> None:
        """At start: record the follow-ups a torn last turn may have left out, and send
        jobs in flight on an instance no longer configured back to ready."""
        now = self.clock()
        for event in settle(self.store):
            self.store.record(event, now)
        for job in list(self.store.in_flight.values()):
            if job.instance_id not in self.agents:
                self.store.record(ev.JobLost(job.job_id, job.prompt_id,
                                             f"{job.instance_id} is no longer configured"),
                                  now)
        self._commit()  # a full disk pauses the loop from its first turn, as later on

    # --- telling people what happens -------------------------------------------------

    def _meter(self, rec: ev.Recorded, subject: Any) -> None:
        if isinstance(subject, Job | Batch):
            self.batch_views.touch(subject.batch_id if isinstance(subject, Batch)
                                   else subject.batch.batch_id)
        e = rec.event
        if isinstance(e, ev.JobQueued):
            self.queued_since[e.job_id] = rec.ts
        elif isinstance(e, ev.JobStarted):
            self.queued_since.pop(e.job_id, None)
            self.busy.job_started(e.job_id, subject.instance_id, rec.ts)
            self.running_since[e.job_id] = rec.ts
        elif isinstance(e, JOB_ENDINGS):
            self.queued_since.pop(e.job_id, None)
            self.busy.job_ended(e.job_id, rec.ts)
            self.running_since.pop(e.job_id, None)

    def _narrate(self, rec: ev.Recorded, subject: Any) -> None:
        """Log what an event means. Its INFO lines wait until the turn's POSTs are handed
        over (``_say``): rendered before them, a job's two lines made ready-to-POST a
        tenth longer (p50 1.82 ms against 1.64 ms, four videos at once)."""
        e = rec.event
        if isinstance(e, ev.JobDispatchIntent):
            job = self.store.jobs[e.job_id]
            self._say(f"🔄 Executing {job.kind.value} job {job.spec.chunk} on instance "
                      f"{e.instance_id}", job=e.job_id, video=job.batch.plan.name)
        elif isinstance(e, ev.JobSucceeded):
            self._say("✔️ job done", job=e.job_id, instance=subject.instance_id)
        elif isinstance(e, ev.JobAttemptFailed):
            log.warning("🔁 job failed, will retry", job=e.job_id, error=e.error,
                        retry_in_s=round(e.eligible_at - rec.ts, 1))
        elif isinstance(e, ev.JobFailed):
            log.error("❌ job failed", job=e.job_id, error=e.error)
        elif isinstance(e, ev.BatchGateOpened):
            self._say("🚪 COMBINE gate open", batch=e.batch_id)
        elif isinstance(e, (ev.BatchDone, ev.BatchFailed, ev.BatchCancelled)):
            if isinstance(e, ev.BatchDone):
                self._say("🏁 batch done", batch=e.batch_id, video=subject.plan.name)
                self._fetch_final(subject)
            else:
                log.error(f"🏁 batch {subject.state.value}", batch=e.batch_id,
                          video=subject.plan.name, reason=subject.reason)

    def _say(self, message: str, **fields: Any) -> None:
        self._said.append(partial(log.info, message, **fields))

    def _unfetched_videos(self) -> dict[str, list[Batch]]:
        """Finished videos not saved here (the daemon stopped before it fetched them), by
        the instance that has them: fetched once it is heard up."""
        missing: dict[str, list[Batch]] = {}
        for batch in self.store.batches.values():
            files = final_files(batch.final_outputs) if batch.state is BatchState.DONE else []
            if any(not local_path(self.outputs_dir, batch.batch_id, f).exists() for f in files):
                missing.setdefault(str(batch.final_instance), []).append(batch)
        return missing

    def _fetch_final(self, batch: Batch) -> None:
        """Bring the finished video home, into STATE_DIR/outputs/<batch>/ (agent thread)."""
        files = final_files(batch.final_outputs)
        agent = self.agents.get(str(batch.final_instance))
        if files and agent is not None:
            self.defer(partial(agent.fetch_outputs, batch.batch_id, files, self.outputs_dir))

    # --- running ---------------------------------------------------------------------

    def run_until(self, done: Callable[[], bool], *, stop: Callable[[], bool] = lambda: False
                  ) -> None:
        while not done() and not stop():
            self.run_once()

    def batches_finished(self, batch_ids: Sequence[str]) -> bool:
        return all(self.store.batches[b].state in BATCH_FINAL for b in batch_ids)
