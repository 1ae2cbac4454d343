"""Hostile prompt files through the daemon's one entry point (``record_file``): each is a
batch within the limits or a one-line rejection, never another exception; plus the
bounded reader every command-line path goes through."""

from __future__ import annotations

import os
import socket
import string
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import config
from spool.reading import plan_file, read_prompt_file
from statemachine import events as ev
from statemachine.admission import MAX_EVENT_BYTES, admit, record_file
from statemachine.errors import BadInput
from statemachine.log import MemoryLog
from statemachine.store import Store

SETTINGS = config.load_settings()
GOOD = b"sunset\n\n202\n\nA sunset over the sea\n\nblurry\n"


def refusal(data: bytes, name: str = "p.txt", conf: config.Settings = SETTINGS) -> str:
    with pytest.raises(BadInput) as info:
        admit(data, name, batch_id="b0001", settings=conf)
    return str(info.value)


def toml(**fields: object) -> bytes:
    base = {"name": "v", "frames": 10, "positive": "p", **fields}
    return b"\n".join(k.encode() + b" = " + orjson.dumps(v) for k, v in base.items())


# --- the cases users found ----------------------------------------------------------------


def test_a_frame_count_of_thousands_of_digits_is_refused_before_it_is_converted():
    assert refusal(b"v\n\n" + b"7" * 5000 + b"\n\np\n") == (
        "the frame count (block 2) has 5,000 digits; a frame count has at most 12")


def test_a_toml_integer_of_thousands_of_digits_is_refused():
    assert refusal(b"name = 'v'\npositive = 'p'\nframes = " + b"7" * 5000, "x.toml").startswith(
        "TOML value cannot be read: Exceeds the limit")


@pytest.mark.parametrize("nest", [b"[" * 3000 + b"]" * 3000, b"{a=" * 3000 + b"1" + b"}" * 3000])
def test_deeply_nested_toml_is_refused(nest: bytes):
    assert refusal(b"name = 'v'\nframes = 10\npositive = 'p'\nz = " + nest, "x.toml") == (
        "TOML nests arrays or tables too deeply to be read")


def test_a_chunk_below_five_frames_is_refused():
    assert refusal(toml(frames=100_000, frames_per_chunk=1), "x.toml").startswith(
        "frames_per_chunk = 1 is out of range; use 5 to 100000")


def test_more_chunks_than_max_chunks_is_refused():
    assert refusal(toml(frames=100_000, frames_per_chunk=5), "x.toml") == (
        "100000 frames in chunks of 5 make 20,000 chunks; the limit is 1,000 per video "
        "(MAX_CHUNKS): use fewer frames or a larger frames_per_chunk")


def test_a_prompt_over_max_prompt_chars_is_refused():
    assert refusal(b"v\n\n100\n\n" + b"p" * 10_001) == (
        "the positive prompt is 10,001 characters long; the limit is 10,000 (MAX_PROMPT_CHARS)")
    assert refusal(b"v\n\n100\n\np\n\n" + b"n" * 10_001).startswith("the negative prompt is")


def test_the_largest_plan_the_limits_allow_fits_in_one_log_line():
    worst = "\x01" * SETTINGS.max_prompt_chars  # escaped as \u0001: six bytes each
    data = toml(name="夕" * 200, frames=5_000, frames_per_chunk=5, positive=worst,
                negative=worst)
    plan = admit(data, "x.toml", batch_id="b9999", settings=SETTINGS)
    assert len(plan.jobs) == 3 * SETTINGS.max_chunks
    assert len(ev.encode(ev.Recorded(1, 0.0, ev.BatchAccepted(plan)))) < MAX_EVENT_BYTES


def test_a_plan_over_the_event_size_is_refused(monkeypatch):
    monkeypatch.setattr("statemachine.admission.MAX_EVENT_BYTES", 1000)
    reason = refusal(toml(positive="p" * 2000), "x.toml")
    assert reason.startswith("its plan would take 2,") and reason.endswith(
        "bytes in the event log, more than 1,000: use shorter prompts or fewer chunks")


def test_an_unforeseen_exception_is_the_files_rejection(monkeypatch):
    def broken(*_args, **_kwargs):
        raise ZeroDivisionError("a bug\nover two lines")
    monkeypatch.setattr("statemachine.admission.plan_prompt_file", broken)
    assert refusal(GOOD) == "cannot be planned: ZeroDivisionError: a bug over two lines"


def test_a_refused_file_records_nothing():
    store = Store(MemoryLog())
    with pytest.raises(BadInput):
        record_file(store, SETTINGS, b"v\n\nmany\n\np", "p.txt", now=1.0)
    plan = record_file(store, SETTINGS, GOOD, "p.txt", now=1.0, file_id=(1, 2, 3))
    assert (plan.batch_id, store.seq, plan.file_id) == ("b0001", 1 + 1, (1, 2, 3))


# --- the bounded reader ---------------------------------------------------------------------


