"""In-memory state of one simulated ComfyUI life: the prompt queue and the history. A crash
or restart throws all of it away, as ComfyUI does.

Everything here runs on the server's event loop; nothing is shared with other threads.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass
from typing import Any

from simulator.config import QueueItemShape

Number = int | float


@dataclass
class QueueItem:
    """One accepted prompt: ComfyUI's ``(number, prompt_id, prompt, extra_data, outputs)``."""

    number: Number
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]

    def render(self, shape: QueueItemShape) -> list[Any] | dict[str, Any]:
        """The item as ``GET /queue`` lists it: upstream array or the fork's object."""
        if shape == "array":
            return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]
        return {"priority": self.number, "prompt_id": self.prompt_id, "prompt": self.prompt,
                "extra_data": self.extra_data, "good_outputs": self.outputs, "sensitive": None}


class PromptQueue:
    """Pending prompts in a heap (lowest number first), the running one, and the history."""

    def __init__(self) -> None:
        self._heap: list[tuple[Number, int, QueueItem]] = []
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self.running: QueueItem | None = None
        self.history: dict[str, dict[str, Any]] = {}

    def put(self, item: QueueItem) -> None:
        heapq.heappush(self._heap, (item.number, next(self._seq), item))
        self._wakeup.set()

    async def take(self) -> QueueItem:
        """Wait for the lowest-numbered pending prompt and mark it running."""
        while not self._heap:
            self._wakeup.clear()
            await self._wakeup.wait()
        self.running = heapq.heappop(self._heap)[2]
        return self.running

    def finish(self, item: QueueItem, entry: dict[str, Any]) -> None:
        """Store the history entry (a reused prompt_id overwrites) and free the worker."""
        self.history[item.prompt_id] = entry
        self.running = None

    def pending(self) -> list[QueueItem]:
        """Pending items in heap order, not run order (as ComfyUI lists them)."""
        return [entry[2] for entry in self._heap]

    def remaining(self) -> int:
        return len(self._heap) + (self.running is not None)

    def delete(self, prompt_ids: list[Any]) -> None:
        """Drop the first pending item of each id; running and unknown ids are ignored."""
        for prompt_id in prompt_ids:
            index = next((i for i, e in enumerate(self._heap) if e[2].prompt_id == prompt_id),
                         None)
            if index is not None:
                self._heap.pop(index)
                heapq.heapify(self._heap)

    def clear(self) -> None:
        self._heap.clear()

    def history_page(self, max_items: int | None, offset: int | None) -> dict[str, Any]:
        """ComfyUI's ``get_history``: without an offset, the last ``max_items`` entries."""
        keys = list(self.history)
        start = offset if offset is not None and offset >= 0 else (
            len(keys) - max_items if max_items is not None else 0)
        start = max(start, 0)
        stop = len(keys) if max_items is None else start + max_items
        return {k: self.history[k] for k in keys[start:stop]}
