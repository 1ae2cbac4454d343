"""Files that go from one job to the next, and the finished video brought home.

ComfyUI names every file it writes (``high_001_00001_.latent``: the prefix plus a
counter) and reports the names in the job's history outputs, which ``job_succeeded``
records. So a job that reads a file another job wrote learns its name at dispatch time:

1. Its workflow binds an artifact parameter (``latent_path``); the planner gives producer
   and reader the same planned path, and the producer's workflow says which output node
   writes it (``[produces] latent_path = "11"``). The file that node reported is the one.
2. The name the receiving server knows that file by depends on ``ARTIFACT_TRANSFER``:

   - the server that wrote it, or ``"path"`` (all servers write to one shared output
     directory): ``"<subfolder>/<file> [output]"``, ComfyUI's annotation for "in my
     output directory", which LoadImage, LoadLatent and LoadVideo (and VHS) accept;
   - ``"http"``, another server: the daemon downloads the file (``/view``) and uploads it
     (``/upload/image``) into the receiver's input directory under the same subfolder and
     name before posting the job, which then reads ``"<subfolder>/<file>"``.

Resolution is pure (the loop runs it); the copying runs on the agents' HTTP threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instances.workflow import Workflow
from statemachine.durable import write_atomic
from statemachine.errors import ComfyDualError, PermanentDispatchError
from statemachine.job import Job
from statemachine.plan import JobKind


class ArtifactMissing(PermanentDispatchError):
    """A dependency reported no file for an artifact the job reads: no retry can help."""


class TransferFailed(ComfyDualError):
    """A file could not be copied from the server that wrote it; the job is retried (the
    receiving instance is not to blame)."""


@dataclass(frozen=True, slots=True)
class OutputFile:
    """One file as ComfyUI reports it: ``{"filename", "subfolder", "type"}``."""

    filename: str
    subfolder: str = ""
    type: str = "output"

    @classmethod
    def from_entry(cls, entry: Any) -> OutputFile | None:
        if not isinstance(entry, Mapping) or not entry.get("filename"):
            return None
        return cls(str(entry["filename"]), str(entry.get("subfolder") or ""),
                   str(entry.get("type") or "output"))

    @property
    def relative(self) -> str:
        """``subfolder/filename``: the name in the directory of its ``type``."""
        return f"{self.subfolder}/{self.filename}" if self.subfolder else self.filename

    @property
    def annotated(self) -> str:
        """``subfolder/filename [output]``: the name any node loading files resolves in
        the directory of its ``type`` instead of the input directory."""
        return f"{self.relative} [{self.type}]"


def output_files(outputs: Mapping[str, Any] | None, node: str | None = None
                 ) -> list[OutputFile]:
    """The files ComfyUI reported (of one node, or of all), in report order.

    Nodes list files under keys of their own (``images``, ``latents``, VHS ``gifs``...),
    so every list of ``{"filename", ...}`` entries counts.
    """
    nodes = [(outputs or {}).get(node)] if node is not None else (outputs or {}).values()
    found = []
    for entry in nodes:
        for items in entry.values() if isinstance(entry, Mapping) else ():
            for item in items if isinstance(items, list) else ():
                if (file := OutputFile.from_entry(item)) is not None:
                    found.append(file)
    return found


def unwritten_artifacts(workflow: Workflow, outputs: Mapping[str, Any] | None) -> list[str]:
    """``artifact (node N)`` for each file the workflow produces that ``outputs`` lack."""
    return [f"{artifact} (node {node})" for artifact, node in workflow.produces.items()
            if not output_files(outputs, node)]


def final_files(outputs: Mapping[str, Any] | None) -> list[OutputFile]:
    """What a batch delivers: the saved (not preview) files of its last COMBINE, those
    with a name that can be a file of its own here."""
    return [f for f in output_files(outputs)
            if f.type == "output" and Path(f.filename).name not in ("", ".", "..")]


# --- resolving a job's input files --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Upload:
    """Copy ``file`` from instance ``source`` into the receiver's input directory."""

    source: str
    file: OutputFile


@dataclass(frozen=True, slots=True)
class Resolved:
    """A job's parameters with input files named as its server knows them, and the copies
    to make before posting it."""

    params: dict[str, Any]
    uploads: tuple[Upload, ...]


def resolve_inputs(job: Job, deps: Iterable[Job], workflows: Mapping[JobKind, Workflow], *,
                   target: str, transfer: str) -> Resolved:
    """``job``'s parameters for a post to instance ``target``: every bound artifact
    parameter a dependency produced becomes the name of the file it reported.

    Raises ArtifactMissing when the producing job reported no file for its output node.
    """
    planned = job.spec.params
    params = dict(planned)
    uploads: dict[OutputFile, Upload] = {}
    reader = workflows[job.kind]
    for dep in deps:
        for artifact, node in workflows[dep.kind].produces.items():
            path = dep.spec.params.get(artifact)
            readers = [p for p, v in planned.items()
                       if path is not None and v == path and reader.binds(p)]
            if not readers:
                continue
            file = _produced(dep, artifact, node, job)
            local = dep.instance_id == target or transfer == "path"
            for param in readers:
                params[param] = file.annotated if local else file.relative
            if not local:
                uploads[file] = Upload(str(dep.instance_id), file)
    return Resolved(params, tuple(uploads.values()))


def _produced(dep: Job, artifact: str, node: str, reader: Job) -> OutputFile:
    files = output_files(dep.outputs, node)
    if not files:
        raise ArtifactMissing(
            f"{reader.job_id} reads {artifact} from {dep.job_id}, whose node {node} reported "
            f"no file (its outputs: {str(dep.outputs)[:200]})")
    return files[0]


# --- copying (agent threads) --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Handoff:
    """An upload to make before a post, with the way to read the file at its source."""

    upload: Upload
    fetch: Callable[[], bytes]

    def deliver(self, store: Callable[[bytes, str, str], Mapping[str, Any]]) -> None:
        """Fetch the file from the server that wrote it and ``store`` it on the receiver
        (``ComfyClient.upload``: data, filename, subfolder). A failed fetch raises
        TransferFailed; a failed store raises whatever the receiver's client raised."""
        file = self.upload.file
        try:
            data = self.fetch()
        except ComfyDualError as exc:
            raise TransferFailed(f"cannot fetch {file.relative} from {self.upload.source} to "
                                 f"hand it on: {exc}") from exc
        stored = store(data, file.filename, file.subfolder)
        if (stored.get("subfolder") or "", stored.get("name")) != (file.subfolder,
                                                                  file.filename):
            raise TransferFailed(f"uploaded {file.relative}, but the server stored it as "
                                 f"{stored.get('subfolder')}/{stored.get('name')}")


def local_path(outputs_dir: Path, batch_id: str, file: OutputFile) -> Path:
    """Where a final output of ``batch_id`` is saved: ``<outputs_dir>/<batch_id>/<name>``
    (``file`` one of :func:`final_files`; any directory part of its name is dropped)."""
    return outputs_dir / batch_id / Path(file.filename).name


def save_files(files: Sequence[OutputFile], fetch: Callable[[OutputFile], bytes],
               outputs_dir: Path, batch_id: str) -> list[Path]:
    """Download ``files`` into ``outputs_dir/<batch_id>/``; each appears whole or not at
    all (written aside, then renamed). Returns the paths written."""
    saved = []
    for file in files:
        target = local_path(outputs_dir, batch_id, file)
        data = fetch(file)
        write_atomic(target, data, tmp=target.with_name(f".{target.name}.part"), fsync=False,
                     make_dirs=True)
        saved.append(target)
    return saved
