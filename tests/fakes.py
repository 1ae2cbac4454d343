"""The loop's world in memory: agents that record what the loop asks of them and answer
only when a test says so, a clock that moves only when told, and a harness that builds
the real ``Loop`` over them (with a real event log in a tmp dir)."""

from __future__ import annotations

import queue
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import config
import daemon
from instances.artifacts import Handoff, OutputFile
from instances.client import JobOutcome
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
from instances.workflow import Workflow
from service.intake import SubmitFile
from service.loop import Loop
from statemachine.errors import ComfyDualError, LogWriteError
from statemachine.job import Job
from statemachine.log import EventLog, MemoryLog
from statemachine.plan import JobKind
from statemachine.store import Store, read_records


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@dataclass
class Submission:
    job_id: str
    prompt_id: str
    graph: Mapping[str, Any]
    kind: JobKind
    handoffs: Sequence[Handoff]
    number: int = 0


@dataclass
class FakeAgent:
    """Implements ``service.agents.Agent``. The loop's calls are recorded (``submitted``,
    ``checks``, ``withdrawals``, ``fetched``); the server's side is played by the methods
    below, each posting the message a real agent would."""

    instance_id: str
    post: Callable[[object], None]
    workflows: Mapping[JobKind, Workflow]
    submitted: list[Submission] = field(default_factory=list)
    checks: list[tuple[str, str]] = field(default_factory=list)
    withdrawals: list[tuple[str, ...]] = field(default_factory=list)
    fetched: list[str] = field(default_factory=list)

    # --- what the loop calls -------------------------------------------------------------

    def submit(self, job_id: str, prompt_id: str, graph: Mapping[str, Any],
               extra_data: Mapping[str, Any], handoffs: Sequence[Handoff] = ()) -> None:
        kind = JobKind(extra_data["comfy_dual"]["kind"])
        self.submitted.append(Submission(job_id, prompt_id, graph, kind, handoffs))

    def check(self, job_id: str, prompt_id: str) -> None:
        self.checks.append((job_id, prompt_id))

    def withdraw(self, prompt_ids: Sequence[str]) -> None:
        self.withdrawals.append(tuple(prompt_ids))

    def download(self, file: OutputFile) -> bytes:
        return file.relative.encode()

    def fetch_outputs(self, batch_id: str, files: Sequence[OutputFile], outputs_dir: Path
                      ) -> None:
        self.fetched.append(batch_id)

    # --- what the server says ------------------------------------------------------------

    def health(self, up: bool = True, detail: str = "fake") -> None:
        self.post(Health(self.instance_id, up, detail))

    def validated(self, *problems: str) -> None:
        self.post(Validated(self.instance_id, problems))

    def prompt(self, job_id: str) -> Submission:
        """The latest submission of ``job_id``."""
        return next(s for s in reversed(self.submitted) if s.job_id == job_id)

    def accept(self, job_id: str) -> str:
        s = self.prompt(job_id)
        s.number = len(self.submitted)
        self.post(Posted(self.instance_id, job_id, s.prompt_id, s.number))
        return s.prompt_id

    def refuse(self, job_id: str, error: ComfyDualError) -> None:
        self.post(PostFailed(self.instance_id, job_id, self.prompt(job_id).prompt_id, error))

    def start(self, job_id: str) -> None:
        self.post(Started(self.instance_id, self.prompt(job_id).prompt_id))

    def finish(self, job_id: str, status: str = "success", error: str | None = None, *,
               written: bool = True) -> None:
        """The job ends; ``written=False``: a success that wrote none of its files."""
        s = self.prompt(job_id)
        outcome = self.outcome(s, status, error)
        if not written:
            outcome = JobOutcome(outcome.status, {}, None)
        self.post(Finished(self.instance_id, s.prompt_id, outcome))

    def answer_check(self, job_id: str, where: str, status: str = "success") -> None:
        s = self.prompt(job_id)
        outcome = self.outcome(s, status, None) if where == "history" else None
        self.post(Checked(self.instance_id, job_id, s.prompt_id, where,  # type: ignore[arg-type]
                          outcome))

    def let_go(self) -> None:
        """The server shows none of the prompts it was asked to withdraw."""
        asked = tuple(p for prompts in self.withdrawals for p in prompts)
        self.post(Withdrawn(self.instance_id, asked))

    def outcome(self, s: Submission, status: str, error: str | None) -> JobOutcome:
        """A success writes one file per artifact its workflow produces."""
        outputs = {node: {"images": [{"filename": f"{s.job_id.replace('/', '_')}-{name}.png",
                                      "subfolder": "", "type": "output"}]}
                   for name, node in self.workflows[s.kind].produces.items()}
        return JobOutcome(status, outputs if status == "success" else {},  # type: ignore[arg-type]
                          error)


