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
from statemachine.plan import BatchPlan, safe_name

MAX_FILE_BYTES = 1_048_576  # the defaults of the settings of the same names
MAX_PROMPT_CHARS = 10_000
MIN_FRAMES_PER_CHUNK = 5  # Wan renders 4n+1 frames: a chunk below 5 is no chunk
FRAME_DIGITS = 12  # a frame count is read as a number only up to this many digits
MAX_NAME_CHARS = 200
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


@dataclass(frozen=True, slots=True)
class Limits:
    """What one prompt file may ask for (the settings of the same names)."""

    max_file_bytes: int = MAX_FILE_BYTES
    max_frames: int = 100_000
    max_prompt_chars: int = MAX_PROMPT_CHARS


class PlanDefaults(Protocol):
    """The settings :func:`plan_prompt_file` reads (``config.Settings`` has them)."""

    # Read-only members: frozen dataclasses such as ``config.Settings`` satisfy them.
    @property
    def frames_per_chunk(self) -> int: ...

    @property
    def max_frames(self) -> int: ...

    @property
    def max_file_bytes(self) -> int: ...

    @property
    def max_prompt_chars(self) -> int: ...

    @property
    def max_chunks(self) -> int: ...

    @property
    def default_width(self) -> int: ...

    @property
    def default_height(self) -> int: ...


# --- parsing ------------------------------------------------------------------------------


def parse_prompt_file(data: bytes, filename: str, limits: Limits = Limits()) -> PromptSpec:
    """Parse and check one prompt file; ``filename`` ending in ``.toml`` selects TOML."""
    text = _decode(data, limits.max_file_bytes)
    is_toml = filename.lower().endswith(".toml")
    fields = _toml_fields(text) if is_toml else _block_fields(text)
    return _checked_spec(fields, limits)


def _decode(data: bytes, max_bytes: int) -> str:
    if len(data) > max_bytes:
        raise BadInput(f"file is too large: {len(data):,} bytes; the limit is "
                       f"{max_bytes:,} bytes (MAX_FILE_BYTES)")
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
    except RecursionError:
        raise BadInput("TOML nests arrays or tables too deeply to be read") from None
    except ValueError as exc:  # an integer of thousands of digits, say
        raise BadInput(f"TOML value cannot be read: {exc}") from None
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


def _checked_spec(fields: dict[str, Any], limits: Limits) -> PromptSpec:
    spec = PromptSpec(name=_checked_name(fields["name"]),
                      frames=_checked_frames(fields["frames"], limits.max_frames),
                      positive=_checked_prompt("positive", fields["positive"],
                                               limits.max_prompt_chars),
                      negative=_checked_prompt("negative", fields.get("negative", ""),
                                               limits.max_prompt_chars),
                      seed=fields.get("seed"),
                      frames_per_chunk=fields.get("frames_per_chunk"),
                      width=fields.get("width"), height=fields.get("height"),
                      priority=fields.get("priority", 0))
    if not spec.positive:
        raise BadInput("the positive prompt is empty: say what the video should show")
    _check_optional_ranges(spec, limits.max_frames)
    return spec


def _checked_prompt(which: str, raw: str, max_chars: int) -> str:
    text = raw.strip()
    if len(text) > max_chars:
        raise BadInput(f"the {which} prompt is {len(text):,} characters long; the limit is "
                       f"{max_chars:,} (MAX_PROMPT_CHARS)")
    return text


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
    if len(block) > FRAME_DIGITS:
        raise BadInput(f"the frame count (block 2) has {len(block):,} digits; a frame count "
                       f"has at most {FRAME_DIGITS}")
    return int(block)


def _check_optional_ranges(spec: PromptSpec, max_frames: int) -> None:
    size_rule = f"{SIZE_RULE} (Wan needs sizes divisible by {SIZE_STEP})"
    rules = (("seed", lambda v: 0 <= v <= SEED_MAX, f"0 to {SEED_MAX}"),
             ("frames_per_chunk", lambda v: MIN_FRAMES_PER_CHUNK <= v <= max_frames,
              f"{MIN_FRAMES_PER_CHUNK} to {max_frames} (Wan renders 4n+1 frames)"),
             ("width", valid_size, size_rule), ("height", valid_size, size_rule))
    for key, ok, allowed in rules:
        value = getattr(spec, key)
        if value is not None and not ok(value):
            raise BadInput(f"{key} = {value} is out of range; use {allowed}")


# --- planning -----------------------------------------------------------------------------


def plan_batch(spec: PromptSpec, *, batch_id: str, sha256: str, source: str,
               frames_per_chunk: int, width: int, height: int) -> BatchPlan:
    """Split ``spec`` into chunks and lay out its jobs (``statemachine.plan.lay_out``).

    The spec's own seed, chunk size, width and height win over the defaults passed in; with
    no seed in the spec it is derived from the file's sha256, so a replayed plan is equal.
    """
    if safe_name(batch_id) != batch_id:
        raise ValueError(f"batch id {batch_id!r} is not a safe path component")
    params = {"name": spec.name, "positive": spec.positive, "negative": spec.negative,
              "seed": _pick(spec.seed, int(sha256[:16], 16)),
              "width": _pick(spec.width, width), "height": _pick(spec.height, height)}
    return BatchPlan.make(batch_id=batch_id, name=spec.name, source=source, sha256=sha256,
                          priority=spec.priority, total_frames=spec.frames,
                          frames_per_chunk=_pick(spec.frames_per_chunk, frames_per_chunk),
                          params=params)


def _pick(own: int | None, default: int) -> int:
    return default if own is None else own


def _check_chunks(spec: PromptSpec, default_size: int, max_chunks: int) -> None:
    size = _pick(spec.frames_per_chunk, default_size)
    chunks = math.ceil(spec.frames / size)
    if chunks > max_chunks:
        raise BadInput(f"{spec.frames} frames in chunks of {size} make {chunks:,} chunks; "
                       f"the limit is {max_chunks:,} per video (MAX_CHUNKS): use fewer frames "
                       f"or a larger frames_per_chunk")


def plan_prompt_file(data: bytes, filename: str, *, batch_id: str,
                     settings: PlanDefaults) -> BatchPlan:
    """Parse ``data`` and plan it with the configured defaults; ``source`` = ``filename``."""
    spec = parse_prompt_file(data, filename, limits_of(settings))
    _check_chunks(spec, settings.frames_per_chunk, settings.max_chunks)
    return plan_batch(spec, batch_id=batch_id, sha256=hashlib.sha256(data).hexdigest(),
                      source=filename, frames_per_chunk=settings.frames_per_chunk,
                      width=settings.default_width, height=settings.default_height)


def limits_of(settings: PlanDefaults) -> Limits:
    return Limits(max_file_bytes=settings.max_file_bytes, max_frames=settings.max_frames,
                  max_prompt_chars=settings.max_prompt_chars)
