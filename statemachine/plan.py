"""What the planner produces: a batch plan of jobs with their dependencies and parameters.

A plan is plain data. The ``batch_accepted`` event records only what the plan is made
from (the batch's own values, ``params``, once) and :func:`lay_out` makes its jobs from
them, on the first planning and on every replay alike, so a plan of a thousand chunks
takes one short log line instead of a thousand copies of its prompts. The layout is part
of the log's schema: change it only with a new schema version (and an upcaster).
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

SAFE_NAME_CHARS = 80


class JobKind(StrEnum):
    HIGH = "HIGH"
    LOW = "LOW"
    COMBINE = "COMBINE"

    @property
    def renders(self) -> bool:
        """HIGH and LOW jobs render; COMBINE jobs only join finished chunks."""
        return self is not JobKind.COMBINE


_KINDS = {kind.value: kind for kind in JobKind}  # JobKind(value) without Enum's call
_SCALARS = ("batch_id", "name", "source", "sha256", "priority", "total_frames",
            "frames_per_chunk")
BATCH_PARAMS = ("name", "positive", "negative", "seed", "width", "height")


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


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """One video: its name, where it came from and the jobs that render it, in plan order.

    ``params`` are the values every job of the batch shares (:data:`BATCH_PARAMS`);
    ``file_id`` is the spool file's inode, size and mtime (ns) as read, which tells the
    file a crash left in ``incoming/`` (its batch recorded, the file not yet moved) from a
    new copy of the same content."""

    batch_id: str
    name: str
    source: str
    sha256: str
    priority: int
    total_frames: int
    frames_per_chunk: int
    params: dict[str, Any]
    jobs: tuple[JobSpec, ...]
    file_id: tuple[int, int, int] | None = None

    @classmethod
    def make(cls, *, batch_id: str, name: str, source: str, sha256: str, priority: int,
             total_frames: int, frames_per_chunk: int, params: dict[str, Any],
             file_id: tuple[int, int, int] | None = None) -> BatchPlan:
        """The plan with its jobs laid out."""
        own = {key: params[key] for key in BATCH_PARAMS}
        return cls(batch_id, name, source, sha256, priority, total_frames, frames_per_chunk,
                   own, lay_out(batch_id, own, total_frames, frames_per_chunk), file_id)

    def to_dict(self) -> dict[str, Any]:
        """The recorded form: the scalars and ``params``, no jobs (``from_dict`` lays them
        out again)."""
        d: dict[str, Any] = {key: getattr(self, key) for key in _SCALARS}
        d["params"] = dict(self.params)
        d["file_id"] = self.file_id
        return d

    @classmethod
    def inputs_only(cls, d: dict[str, Any]) -> BatchPlan:
        """The plan of ``d`` without its jobs laid out (a done batch needs none)."""
        file_id = d["file_id"]
        return cls(**{key: d[key] for key in _SCALARS}, params=d["params"], jobs=(),
                   file_id=None if file_id is None else tuple(file_id))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BatchPlan:
        file_id = d["file_id"]
        return cls.make(**{key: d[key] for key in _SCALARS}, params=d["params"],
                        file_id=None if file_id is None else tuple(file_id))


def upcast_v1(d: dict[str, Any]) -> dict[str, Any]:
    """A version-1 plan (every job listed with its full parameters) in today's form: its
    scalars, and the batch's own values taken from its first job. The jobs laid out from
    them equal the listed ones (tested on a log that version wrote)."""
    first = d["jobs"][0]["params"]
    return {**{key: d[key] for key in _SCALARS},
            "params": {key: first[key] for key in BATCH_PARAMS}, "file_id": None}


def job_id(batch_id: str, kind: JobKind, chunk: int) -> str:
    """``b0003/H2``: readable in logs, unique across batches, sortable within one."""
    return f"{batch_id}/{kind.value[0]}{chunk}"


def safe_name(name: str) -> str:
    """The form of a video name used in paths: one harmless path component.

    Letters and digits (any script), ``-``, ``_`` and ``.`` stay; anything else, and any
    run of dots, becomes ``_``; leading dots and underscores go; at most 80 characters;
    ``"video"`` when nothing is left. So no name can leave its batch directory.
    """
    normal = unicodedata.normalize("NFC", name)
    kept = "".join(c if c.isalnum() or c in "-_." else "_" for c in normal)
    cleaned = re.sub(r"\.{2,}", "_", kept).lstrip("._")[:SAFE_NAME_CHARS]
    return cleaned or "video"


# --- the layout -----------------------------------------------------------------------


def lay_out(batch_id: str, params: dict[str, Any], total: int, size: int
            ) -> tuple[JobSpec, ...]:
    """The batch's jobs, in plan order: H1, L1, H2, L2, ..., C1, C2, .... Every job of a
    chunk shares the chunk's params (the batch's strings are shared, not copied)."""
    chunks = math.ceil(total / size)
    stem = safe_name(params["name"])
    directory = f"{batch_id}-{stem}"
    common = {**params, "chunks": chunks, "final_path": f"{directory}/{stem}.mp4"}
    by_chunk = {k: _chunk_params(common, directory, k, size, total)
                for k in range(1, chunks + 1)}
    order = [(kind, k) for k in by_chunk for kind in (JobKind.HIGH, JobKind.LOW)]
    order += [(JobKind.COMBINE, k) for k in by_chunk]
    return tuple(_job(batch_id, directory, kind, k, by_chunk[k]) for kind, k in order)


def _artifact_paths(directory: str, k: int) -> dict[str, str | None]:
    """Paths relative to the artifact root; LOW(k) writes ref k, HIGH(k+1) reads it."""
    previous = k - 1
    return {
        "latent_path": f"{directory}/latent/chunk_{k:03}.latent",
        "ref_image_path": f"{directory}/ref/chunk_{k:03}.png",
        "prev_ref_image_path": f"{directory}/ref/chunk_{previous:03}.png" if previous else None,
        "chunk_video_path": f"{directory}/chunks/chunk_{k:03}.mp4",
        "combined_path": f"{directory}/combined/combined_{k:03}.mp4",
        "prev_combined_path": (f"{directory}/combined/combined_{previous:03}.mp4"
                               if previous else None),
    }


def _chunk_params(common: dict[str, Any], directory: str, k: int, size: int,
                  total: int) -> dict[str, Any]:
    start = (k - 1) * size
    return {**common, **_artifact_paths(directory, k), "chunk": k, "start_frame": start,
            "frames": min(size, total - start)}


def _job(batch_id: str, directory: str, kind: JobKind, k: int,
         chunk_params: dict[str, Any]) -> JobSpec:
    """Only ``output_prefix`` is a job's own."""
    prefix = f"{directory}/{kind.value.lower()}_{k:03}"
    return JobSpec(job_id=job_id(batch_id, kind, k), kind=kind, chunk=k,
                   deps=_deps(batch_id, kind, k),
                   params={**chunk_params, "output_prefix": prefix})


def _deps(batch_id: str, kind: JobKind, k: int) -> tuple[str, ...]:
    """LOW(k) <- HIGH(k); HIGH(k) <- LOW(k-1); COMBINE(k) <- LOW(k), COMBINE(k-1)."""
    if kind is JobKind.LOW:
        return (job_id(batch_id, JobKind.HIGH, k),)
    if kind is JobKind.HIGH:
        return (job_id(batch_id, JobKind.LOW, k - 1),) if k > 1 else ()
    previous = (job_id(batch_id, JobKind.COMBINE, k - 1),) if k > 1 else ()
    return (job_id(batch_id, JobKind.LOW, k), *previous)