DUAL = [{"instance_id": "high", "host": "127.0.0.1", "port": 8188, "job_types": ["HIGH"],
         "max_concurrent": 1},
        {"instance_id": "low", "host": "127.0.0.1", "port": 8189, "job_types": ["LOW"],
         "max_concurrent": 1}]


class RefusingLog(MemoryLog):
    """An event log on a disk that is full while ``full`` is set."""

    full = False

    def commit(self) -> None:
        if self.full and self.pending:
            raise LogWriteError("cannot write events.jsonl: No space left on device")
        super().commit()


class Harness:
    """A real ``Loop`` over fake agents and a fake clock. ``turn()`` runs one turn at the
    clock's time; ``settle()`` runs turns until the loop has nothing more to do."""

    def __init__(self, tmp_path: Path, instances: Sequence[Mapping[str, Any]] = DUAL, *,
                 event_log: Any = None, **overrides: Any) -> None:
        self.tmp_path = tmp_path
        self.settings = config.load_settings(None, {
            "COMFYUI_INSTANCES": list(instances), "STATE_DIR": str(tmp_path / "state"),
            "FRAMES_PER_CHUNK": 101, **overrides})
        self.workflows = daemon.load_workflows(self.settings)
        self.clock = FakeClock()
        self.log = event_log if event_log is not None else EventLog(self.settings.state_dir)
        self.inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.agents = {i.instance_id: FakeAgent(i.instance_id, self.inbox.put, self.workflows)
                       for i in self.settings.instances}
        self.open()

    def open(self) -> Loop:
        """(Re)start the daemon's side on the same log: a restart (messages not yet taken
        are lost with the old process)."""
        self.inbox = queue.SimpleQueue()
        for agent in self.agents.values():
            agent.post = self.inbox.put
        self.store = Store.open(self.log, daemon.policy_of(self.settings))
        self.loop = Loop(self.settings, self.store, self.agents, self.workflows,
                         inbox=self.inbox, clock=self.clock)
        return self.loop

    def __getitem__(self, instance_id: str) -> FakeAgent:
        return self.agents[instance_id]

    def turn(self) -> bool:
        return self.loop.run_once(self.clock())

    def settle(self) -> int:
        return self.loop.burst()

    def turn_before_and_at(self, seconds: float, before: Callable[[], bool]) -> None:
        """Settle 0.001 s short of ``seconds`` from now, where ``before`` must still hold,
        then exactly at it: a deadline is met neither early nor late."""
        self.clock.advance(seconds - 0.001)
        self.settle()
        assert before(), f"reached {seconds:g} s from now too early"
        self.clock.advance(0.001)
        self.settle()

    def all_up(self) -> None:
        for agent in self.agents.values():
            agent.health(True)
        self.settle()

    def submit(self, name: str = "video", frames: int = 202, *, force: bool = False) -> str:
        path = self.tmp_path / f"{name}.txt"
        path.write_text(f"{name}\n\n{frames}\n\na test prompt\n")
        index = len(self.loop.submitted)
        self.loop.post(SubmitFile(index, path, force))
        self.settle()
        batch_id = self.loop.submitted[index]
        assert batch_id is not None
        return batch_id

    def job(self, job_id: str) -> Job:
        return self.store.jobs[job_id]

    def events(self, kind: str | None = None) -> list[Any]:
        return [r.event for r in read_records(self.log)
                if kind is None or r.event.type == kind]
