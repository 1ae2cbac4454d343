"""What the loop's parts need of an instance agent, and how they hand work to the turn."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from instances.artifacts import Handoff, OutputFile

Effect = Callable[[], object]
Defer = Callable[[Effect], None]  # run an effect once the turn's events are durable


class Agent(Protocol):
    """An instance agent (``instances.agent.InstanceAgent``; ``tests/fakes.py`` in memory).
    Each call returns at once; what the server answers comes back as a message."""

    instance_id: str

    def submit(self, job_id: str, prompt_id: str, graph: Mapping[str, Any],
               extra_data: Mapping[str, Any], handoffs: Sequence[Handoff] = ()
               ) -> threading.Event | None: ...
    def check(self, job_id: str, prompt_id: str) -> None: ...
    def withdraw(self, prompt_ids: Sequence[str]) -> None: ...
    def download(self, file: OutputFile) -> bytes: ...
    def fetch_outputs(self, batch_id: str, files: Sequence[OutputFile], outputs_dir: Path
                      ) -> None: ...
