"""A service daemon (a real process, simulated servers over real sockets) fed a stream of
hostile files through its spool: it stays up, rejects each with a reason, writes no
traceback and no oversized log line, and renders the good file dropped after them."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from support import log_lines, wait_for
from test_service import Service, prompt, service  # noqa: F401 - the fixture

from statemachine.admission import MAX_EVENT_BYTES

HOSTILE: dict[str, bytes] = {
    "digits.txt": b"v\n\n" + b"7" * 5000 + b"\n\np\n",
    "nested.toml": b"name = 'x'\nframes = 10\npositive = 'p'\nz = " + b"{a=" * 3000 + b"1"
                   + b"}" * 3000 + b"\n",
    "arrays.toml": b"name = 'x'\nframes = 10\npositive = 'p'\nz = " + b"[" * 3000 + b"]" * 3000,
    "bigint.toml": b"name = 'x'\npositive = 'p'\nframes = " + b"9" * 5000 + b"\n",
    "tiny_chunks.toml": b"name = 'x'\nframes = 100000\npositive = 'p'\nframes_per_chunk = 1\n",
    "many_chunks.toml": b"name = 'x'\nframes = 100000\npositive = 'p'\nframes_per_chunk = 5\n",
    "long_prompt.txt": b"v\n\n100000\n\n" + b"word " * 6000 + b"\n",
    "empty.txt": b"",
    "noise.txt": bytes(range(256)) * 16,
    "nul.txt": b"v\x00\n\n10\n\np\n",
    "wrong_types.toml": b"name = 3\nframes = 'ten'\npositive = []\n",
}


def drop(incoming: Path, name: str, data: bytes) -> None:
    tmp = incoming.parent / "tmp" / name
    tmp.write_bytes(data)
    tmp.rename(incoming / name)


def make_specials(incoming: Path, tmp_path: Path) -> list[str]:
    """A FIFO, a socket, a directory, a symlink to /dev/zero and a 2 GB sparse file."""
    os.mkfifo(incoming / "pipe.txt")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(incoming / "sock.txt"))
    sock.close()
    (incoming / "folder.txt").mkdir()
    (incoming / "zero.txt").symlink_to("/dev/zero")
    sparse = tmp_path / "sparse.txt"
    with sparse.open("wb") as f:
        f.truncate(2 << 30)
    sparse.rename(incoming / "sparse.txt")
    return ["pipe.txt", "sock.txt", "folder.txt", "zero.txt", "sparse.txt"]


def test_a_stream_of_hostile_files_is_rejected_and_a_good_one_renders(
        tmp_path: Path, service) -> None:  # noqa: F811 - the fixture
    svc: Service = service().start()
    spool = svc.state / "spool"
    incoming, rejected = spool / "incoming", spool / "rejected"
    for name, data in HOSTILE.items():
        drop(incoming, name, data)
    names = [*HOSTILE, *make_specials(incoming, tmp_path)]
    prompt(tmp_path, "good").rename(incoming / "good.txt")

    wait_for(lambda: svc.batch_state("b0001") == "done", "the good file rendered", 60)
    wait_for(lambda: all((rejected / f"{n}.reason").exists() for n in names),
             "every hostile file rejected with a reason")
    assert svc.proc.poll() is None
    reasons = {n: (rejected / f"{n}.reason").read_text().splitlines()[0] for n in names}
    assert all(reasons.values()), reasons
    assert "has 5,000 digits" in reasons["digits.txt"]
    assert "nests arrays or tables too deeply" in reasons["nested.toml"]
    assert "20,000 chunks" in reasons["many_chunks.toml"]
    assert "MAX_PROMPT_CHARS" in reasons["long_prompt.txt"]
    assert "FIFO" in reasons["pipe.txt"] and "larger than the limit" in reasons["sparse.txt"]
    assert sorted(os.listdir(incoming)) == ["force"]

    svc.terminate()
    log = (svc.state / "logs" / "comfy-dual.jsonl").read_text()
    assert "Traceback" not in log and "Traceback" not in svc.stderr()
    events = log_lines(svc.state)
    assert max(len(line) for line in events) < MAX_EVENT_BYTES
    assert sum(b'"batch_accepted"' in line for line in events) == 1


def test_a_copy_forced_again_after_its_accepted_file_was_removed_is_a_new_batch(
        tmp_path: Path, service) -> None:  # noqa: F811 - the fixture
    svc: Service = service().start()
    spool = svc.state / "spool"
    prompt(tmp_path, "again").rename(spool / "incoming" / "again.txt")
    wait_for(lambda: svc.batch_state("b0001") == "done", "the first render")
    (spool / "accepted" / "b0001-again.txt").unlink()

    prompt(tmp_path, "again").rename(spool / "incoming" / "again.txt")
    wait_for(lambda: (spool / "rejected" / "again.txt.reason").exists(), "a duplicate")
    assert "same content as batch b0001" in (spool / "rejected" / "again.txt.reason").read_text()

    prompt(tmp_path, "again").rename(spool / "incoming" / "force" / "again.txt")
    wait_for(lambda: svc.batch_state("b0002") == "done", "a new batch of the forced copy")
    assert (spool / "accepted" / "b0002-again.txt").exists()
