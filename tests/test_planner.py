"""The planner: prompt files in both forms, every rejection, chunking, dependencies, paths."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statemachine.errors import BadInput
from statemachine.plan import BatchPlan, JobKind, safe_name
from statemachine.planner import (
    MAX_FILE_BYTES,
    Limits,
    PromptSpec,
    parse_prompt_file,
    plan_batch,
    plan_prompt_file,
)

SEED_FILE = b"sunset_beach\n\n500\n\nA beautiful sunset over the sea\n\nblurry, low quality\n"
SHA = hashlib.sha256(b"x").hexdigest()
PATH_KEYS = ("latent_path", "ref_image_path", "prev_ref_image_path", "chunk_video_path",
             "combined_path", "prev_combined_path", "final_path", "output_prefix")


@dataclass(frozen=True)
class FakeSettings:
    frames_per_chunk: int = 101
    max_frames: int = 100_000
    max_file_bytes: int = MAX_FILE_BYTES
    max_prompt_chars: int = 10_000
    max_chunks: int = 1_000
    default_width: int = 832
    default_height: int = 480


def parse(text: str | bytes, filename: str = "p.txt", max_frames: int = 100_000) -> PromptSpec:
    data = text.encode() if isinstance(text, str) else text
    return parse_prompt_file(data, filename, Limits(max_frames=max_frames))


def plan(frames: int, size: int = 101, name: str = "v", batch_id: str = "b1") -> BatchPlan:
    return plan_batch(PromptSpec(name=name, frames=frames, positive="p"), batch_id=batch_id,
                      sha256=SHA, source="s.txt", frames_per_chunk=size, width=832, height=480)


def rejection(text: str | bytes, filename: str = "p.txt", max_frames: int = 100_000) -> str:
    with pytest.raises(BadInput) as info:
        parse(text, filename, max_frames)
    return str(info.value)


# --- the blocks form ----------------------------------------------------------------------


def test_seed_file_parses():
    spec = parse(SEED_FILE)
    assert spec == PromptSpec(name="sunset_beach", frames=500,
                              positive="A beautiful sunset over the sea",
                              negative="blurry, low quality")


def test_crlf_and_cr_line_endings():
    assert parse(SEED_FILE.replace(b"\n", b"\r\n")) == parse(SEED_FILE)
    assert parse(SEED_FILE.replace(b"\n", b"\r")) == parse(SEED_FILE)


def test_trailing_mp4_is_dropped_case_insensitively():
    assert parse("clip.MP4\n\n10\n\npos").name == "clip"
    assert parse("clip.mp4.mp4\n\n10\n\npos").name == "clip.mp4"


def test_multi_paragraph_positive_and_extra_blank_lines():
    text = "\n\n  name  \n\n\n   \n10\n\nline one\nline two\n\n\nparagraph two\n\n  neg  \n\n"
    spec = parse(text)
    assert spec.name == "name"
    assert spec.positive == "line one\nline two\n\nparagraph two"
    assert spec.negative == "neg"


def test_three_blocks_means_no_negative():
    assert parse("n\n\n7\n\npositive only").negative == ""


def test_utf8_bom_is_ignored():
    assert parse(b"\xef\xbb\xbf" + SEED_FILE) == parse(SEED_FILE)


# --- the TOML form ------------------------------------------------------------------------

TOML_FILE = """
name = "toml video.mp4"
frames = 250
positive = '''
first paragraph

second paragraph'''
seed = 42
frames_per_chunk = 50
width = 1280
height = 720
priority = 5
"""


def test_toml_form():
    spec = parse(TOML_FILE, "job.TOML")
    assert spec == PromptSpec(name="toml video", frames=250,
                              positive="first paragraph\n\nsecond paragraph", negative="",
                              seed=42, frames_per_chunk=50, width=1280, height=720, priority=5)


def test_toml_spec_values_override_defaults():
    p = plan_prompt_file(TOML_FILE.encode(), "job.toml", batch_id="b2", settings=FakeSettings())
    assert p.frames_per_chunk == 50 and len(p.jobs) == 15 and p.priority == 5
    assert {(j.params["seed"], j.params["width"], j.params["height"]) for j in p.jobs} == {
        (42, 1280, 720)}


@pytest.mark.parametrize(("text", "reason"), [
    ('name = "a"\nframes = 1\npositive = "p"\nprompt = "x"', "unknown key 'prompt'"),
    ('name = "a"\nframes = 1\npositve = "p"', "did you mean 'positive'?"),
    ('name = "a"\nframes = 1', "missing key(s): positive"),
    ('name = "a"\nframes = "500"\npositive = "p"', "'frames' must be an integer, got str '500'"),
    ('name = "a"\nframes = true\npositive = "p"', "'frames' must be an integer, got bool"),
    ('name = 3\nframes = 1\npositive = "p"', "'name' must be a string, got int 3"),
    ('name = "a"\nframes = 1\npositive = "p"\nwidth = 1.5', "'width' must be an integer"),
    ('name = "a"\nframes = = 1', "TOML syntax error: Invalid value (at line 2, column 10)"),
])
def test_toml_rejections(text, reason):
    assert reason in rejection(text, "f.toml")


# --- rejections with their reasons --------------------------------------------------------


@pytest.mark.parametrize(("text", "reason"), [
    ("", "file is empty"),
    (" \n\r\n\t \n", "file is empty"),
    ("name\n\n500", "found 2 blocks separated by blank lines; expected name, frame count, "
                    "positive prompt and optionally a negative prompt"),
    ("name\n500\npositive", "found 1 block separated by blank lines"),
    ("n\n\nfive hundred\n\np", "the frame count (block 2) is 'five hundred', not a positive "
                               "integer"),
    ("n\n\n-5\n\np", "is '-5', not a positive integer"),
    ("n\n\n5.0\n\np", "is '5.0', not a positive integer"),
    ("n\n\n\u0665\n\np", "not a positive integer"),  # an Arabic-Indic digit five
    ("n\n\n0\n\np", "the frame count is 0, not a positive integer"),
    (".mp4\n\n5\n\np", "the video name is empty"),
    ("a\x00b\n\n5\n\np", "contains a control character U+0000 at position 1"),
    ("a\x1bb\n\n5\n\np", "control character U+001B"),
    ("name\n500\n\nprompt\n\nneg", "U+000A at position 4; a name must be one line of "
                                  "printable text (is a blank line missing after the name?)"),
    ("n" * 201 + "\n\n5\n\np", "the video name is 201 characters long; the limit is 200"),
])
def test_block_rejections(text, reason):
    assert reason in rejection(text)


def test_frames_above_max_frames():
    assert rejection("n\n\n1001\n\np", max_frames=1000) == (
        "the frame count 1001 is above the limit of 1000 frames (MAX_FRAMES)")
    assert parse("n\n\n1000\n\np", max_frames=1000).frames == 1000


def test_too_large_file_names_size_and_limit():
    data = b"n\n\n5\n\n" + b"p" * MAX_FILE_BYTES
    reason = rejection(data)
    assert f"{len(data):,} bytes" in reason and "limit is 1,048,576 bytes" in reason
    edge = b"n\n\n5\n\n" + b"p" * (MAX_FILE_BYTES - 6)
    assert parse_prompt_file(edge, "p.txt", Limits(max_prompt_chars=MAX_FILE_BYTES)).frames == 5


def test_not_utf8_names_offset():
    assert rejection(b"name\n\n5\n\nbad \xff here") == (
        "file is not UTF-8 text: invalid byte 0xff at byte offset 13; save it as UTF-8")


def test_empty_positive_prompt():
    assert "the positive prompt is empty" in rejection(
        'name = "a"\nframes = 5\npositive = "  \\n "', "f.toml")


@pytest.mark.parametrize(("line", "reason"), [
    ("seed = -1", "seed = -1 is out of range; use 0 to 18446744073709551615"),
    ("frames_per_chunk = 4", "frames_per_chunk = 4 is out of range; use 5 to 100000"),
    ("frames_per_chunk = 100001", "frames_per_chunk = 100001 is out of range"),
    ("width = 100", "width = 100 is out of range; use a multiple of 16 from 16 to 8192"),
    ("width = 0", "width = 0 is out of range"),
    ("height = 8208", "height = 8208 is out of range"),
])
def test_optional_values_out_of_range(line, reason):
    assert reason in rejection(f'name = "a"\nframes = 5\npositive = "p"\n{line}', "f.toml")


def test_optional_values_at_range_edges_are_accepted():
    text = ('name = "a"\nframes = 5\npositive = "p"\nseed = 0\nframes_per_chunk = 100000\n'
            'width = 16\nheight = 8192')
    assert parse(text, "f.toml").height == 8192


# --- chunking and dependencies ------------------------------------------------------------


def test_500_frames_full_plan():
    p = plan_prompt_file(SEED_FILE, "sunset.txt", batch_id="b7", settings=FakeSettings())
    ids = [j.job_id for j in p.jobs]
    assert ids == ["b7/H1", "b7/L1", "b7/H2", "b7/L2", "b7/H3", "b7/L3", "b7/H4", "b7/L4",
                   "b7/H5", "b7/L5", "b7/C1", "b7/C2", "b7/C3", "b7/C4", "b7/C5"]
    assert {j.job_id: j.deps for j in p.jobs} == {
        "b7/H1": (), "b7/L1": ("b7/H1",),
        "b7/H2": ("b7/L1",), "b7/L2": ("b7/H2",),
        "b7/H3": ("b7/L2",), "b7/L3": ("b7/H3",),
        "b7/H4": ("b7/L3",), "b7/L4": ("b7/H4",),
        "b7/H5": ("b7/L4",), "b7/L5": ("b7/H5",),
        "b7/C1": ("b7/L1",), "b7/C2": ("b7/L2", "b7/C1"), "b7/C3": ("b7/L3", "b7/C2"),
        "b7/C4": ("b7/L4", "b7/C3"), "b7/C5": ("b7/L5", "b7/C4"),
    }
    assert sum(j.kind.renders for j in p.jobs) == 10
    assert [j.kind for j in p.jobs].count(JobKind.COMBINE) == 5
    highs = [j.params for j in p.jobs if j.kind is JobKind.HIGH]
    assert [h["frames"] for h in highs] == [101, 101, 101, 101, 96]
    assert [h["start_frame"] for h in highs] == [0, 101, 202, 303, 404]
    assert (p.total_frames, p.frames_per_chunk, p.name, p.source) == (
        500, 101, "sunset_beach", "sunset.txt")
    assert p.sha256 == hashlib.sha256(SEED_FILE).hexdigest()


@pytest.mark.parametrize(("frames", "counts"), [(101, [101]), (102, [101, 1]), (1, [1])])
def test_chunk_edges(frames, counts):
    p = plan(frames)
    assert [j.params["frames"] for j in p.jobs if j.kind is JobKind.LOW] == counts
    assert len(p.jobs) == 3 * len(counts)


def test_params_of_a_chunk():
    p = plan_prompt_file(SEED_FILE, "s.txt", batch_id="b7", settings=FakeSettings())
    h2, l2, c2 = (next(j for j in p.jobs if j.job_id == f"b7/{x}2") for x in "HLC")
    assert h2.params == {
        "name": "sunset_beach", "positive": "A beautiful sunset over the sea",
        "negative": "blurry, low quality", "seed": int(p.sha256[:16], 16),
        "width": 832, "height": 480, "chunk": 2, "chunks": 5, "start_frame": 101,
        "frames": 101,
        "latent_path": "b7-sunset_beach/latent/chunk_002.latent",
        "ref_image_path": "b7-sunset_beach/ref/chunk_002.png",
        "prev_ref_image_path": "b7-sunset_beach/ref/chunk_001.png",
        "chunk_video_path": "b7-sunset_beach/chunks/chunk_002.mp4",
        "combined_path": "b7-sunset_beach/combined/combined_002.mp4",
        "prev_combined_path": "b7-sunset_beach/combined/combined_001.mp4",
        "final_path": "b7-sunset_beach/sunset_beach.mp4",
        "output_prefix": "b7-sunset_beach/high_002",
    }
    assert l2.params == {**h2.params, "output_prefix": "b7-sunset_beach/low_002"}
    assert c2.params == {**h2.params, "output_prefix": "b7-sunset_beach/combine_002"}
    first = p.jobs[0].params
    assert first["prev_ref_image_path"] is None and first["prev_combined_path"] is None


def test_plan_is_json_serialisable_and_round_trips():
    p = plan_prompt_file(SEED_FILE, "s.txt", batch_id="b7", settings=FakeSettings())
    assert BatchPlan.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_seed_is_derived_from_sha_and_deterministic():
    a = plan_prompt_file(SEED_FILE, "s.txt", batch_id="b1", settings=FakeSettings())
    b = plan_prompt_file(SEED_FILE, "s.txt", batch_id="b1", settings=FakeSettings())
    other = plan_prompt_file(SEED_FILE + b" ", "s.txt", batch_id="b1", settings=FakeSettings())
    assert a == b
    assert a.jobs[0].params["seed"] != other.jobs[0].params["seed"]


def test_unsafe_batch_id_is_a_bug():
    with pytest.raises(ValueError, match="not a safe path component"):
        plan(5, batch_id="../b1")


# --- names and paths ----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    ("sunset_beach", "sunset_beach"),
    ("../../etc/passwd", "etc_passwd"),
    ("/abs", "abs"),
    ("a\x00b", "a_b"),
    ("..", "video"),
    ("...", "video"),
    ("a..b", "a_b"),
    ("a\\b", "a_b"),
    ("my video.v2", "my_video.v2"),
    ("Café 夕焼け", "Café_夕焼け"),
    ("Cafe\u0301", "Café"),
    ("", "video"),
    ("x" * 100, "x" * 80),
])
def test_safe_name(name, expected):
    assert safe_name(name) == expected


@pytest.mark.parametrize("name", [
    "../../etc/passwd", "/abs", "a\x00b", "..", ".", "~/x", "a/../../b", "\u202e..\\..",
    "夕焼け/../..", "-rf", "x" * 300,
])
def test_hostile_names_never_escape_the_batch_directory(name):
    p = plan(250, size=101, name=name, batch_id="b9")
    directory = p.jobs[0].params["final_path"].split("/")[0]
    assert directory == f"b9-{safe_name(name)}"
    for job in p.jobs:
        for key in PATH_KEYS:
            path = job.params[key]
            if path is None:
                continue
            parts = PurePosixPath(path).parts
            assert parts[0] == directory and len(parts) >= 2
            assert ".." not in parts and not PurePosixPath(path).is_absolute()
            assert all(part and "\\" not in part and "\x00" not in part for part in parts)


def test_hostile_names_in_files_are_planned_or_refused():
    refused = rejection("a\x00b\n\n5\n\np")
    assert "control character" in refused
    p = plan_prompt_file(b"../../etc/passwd\n\n5\n\np", "x.txt", batch_id="b1",
                         settings=FakeSettings())
    assert p.name == "../../etc/passwd"
    assert p.jobs[0].params["final_path"] == "b1-etc_passwd/etc_passwd.mp4"


# --- properties ---------------------------------------------------------------------------


def topological_orders_unique(jobs) -> tuple[bool, bool]:
    """(acyclic, unique order) by Kahn's algorithm over the given jobs' dependencies."""
    ids = {j.job_id for j in jobs}
    pending = {j.job_id: sum(d in ids for d in j.deps) for j in jobs}
    users = defaultdict(list)
    for job in jobs:
        for dep in job.deps:
            if dep in ids:
                users[dep].append(job.job_id)
    ready = [k for k, n in pending.items() if n == 0]
    done, unique = 0, True
    while ready:
        unique = unique and len(ready) == 1
        current = ready.pop()
        done += 1
        for user in users[current]:
            pending[user] -= 1
            if pending[user] == 0:
                ready.append(user)
    return done == len(jobs), unique


@settings(max_examples=150, deadline=None)
@given(frames=st.integers(1, 5000), size=st.integers(1, 300))
def test_chunking_and_graph_properties(frames, size):
    p = plan(frames, size)
    lows = [j.params for j in p.jobs if j.kind is JobKind.LOW]
    counts = [params["frames"] for params in lows]
    assert sum(counts) == frames
    assert all(c == size for c in counts[:-1]) and 1 <= counts[-1] <= size
    assert [params["start_frame"] for params in lows] == [
        sum(counts[:i]) for i in range(len(counts))]
    ids = {j.job_id for j in p.jobs}
    assert len(ids) == len(p.jobs) == 3 * len(counts)
    assert all(dep in ids for j in p.jobs for dep in j.deps)
    assert topological_orders_unique(p.jobs)[0]
    assert topological_orders_unique([j for j in p.jobs if j.kind.renders]) == (True, True)
    assert topological_orders_unique(
        [j for j in p.jobs if j.kind is JobKind.COMBINE]) == (True, True)
