"""Settings of the ComfyUI simulator: a frozen config per server and its fault knobs.

``SimConfig`` is fixed for a server's life; ``Faults`` is swapped whole at run time
(``SimulatorHandle.set_faults`` or ``POST /debug/faults``), so readers always see one
consistent set of knobs without locking.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from statemachine.errors import BadConfig

QueueItemShape = Literal["array", "object"]
HistoryMessageShape = Literal["pair", "string"]

UNKNOWN_KIND = "unknown"
# Node classes that show a progress bar in ComfyUI (samplers, tiled upscaling).
PROGRESS_NODES = frozenset({"KSampler", "KSamplerAdvanced", "SamplerCustom",
                            "SamplerCustomAdvanced", "ImageUpscaleWithModel"})


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise BadConfig(f"{name}={value!r}: a probability must be between 0 and 1")


def _check_seconds(name: str, value: float | None) -> None:
    if value is not None and value < 0:
        raise BadConfig(f"{name}={value!r}: seconds cannot be negative")


@dataclass(frozen=True)
class Faults:
    """Failure knobs that may change while the server runs.

    Attributes:
        fail_rate: probability that a job ends in ``execution_error``.
        hang: while set, jobs that start never finish until interrupted.
        hang_rate: probability that a starting job hangs.
        http_500: while set, ``POST /prompt`` and every GET (``/ws`` too) answer 500.
        response_delay: seconds added before every HTTP answer (debug routes excepted).
        deaf_to_interrupts: while set, ``POST /interrupt`` is answered and does nothing
            (a server wedged inside a node).
    """

    fail_rate: float = 0.0
    hang: bool = False
    hang_rate: float = 0.0
    http_500: bool = False
    response_delay: float = 0.0
    deaf_to_interrupts: bool = False

    def __post_init__(self) -> None:
        _check_probability("fail_rate", self.fail_rate)
        _check_probability("hang_rate", self.hang_rate)
        _check_seconds("response_delay", self.response_delay)

    def replace(self, knobs: Mapping[str, Any]) -> Faults:
        """A copy with ``knobs`` changed; unknown names or wrong types raise ``BadConfig``."""
        names = {f.name: f.type for f in dataclasses.fields(self)}
        unknown = sorted(set(knobs) - set(names))
        if unknown:
            raise BadConfig(f"unknown fault knob(s) {unknown}; known: {sorted(names)}")
        for name, value in knobs.items():
            wants_bool = names[name] == "bool"
            if isinstance(value, bool) != wants_bool or not isinstance(value, (int, float)):
                raise BadConfig(f"fault knob {name}={value!r} has the wrong type")
        return dataclasses.replace(self, **knobs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SimConfig:
    """How a simulated server behaves for its whole life.

    Attributes:
        durations: seconds a job takes, by job kind (``extra_data["comfy_dual"]["kind"]``).
        default_duration: seconds for kinds not in ``durations`` (and jobs without a kind).
        switch_cost: seconds added when a job's model differs from the previous job's.
        progress_steps: ``progress`` messages sent by each node that has a progress bar.
        progress_nodes: classes with a progress bar; a job's time goes to these nodes (all
            nodes if it has none). Add the stand-in of a sampler in model-free workflows.
        seed: seed of the random draws behind ``fail_rate`` and ``hang_rate``.
        queue_item_shape: ``"array"`` (upstream ComfyUI) or ``"object"`` (the recorded fork).
        history_message_shape: ``status.messages`` in history as ``[event, data]`` pairs
            (``"pair"``, upstream) or plain strings (``"string"``, the recorded fork).
        faults: the fault knobs the server starts with.
    """

    durations: Mapping[str, float] = field(default_factory=dict)
    default_duration: float = 0.2
    switch_cost: float = 0.0
    progress_steps: int = 4
    progress_nodes: frozenset[str] = PROGRESS_NODES
    seed: int = 0
    queue_item_shape: QueueItemShape = "array"
    history_message_shape: HistoryMessageShape = "pair"
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        object.__setattr__(self, "durations", MappingProxyType(dict(self.durations)))
        object.__setattr__(self, "progress_nodes", frozenset(self.progress_nodes))
        for kind, seconds in self.durations.items():
            _check_seconds(f"durations[{kind}]", seconds)
        _check_seconds("default_duration", self.default_duration)
        _check_seconds("switch_cost", self.switch_cost)
        if self.progress_steps < 1:
            raise BadConfig(f"progress_steps={self.progress_steps}: needs at least 1")
        if self.queue_item_shape not in ("array", "object"):
            raise BadConfig(f"queue_item_shape={self.queue_item_shape!r}: 'array' or 'object'")
        if self.history_message_shape not in ("pair", "string"):
            raise BadConfig(
                f"history_message_shape={self.history_message_shape!r}: 'pair' or 'string'")

    def duration_for(self, kind: str) -> float:
        return self.durations.get(kind, self.default_duration)


@dataclass(frozen=True)
class JobTag:
    """What the daemon tells the simulator about a job in ``extra_data["comfy_dual"]``."""

    kind: str
    job_id: str | None
    model: str

    @classmethod
    def from_extra_data(cls, extra_data: Mapping[str, Any]) -> JobTag:
        tag = extra_data.get("comfy_dual")
        if not isinstance(tag, Mapping):
            return cls(UNKNOWN_KIND, None, UNKNOWN_KIND)
        kind = str(tag.get("kind") or UNKNOWN_KIND)
        job_id = tag.get("job_id")
        return cls(kind, None if job_id is None else str(job_id), str(tag.get("model") or kind))


class FaultSwitch:
    """The current ``Faults`` of a simulator; ``update`` swaps the whole value at once."""

    def __init__(self, faults: Faults) -> None:
        self.current = faults

    def update(self, knobs: Mapping[str, Any]) -> Faults:
        self.current = self.current.replace(knobs)
        return self.current
