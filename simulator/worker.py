"""Execution of queued prompts in the ComfyUI simulator, one at a time.

No node really computes: each job sleeps for the duration of its kind (plus a model
switch cost), spread over its "work" nodes (``progress_nodes``, else all nodes), sends
the websocket messages ComfyUI sends in the same order, and lets its output nodes write
small real files. Every run is recorded in a thread-safe ``Ledger`` that outlives server
restarts, so tests can prove what ran, where, when and how often.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulator.config import Faults, JobTag, SimConfig
from simulator.files import OUTPUT_KINDS, SaveOutsideOutput, SimFiles, looks_like_image
from simulator.graph import NodeCatalog, execution_order
from simulator.sockets import Hub
from simulator.state import PromptQueue, QueueItem

IMAGE_LOADERS = frozenset({"LoadImage", "LoadImageMask"})


def now_ms() -> int:
    return int(time.time() * 1000)


class Ledger:
    """Every execution started on a server, across its lives; safe to read from any thread.

    With ``path`` every start and end is also appended to that JSONL file as it happens,
    so the record survives a SIGKILL of the simulator process (see ``read_ledger``).
    """

    def __init__(self, path: Path | None = None) -> None:
        self._lock = threading.Lock()
        self._runs: list[dict[str, Any]] = []
        self._file = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115

    def begin(self, prompt_id: str, tag: JobTag, switch_cost: float) -> int:
        with self._lock:
            run = {"prompt_id": prompt_id, "job_id": tag.job_id, "kind": tag.kind,
                   "model": tag.model, "start": time.time(), "end": None,
                   "status": "running", "switch_cost": switch_cost, "run": uuid.uuid4().hex}
            self._runs.append(run)
            self._write({"event": "begin", **run})
            return len(self._runs) - 1

    def end(self, index: int, status: str) -> None:
        with self._lock:
            run = self._runs[index]
            run.update(end=time.time(), status=status)
            self._write({"event": "end", "run": run["run"], "end": run["end"],
                         "status": status})

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def executions(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._runs)

    def counts(self) -> dict[str, int]:
        """How many times each prompt_id started, in order of first start."""
        with self._lock:
            return dict(Counter(run["prompt_id"] for run in self._runs))


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """The executions a ``Ledger(path)`` recorded, across process lives, in start order; a
    run that began and never ended (its process was killed) has status ``lost``."""
    runs: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.endswith("}"):
            continue  # a line cut by the kill
        record = json.loads(line)
        if record.pop("event") == "begin":
            runs[record["run"]] = {**record, "status": "lost"}
        elif record["run"] in runs:
            runs[record["run"]].update(end=record["end"], status=record["status"])
    return sorted(runs.values(), key=lambda r: r["start"])


@dataclass
class WorkerContext:
    """What running a job needs from its server."""

    config: SimConfig
    faults: Callable[[], Faults]
    catalog: NodeCatalog
    files: SimFiles
    queue: PromptQueue
    hub: Hub
    ledger: Ledger


@dataclass(frozen=True)
class JobPlan:
    """Decided when a job starts: node order, seconds per work node, injected faults."""

    order: list[str]
    work: dict[str, float]
    fail_at: str | None
    hang_at: str | None


class NodeInterrupted(Exception):
    """The running job was interrupted (``POST /interrupt``)."""


class NodeFailed(Exception):
    """A node raised: becomes ``execution_error`` with this type and message."""

    def __init__(self, exception_type: str, message: str) -> None:
        super().__init__(message)
        self.exception_type = exception_type
        self.message = message


class Worker:
    """Takes prompts off the queue in number order and runs them one at a time."""

    def __init__(self, ctx: WorkerContext) -> None:
        self._ctx = ctx
        self._rng = random.Random(ctx.config.seed)
        self._interrupt = asyncio.Event()
        self._last_model: str | None = None

    async def run_forever(self) -> None:
        while True:
            item = await self._ctx.queue.take()
            # Decide everything before the first await: from now on the job shows as running.
            self._interrupt.clear()
            run, index = self._begin(item)
            await self._execute(run, index)

    def interrupt(self, prompt_id: str | None) -> None:
        """Interrupt the running job: any, or only if it is ``prompt_id``."""
        running = self._ctx.queue.running
        if running is not None and prompt_id in (None, running.prompt_id):
            self._interrupt.set()

    def _begin(self, item: QueueItem) -> tuple[JobRun, int]:
        tag = JobTag.from_extra_data(item.extra_data)
        switch_cost = self._ctx.config.switch_cost if tag.model != self._last_model else 0.0
        self._last_model = tag.model
        index = self._ctx.ledger.begin(item.prompt_id, tag, switch_cost)
        return JobRun(self._ctx, item, self._plan(item, tag, switch_cost), self._interrupt), index

    async def _execute(self, run: JobRun, index: int) -> None:
        try:
            await self._ctx.hub.status()
            status = await run.run()
        except asyncio.CancelledError:
            self._ctx.ledger.end(index, "lost")
            raise
        self._ctx.ledger.end(index, status)
        self._ctx.queue.finish(run.item, run.history_entry())
        await self._ctx.hub.status()
        await run.send("executing", {"node": None, "prompt_id": run.item.prompt_id})

    def _plan(self, item: QueueItem, tag: JobTag, switch_cost: float) -> JobPlan:
        order = execution_order(item.prompt, item.outputs)
        progress_nodes = self._ctx.config.progress_nodes
        work = [n for n in order if item.prompt[n]["class_type"] in progress_nodes] or order
        seconds = self._ctx.config.duration_for(tag.kind) / len(work)
        per_node = {n: seconds for n in work}
        per_node[work[0]] += switch_cost
        faults = self._ctx.faults()
        fails = self._rng.random() < faults.fail_rate
        hangs = self._rng.random() < faults.hang_rate or faults.hang
        return JobPlan(order, per_node, work[-1] if fails else None, work[0] if hangs else None)


@dataclass
class JobRun:
    """One execution of one queued prompt, with the messages and history it produces."""

    ctx: WorkerContext
    item: QueueItem
    plan: JobPlan
    interrupted: asyncio.Event
    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    executed: list[str] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    due: float = 0.0  # event-loop time at which the work paused for so far is to end

    @property
    def client(self) -> str | None:
        return self.item.extra_data.get("client_id")

    async def send(self, event: str, data: dict[str, Any], broadcast: bool = False) -> None:
        """To the submitting client; without one, only ``broadcast`` events go (to all)."""
        if self.client is not None or broadcast:
            await self.ctx.hub.send(event, data, self.client)

    async def run(self) -> str:
        """Run every node; ``"success"``, ``"error"`` or ``"interrupted"``."""
        pid = self.item.prompt_id
        self.due = asyncio.get_running_loop().time()
        await self._message("execution_start", {"prompt_id": pid, "timestamp": now_ms()})
        await self._message("execution_cached",
                            {"nodes": [], "prompt_id": pid, "timestamp": now_ms()})
        try:
            for node_id in self.plan.order:
                await self._node(node_id)
        except NodeInterrupted:
            await self._message("execution_interrupted", self._stop_data(), broadcast=True)
            return "interrupted"
        except NodeFailed as ex:
            await self._message("execution_error", self._error_data(ex))
            return "error"
        await self._message("execution_success", {"prompt_id": pid, "timestamp": now_ms()})
        return "success"

    def history_entry(self) -> dict[str, Any]:
        item, final = self.item, self.messages[-1][0]
        return {
            "prompt": [item.number, item.prompt_id, item.prompt, item.extra_data, item.outputs],
            "outputs": self.outputs,
            "status": {"status_str": "success" if final == "execution_success" else "error",
                       "completed": final == "execution_success",
                       "messages": self._rendered_messages()},
            "meta": {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n}
                     for n in self.outputs},
        }

    async def _message(self, event: str, data: dict[str, Any], broadcast: bool = False) -> None:
        self.messages.append((event, data))
        await self.send(event, data, broadcast)

    def _rendered_messages(self) -> list[Any]:
        if self.ctx.config.history_message_shape == "pair":
            return [[event, data] for event, data in self.messages]
        return [f"{event}: {data['exception_message']}" if event == "execution_error" else event
                for event, data in self.messages]

    def _class(self, node_id: str) -> str:
        return self.item.prompt[node_id]["class_type"]

    async def _node(self, node_id: str) -> None:
        self._check_interrupt()
        await self._progress_state(node_id, "running", 0.0, 1.0)
        await self.send("executing", {"node": node_id, "display_node": node_id,
                                      "prompt_id": self.item.prompt_id})
        self._check_loader(node_id)
        await self._work(node_id)
        await self._save_outputs(node_id)
        self.executed.append(node_id)
        await self._progress_state(node_id, "finished", 1.0, 1.0)

    async def _work(self, node_id: str) -> None:
        seconds = self.plan.work.get(node_id, 0.0)
        if node_id == self.plan.hang_at:
            await self._pause(None)
        if self._class(node_id) not in self.ctx.config.progress_nodes:
            await self._pause(seconds)
        else:
            await self._steps(node_id, seconds)
        if node_id == self.plan.fail_at:
            raise NodeFailed("SimulatedFailure", "simulated failure (fault injection)\n")

    async def _steps(self, node_id: str, seconds: float) -> None:
        steps = self.ctx.config.progress_steps
        for step in range(1, steps + 1):
            await self._pause(seconds / steps)
            await self._progress_state(node_id, "running", float(step), float(steps))
            await self.send("progress", {"value": step, "max": steps,
                                         "prompt_id": self.item.prompt_id, "node": node_id},
                            broadcast=True)

    def _check_interrupt(self) -> None:
        if self.interrupted.is_set():
            raise NodeInterrupted

    async def _pause(self, seconds: float | None) -> None:
        """Work ``seconds`` more (``None``: forever); an interrupt cuts it short and raises.

        The pause ends when the job's work so far is due, not ``seconds`` from now: each
        sleep ends a little late and the messages between them take time, and a job of
        many steps would run that much longer than its duration (measured: 13 ms over a
        LOW job's 16 pauses, which a benchmark of the scheduler would count as its own).
        """
        self._check_interrupt()
        if seconds is not None and seconds <= 0:
            return
        wait = None
        if seconds is not None:
            self.due += seconds
            wait = self.due - asyncio.get_running_loop().time()
            if wait <= 0:
                return
        try:
            await asyncio.wait_for(self.interrupted.wait(), wait)
        except TimeoutError:
            return
        raise NodeInterrupted

    def _check_loader(self, node_id: str) -> None:
        """LoadImage of a file that is no image fails at run time, as PIL would."""
        if self._class(node_id) not in IMAGE_LOADERS:
            return
        path = self.ctx.files.input_path(str(self.item.prompt[node_id]["inputs"].get("image")))
        if path is None or not looks_like_image(path):
            raise NodeFailed("PIL.UnidentifiedImageError", f"cannot identify image file '{path}'\n")

    async def _save_outputs(self, node_id: str) -> None:
        kind = OUTPUT_KINDS.get(self._class(node_id))
        if kind is None or node_id not in self.item.outputs:
            return
        inputs = self.item.prompt[node_id]["inputs"]
        prefix = str(inputs.get("filename_prefix")
                     or self.ctx.catalog.default(self._class(node_id), "filename_prefix")
                     or "ComfyUI")
        count = self._batch_size(node_id) if kind.batched else 1
        try:
            ui = self.ctx.files.save_outputs(kind, prefix, count)
        except SaveOutsideOutput as ex:
            raise NodeFailed("Exception", f"{ex}\n") from ex
        self.outputs[node_id] = ui
        await self.send("executed", {"node": node_id, "display_node": node_id, "output": ui,
                                     "prompt_id": self.item.prompt_id})

    def _batch_size(self, node_id: str) -> int:
        """The first ``batch_size`` found walking up the first links (1 if none)."""
        seen: set[str] = set()
        while node_id in self.item.prompt and node_id not in seen:
            seen.add(node_id)
            inputs = self.item.prompt[node_id]["inputs"]
            if isinstance(inputs.get("batch_size"), int):
                return max(1, inputs["batch_size"])
            links = [v for v in inputs.values() if isinstance(v, list) and len(v) == 2]
            node_id = str(links[0][0]) if links else ""
        return 1

    async def _progress_state(self, node_id: str, state: str, value: float, top: float) -> None:
        pid = self.item.prompt_id
        self.states[node_id] = {"value": value, "max": top, "state": state, "node_id": node_id,
                                "prompt_id": pid, "display_node_id": node_id,
                                "parent_node_id": None, "real_node_id": node_id}
        nodes = {node: dict(state) for node, state in self.states.items()}  # flat: a deep copy
        await self.send("progress_state", {"prompt_id": pid, "nodes": nodes}, broadcast=True)

    def _stop_data(self) -> dict[str, Any]:
        node_id = self._current_node()
        return {"prompt_id": self.item.prompt_id, "node_id": node_id,
                "node_type": self._class(node_id), "executed": list(self.executed),
                "timestamp": now_ms()}

    def _error_data(self, ex: NodeFailed) -> dict[str, Any]:
        node_id = self._current_node()
        literal = {k: [v] for k, v in self.item.prompt[node_id]["inputs"].items()
                   if not isinstance(v, list)}
        return {**self._stop_data(), "exception_message": ex.message,
                "exception_type": ex.exception_type,
                "traceback": traceback.format_tb(ex.__traceback__),
                "current_inputs": literal, "current_outputs": list(self.plan.order)}

    def _current_node(self) -> str:
        return next(n for n in self.plan.order if n not in self.executed)
