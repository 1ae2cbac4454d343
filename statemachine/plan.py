"""What the planner produces: a batch plan of jobs with their dependencies and parameters.

A plan is plain data (frozen dataclasses of str/int/tuples) so it can be carried whole in
the ``batch_accepted`` event and rebuilt from it on replay.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any


class JobKind(StrEnum):
    HIGH = "HIGH"
    LOW = "LOW"
    COMBINE = "COMBINE"

    @property
    def renders(self) -> bool:
        """HIGH and LOW jobs render; COMBINE jobs only join finished chunks."""
        return self is not JobKind.COMBINE


_KINDS = {kind.value: kind for kind in JobKind}  # JobKind(value) without Enum's call


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One unit of work: a job id unique in the whole log, its kind, chunk and inputs.

    ``params`` holds the values a workflow binding may use: prompts, seed, frame range,
    size and artifact paths (relative to the artifact root).
    """

    job_id: str
    kind: JobKind
    chunk: int
    deps: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "kind": self.kind.value, "chunk": self.chunk,
                "deps": list(self.deps), "params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], shared: dict[str, str] | None = None) -> JobSpec:
        """``shared`` maps each string value seen so far to one object, so equal params of
        several jobs are held once (see ``BatchPlan.from_dict``)."""
        memo = {} if shared is None else shared
        params = {key: memo.setdefault(value, value) if type(value) is str else value
                  for key, value in d["params"].items()}
        return cls(d["job_id"], _KINDS[d["kind"]], d["chunk"], tuple(d["deps"]), params)


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """One video: its name, where it came from and the jobs that render it, in plan order."""

    batch_id: str
    name: str
    source: str
    sha256: str
    priority: int
    total_frames: int
    frames_per_chunk: int
    jobs: tuple[JobSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "jobs"}
        d["jobs"] = [j.to_dict() for j in self.jobs]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BatchPlan:
        """The jobs of a plan repeat its prompts and each chunk's paths. ``plan_batch``
        shares those strings; a decoded plan would hold a copy per job (measured: over a
        quarter of a replayed store's memory), so the jobs share them again here."""
        scalars = {k: v for k, v in d.items() if k != "jobs"}
        shared: dict[str, str] = {}
        return cls(**scalars, jobs=tuple(JobSpec.from_dict(j, shared) for j in d["jobs"]))


def job_id(batch_id: str, kind: JobKind, chunk: int) -> str:
    """``b0003/H2``: readable in logs, unique across batches, sortable within one."""
    return f"{batch_id}/{kind.value[0]}{chunk}"
