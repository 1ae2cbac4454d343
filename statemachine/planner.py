"""Prompt file -> batch plan: parse and check the file, split the video into chunks, and
lay out the HIGH/LOW/COMBINE jobs with their dependencies, parameters and artifact paths.

Two file forms are accepted (see DESIGN.md):

* the seed's blocks form: blocks separated by blank lines -- name, frame count, the
  positive prompt (it may span several paragraphs) and, when there are four or more
  blocks, the negative prompt as the last block;
* a ``*.toml`` file with the keys of :class:`PromptSpec`.

In both, a trailing ``.mp4`` on the name is dropped and the texts are stripped.

Everything a person can get wrong is refused with :class:`BadInput` and a reason that says
what to fix. No I/O here: callers pass the file's bytes.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
import tomllib
import unicodedata
from dataclasses import dataclass
from typing import Any, Protocol

from statemachine.errors import BadInput
from statemachine.plan import BatchPlan, JobKind, JobSpec, job_id

MAX_FILE_BYTES = 1_048_576
MAX_NAME_CHARS = 200
SAFE_NAME_CHARS = 80
SIZE_MIN, SIZE_MAX, SIZE_STEP = 16, 8192, 16
SIZE_RULE = f"a multiple of {SIZE_STEP} from {SIZE_MIN} to {SIZE_MAX}"
SEED_MAX = 2**64 - 1

_BLOCKS_EXPECTED = "expected name, frame count, positive prompt and optionally a negative prompt"
_TOML_TEXT_KEYS = ("name", "positive", "negative")
_TOML_INT_KEYS = ("frames", "seed", "frames_per_chunk", "width", "height", "priority")
_TOML_REQUIRED = ("name", "frames", "positive")
_LINE_CONTROL = frozenset({"Cc", "Cs", "Zl", "Zp"})


def valid_size(value: int) -> bool:
    """Whether a width or height suits Wan: a multiple of 16 within the sane range."""
    return SIZE_MIN <= value <= SIZE_MAX and value % SIZE_STEP == 0


@dataclass(frozen=True, slots=True)
class PromptSpec:
    """One checked prompt file. ``None`` means "use the configured default"."""

    name: str
    frames: int
    positive: str
    negative: str = ""
    seed: int | None = None
    frames_per_chunk: int | None = None
    width: int | None = None
    height: int | None = None
    priority: int = 0


class PlanDefaults(Protocol):
    """The settings :func:`plan_prompt_file` reads (``config.Settings`` has them)."""

    frames_per_chunk: int
    max_frames: int
    default_width: int
    default_height: int


# --- parsing ------------------------------------------------------------------------------


def parse_prompt_file(data: bytes, filename: str, *, max_frames: int) -> PromptSpec:
    """Parse and check one prompt file; ``filename`` ending in ``.toml`` selects TOML."""
    text = _decode(data)
    is_toml = filename.lower().endswith(".toml")
    fields = _toml_fields(text) if is_toml else _block_fields(text)
    return _checked_spec(fields, max_frames)


def _decode(data: bytes) -> str:
    if len(data) > MAX_FILE_BYTES:
        raise BadInput(f"file is too large: {len(data):,} bytes; the limit is "
                       f"{MAX_FILE_BYTES:,} bytes (1 MiB)")
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise BadInput(f"file is not UTF-8 text: invalid byte 0x{data[exc.start]:02x} at byte "
                       f"offset {exc.start}; save it as UTF-8") from None
    if not text.strip():
        raise BadInput("file is empty: expected a name, a frame count and a positive prompt")
    return text


def _split_blocks(text: str) -> list[str]:
    """Blocks of non-blank lines; any run of blank (or whitespace-only) lines separates."""
    blocks: list[list[str]] = [[]]
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line.strip():
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    return ["\n".join(lines).strip() for lines in blocks if lines]


def _block_fields(text: str) -> dict[str, Any]:
    blocks = _split_blocks(text)
    if len(blocks) < 3:
        plural = "block" if len(blocks) == 1 else "blocks"
        raise BadInput(f"found {len(blocks)} {plural} separated by blank lines; {_BLOCKS_EXPECTED}")
    prompts = blocks[2:-1] if len(blocks) >= 4 else blocks[2:]
    return {"name": blocks[0], "frames": blocks[1],
            "positive": "\n\n".join(prompts),
            "negative": blocks[-1] if len(blocks) >= 4 else ""}


def _toml_fields(text: str) -> dict[str, Any]:
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"TOML syntax error: {exc}") from None
    known = (*_TOML_TEXT_KEYS, *_TOML_INT_KEYS)
    for key in table:
        if key not in known:
            raise BadInput(f"unknown key {key!r}{_suggestion(key, known)}; "
                           f"allowed keys: {', '.join(known)}")
    missing = [key for key in _TOML_REQUIRED if key not in table]
    if missing:
        raise BadInput(f"missing key(s): {', '.join(missing)}; required: "
                       f"{', '.join(_TOML_REQUIRED)}")
    for key, value in table.items():
        _check_toml_type(key, value)
    return table


def _check_toml_type(key: str, value: Any) -> None:
    if key in _TOML_TEXT_KEYS and not isinstance(value, str):
        raise BadInput(f"{key!r} must be a string, got {type(value).__name__} {_quote(value)}")
    if key in _TOML_INT_KEYS and (isinstance(value, bool) or not isinstance(value, int)):
        raise BadInput(f"{key!r} must be an integer, got {type(value).__name__} {_quote(value)}")


def _suggestion(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key.lower(), known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _quote(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- checking -----------------------------------------------------------------------------


def _checked_spec(fields: dict[str, Any], max_frames: int) -> PromptSpec:
    spec = PromptSpec(name=_checked_name(fields["name"]),
                      frames=_checked_frames(fields["frames"], max_frames),
                      positive=fields["positive"].strip(),
                      negative=fields.get("negative", "").strip(),
                      seed=fields.get("seed"),
                      frames_per_chunk=fields.get("frames_per_chunk"),
                      width=fields.get("width"), height=fields.get("height"),
                      priority=fields.get("priority", 0))
    if not spec.positive:
        raise BadInput("the positive prompt is empty: say what the video should show")
    _check_optional_ranges(spec, max_frames)
    return spec


def _checked_name(raw: str) -> str:
    name = raw.strip()
    if name.lower().endswith(".mp4"):
        name = name[:-4].strip()
    if not name:
        raise BadInput("the video name is empty: the first block (or 'name') must name the video")
    if len(name) > MAX_NAME_CHARS:
        raise BadInput(f"the video name is {len(name)} characters long; the limit is "
                       f"{MAX_NAME_CHARS}")
    for pos, char in enumerate(name):
        if unicodedata.category(char) in _LINE_CONTROL:
            hint = " (is a blank line missing after the name?)" if char == "\n" else ""
            raise BadInput(f"the video name {_quote(name)} contains a control character "
                           f"U+{ord(char):04X} at position {pos}; a name must be one line of "
                           f"printable text{hint}")
    return name


def _checked_frames(value: int | str, max_frames: int) -> int:
    """``value`` is the TOML integer, or the text of block 2 (checked after the name)."""
    frames = _frames_from_text(value) if isinstance(value, str) else value
    if frames < 1:
        raise BadInput(f"the frame count is {frames}, not a positive integer")
    if frames > max_frames:
        raise BadInput(f"the frame count {frames} is above the limit of {max_frames} frames "
                       f"(MAX_FRAMES)")
    return frames


def _frames_from_text(block: str) -> int:
    if not re.fullmatch(r"[0-9]+", block, re.ASCII):
        raise BadInput(f"the frame count (block 2) is {_quote(block)}, not a positive integer")
    return int(block)


def _check_optional_ranges(spec: PromptSpec, max_frames: int) -> None:
    size_rule = f"{SIZE_RULE} (Wan needs sizes divisible by {SIZE_STEP})"
    rules = (("seed", lambda v: 0 <= v <= SEED_MAX, f"0 to {SEED_MAX}"),
             ("frames_per_chunk", lambda v: 1 <= v <= max_frames, f"1 to {max_frames}"),
             ("width", valid_size, size_rule), ("height", valid_size, size_rule))
    for key, ok, allowed in rules:
        value = getattr(spec, key)
        if value is not None and not ok(value):
            raise BadInput(f"{key} = {value} is out of range; use {allowed}")


# --- paths --------------------------------------------------------------------------------


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


# --- planning -----------------------------------------------------------------------------


def plan_batch(spec: PromptSpec, *, batch_id: str, sha256: str, source: str,
               frames_per_chunk: int, width: int, height: int) -> BatchPlan:
    """Split ``spec`` into chunks and lay out its jobs: H1, L1, H2, L2, ..., C1, C2, ....

    The spec's own seed, chunk size, width and height win over the defaults passed in; with
    no seed in the spec it is derived from the file's sha256, so a replayed plan is equal.
    """
    if safe_name(batch_id) != batch_id:
        raise ValueError(f"batch id {batch_id!r} is not a safe path component")
    size = _pick(spec.frames_per_chunk, frames_per_chunk)
    chunks = math.ceil(spec.frames / size)
    stem = safe_name(spec.name)
    directory = f"{batch_id}-{stem}"
    common = {"name": spec.name, "positive": spec.positive, "negative": spec.negative,
              "seed": _pick(spec.seed, int(sha256[:16], 16)),
              "width": _pick(spec.width, width), "height": _pick(spec.height, height),
              "chunks": chunks, "final_path": f"{directory}/{stem}.mp4"}
    params = {k: _chunk_params(common, directory, k, size, spec.frames)
              for k in range(1, chunks + 1)}
    order = [(kind, k) for k in params for kind in (JobKind.HIGH, JobKind.LOW)]
    order += [(JobKind.COMBINE, k) for k in params]
    jobs = tuple(_job(batch_id, directory, kind, k, params[k]) for kind, k in order)
    return BatchPlan(batch_id=batch_id, name=spec.name, source=source, sha256=sha256,
                     priority=spec.priority, total_frames=spec.frames, frames_per_chunk=size,
                     jobs=jobs)


def _chunk_params(common: dict[str, Any], directory: str, k: int, size: int,
                  total: int) -> dict[str, Any]:
    start = (k - 1) * size
    return {**common, **_artifact_paths(directory, k), "chunk": k, "start_frame": start,
            "frames": min(size, total - start)}


def _pick(own: int | None, default: int) -> int:
    return default if own is None else own


def _job(batch_id: str, directory: str, kind: JobKind, k: int,
         chunk_params: dict[str, Any]) -> JobSpec:
    """Every job of a chunk shares the chunk's params; only ``output_prefix`` is its own."""
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


def plan_prompt_file(data: bytes, filename: str, *, batch_id: str,
                     settings: PlanDefaults) -> BatchPlan:
    """Parse ``data`` and plan it with the configured defaults; ``source`` = ``filename``."""
    spec = parse_prompt_file(data, filename, max_frames=settings.max_frames)
    return plan_batch(spec, batch_id=batch_id, sha256=hashlib.sha256(data).hexdigest(),
                      source=filename, frames_per_chunk=settings.frames_per_chunk,
                      width=settings.default_width, height=settings.default_height)