def test_special_files_are_refused_without_blocking_or_reading(tmp_path: Path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s.txt"))
    cases = {fifo: "a FIFO (named pipe), not a regular file",
             Path("/dev/zero"): "a character device, not a regular file",
             tmp_path: "a directory, not a prompt file",
             tmp_path / "missing.txt": "cannot open it: No such file or directory"}
    for path, reason in cases.items():
        with pytest.raises(BadInput, match=reason.replace("(", r"\(").replace(")", r"\)")):
            read_prompt_file(path, 1024)
    sock.close()


def test_a_large_sparse_file_is_refused_by_its_size_unread(tmp_path: Path):
    sparse = tmp_path / "sparse.txt"
    with sparse.open("wb") as f:
        f.truncate(2 << 30)
    with pytest.raises(BadInput, match="2,147,483,648 bytes: larger than the limit of 1,024"):
        read_prompt_file(sparse, 1024)


def test_a_file_that_grows_after_its_size_was_checked_is_read_only_to_the_limit(
        tmp_path: Path, monkeypatch):
    path = tmp_path / "grows.txt"
    path.write_bytes(b"x" * 5000)
    monkeypatch.setattr("spool.reading.size_refusal", lambda size, limit: None)
    with pytest.raises(BadInput, match="grew past the limit of 1,024 bytes"):
        read_prompt_file(path, 1024)


def test_plan_file_reads_and_plans_as_the_daemon_does(tmp_path: Path):
    path = tmp_path / "sunset.txt"
    path.write_bytes(GOOD)
    data, plan = plan_file(path, SETTINGS)
    assert (data, plan.name) == (GOOD, "sunset")


# --- fuzzing --------------------------------------------------------------------------------

FUZZ = settings(max_examples=int(os.environ.get("COMFY_DUAL_FUZZ_EXAMPLES", "1000")),
                suppress_health_check=[HealthCheck.too_slow], deadline=None)
TOML_KEYS = ["name", "frames", "positive", "negative", "seed", "frames_per_chunk", "width",
             "height", "priority", "other"]
toml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=10**30)
    | st.floats(allow_nan=True) | st.text(max_size=50) | st.sampled_from(["-1", "1e400"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=4),
    max_leaves=20)


def toml_document(table: dict[str, object]) -> bytes:
    """A TOML rendering of ``table``; values TOML has no form for become strings."""
    def value(v: object) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return "nan"
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, int | float):
            return repr(v) if abs(v) < 1e300 else "inf"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{orjson.dumps(k).decode()} = {value(x)}"
                                   for k, x in v.items()) + "}"
        return orjson.dumps(v).decode()
    return "\n".join(f"{k} = {value(v)}" for k, v in table.items()).encode()


# what broke the daemon before: numbers of thousands of digits and nesting past the
# recursion limit, as TOML value text and as a seed file's block
digits = st.integers(1, 6000).map(lambda n: "7" * n)
nesting = st.integers(1, 3000).map(lambda d: "[" * d + "]" * d)
raw_toml_values = digits | nesting | st.integers(1, 3000).map(lambda d: "{a=" * d + "1" + "}" * d)


def seed_mutations() -> st.SearchStrategy[bytes]:
    block = st.text(string.printable + "夕\x00\u2028", max_size=30) | digits
    blocks = st.lists(block, min_size=0, max_size=6)
    return st.builds(lambda parts, sep: sep.join(p.encode() for p in parts), blocks,
                     st.sampled_from([b"\n\n", b"\n", b"\r\n\r\n", b"\n \n"]))


def check_outcome(data: bytes, name: str) -> None:
    store = Store(MemoryLog())
    try:
        plan = record_file(store, SETTINGS, data, name, now=1.0)
    except BadInput as exc:
        assert str(exc) and "\n" not in str(exc)
        assert store.seq == 0
        return
    assert len(plan.jobs) <= 3 * SETTINGS.max_chunks
    store.commit()
    assert all(len(line) <= MAX_EVENT_BYTES for _, line in store.log.lines())


@FUZZ
@given(st.binary(max_size=2000), st.sampled_from(["p.txt", "p.toml"]))
def test_arbitrary_bytes_are_a_batch_or_a_rejection(data: bytes, name: str):
    check_outcome(data, name)


@FUZZ
@given(st.dictionaries(st.sampled_from(TOML_KEYS), toml_values, max_size=9),
       st.dictionaries(st.sampled_from(TOML_KEYS), raw_toml_values, max_size=2))
def test_arbitrary_toml_documents_are_a_batch_or_a_rejection(table: dict[str, object],
                                                             raw: dict[str, str]):
    rendered = toml_document({k: v for k, v in table.items() if k not in raw})
    check_outcome(rendered + b"\n" + "\n".join(f"{k} = {v}" for k, v in raw.items()).encode(),
                  "p.toml")


@FUZZ
@given(seed_mutations())
def test_mutated_seed_files_are_a_batch_or_a_rejection(data: bytes):
    check_outcome(data, "p.txt")
