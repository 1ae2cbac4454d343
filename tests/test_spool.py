"""The drop folder: real directories, real inotify events, real FIFOs and links."""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from watchdog.events import (
    DirCreatedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
)

from spool.folder import Candidate, DropFolder
from spool.layout import MAX_NAME_BYTES, SpoolLayout
from spool.watcher import (
    OVERFLOW_LOGGER,
    HintKind,
    SpoolHint,
    SpoolWatcher,
    hint_for,
)
from statemachine.errors import BadInput
from statemachine.planner import MAX_FILE_BYTES, parse_prompt_file

PROMPT = b"sunset_beach\n\n500\n\nA beautiful sunset\n\nblurry\n"
LATER = 5.0  # seconds past now: every quiet file has settled by then


@pytest.fixture
def layout(tmp_path: Path) -> SpoolLayout:
    layout = SpoolLayout.under(tmp_path)
    layout.create()
    return layout


@pytest.fixture
def hints(layout: SpoolLayout) -> Iterator[queue.SimpleQueue[SpoolHint]]:
    """A running watcher posting into a queue, as it posts into the loop's inbox."""
    inbox: queue.SimpleQueue[SpoolHint] = queue.SimpleQueue()
    with SpoolWatcher(layout, inbox.put):
        yield inbox


def drop(layout: SpoolLayout, name: str | bytes, data: bytes = PROMPT, *,
         force: bool = False) -> Path:
    """The way submit.py drops a file: write it in tmp/, then rename it in."""
    tmp = os.path.join(os.fsencode(layout.tmp), os.fsencode(name))
    with open(tmp, "wb") as f:
        f.write(data)
    target = os.path.join(os.fsencode(layout.force if force else layout.incoming),
                          os.fsencode(name))
    os.rename(tmp, target)
    return Path(os.fsdecode(target))


def wait_for(inbox: queue.SimpleQueue[SpoolHint], spool: DropFolder,
             wanted: Callable[[SpoolHint], bool], timeout: float = 10.0) -> SpoolHint:
    """Feed hints to the spool (as the loop does) until one is ``wanted``."""
    deadline = time.monotonic() + timeout
    while True:
        hint = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        spool.note(hint)
        if wanted(hint):
            return hint


def feed(inbox: queue.SimpleQueue[SpoolHint], spool: DropFolder) -> None:
    while True:
        try:
            spool.note(inbox.get_nowait())
        except queue.Empty:
            return


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def reason_of(path: Path) -> str:
    return path.with_name(path.name + ".reason").read_text()


# --- arriving --------------------------------------------------------------------------


def test_layout_is_created_once_and_again(tmp_path: Path) -> None:
    layout = SpoolLayout.under(tmp_path)
    layout.create()
    layout.create()
    assert names(layout.root) == {"tmp", "incoming", "accepted", "rejected", "commands"}
    assert names(layout.incoming) == {"force"}


def test_files_left_in_the_tmp_folders_are_swept_once_they_are_old(layout: SpoolLayout) -> None:
    now = time.time()
    (layout.commands / "tmp").mkdir()
    old, cmd, fresh = layout.tmp / "old.txt", layout.commands / "tmp" / "c.json", \
        layout.tmp / "being-written.txt"
    for path in (old, cmd, fresh):
        path.write_bytes(PROMPT)
    for path in (old, cmd):
        os.utime(path, (now - 7200, now - 7200))
    (layout.tmp / "a-dir").mkdir()
    os.utime(layout.tmp / "a-dir", (now - 7200, now - 7200))
    assert sorted(layout.sweep_tmp(now)) == sorted([str(old), str(cmd)])
    assert names(layout.tmp) == {"being-written.txt", "a-dir"}
    assert layout.sweep_tmp(now) == []


def test_a_file_renamed_in_is_taken_as_soon_as_its_event_is_seen(
        layout: SpoolLayout, hints: queue.SimpleQueue[SpoolHint]) -> None:
    spool = DropFolder(layout, settle=30.0)  # without the event it would wait 30 s
    path = drop(layout, "sunset.txt")
    assert spool.scan(path.stat().st_mtime) == []  # fresh, no event seen yet: not yet
    wait_for(hints, spool, lambda h: h == SpoolHint(HintKind.COMPLETE, str(path)))
    assert spool.due(time.time())
    [c] = spool.scan(time.time())
    assert (c.path, c.name, c.force) == (path, "sunset.txt", False)
    assert c.data == PROMPT and c.sha256 == hashlib.sha256(PROMPT).hexdigest()
    assert spool.accept(c, "b0001") == layout.accepted / "b0001-sunset.txt"
    assert names(layout.incoming) == {"force"}


def test_a_file_renamed_into_force_is_marked_force(
        layout: SpoolLayout, hints: queue.SimpleQueue[SpoolHint]) -> None:
    spool = DropFolder(layout, settle=30.0)
    path = drop(layout, "again.txt", force=True)
    wait_for(hints, spool, lambda h: h.path == str(path) and h.kind is HintKind.COMPLETE)
    [c] = spool.scan(time.time())
    assert (c.name, c.force) == ("again.txt", True)


@pytest.mark.parametrize("watching", [True, False], ids=["closed-event", "settle-time"])
def test_a_file_written_in_place_slowly_is_only_taken_whole(
        layout: SpoolLayout, watching: bool) -> None:
    """The writer pauses after each piece; the time handed to ``scan`` says how long. With
    the watcher a pause longer than ``settle`` does not cut it off (only its close ends
    the wait); without, the file is taken once it has been quiet for ``settle``."""
    settle = 0.5
    pause = settle * 2 if watching else settle * 0.9
    spool = DropFolder(layout, settle=settle)
    inbox: queue.SimpleQueue[SpoolHint] = queue.SimpleQueue()
    path = layout.incoming / "slow.txt"
    pieces = [b"%d " % i * 50 for i in range(8)]
    with SpoolWatcher(layout, inbox.put if watching else lambda hint: None):
        with open(path, "wb") as f:
            for n, piece in enumerate(pieces, 1):
                f.write(piece)
                f.flush()
                if watching and n == 1:
                    wait_for(inbox, spool, lambda h: h == SpoolHint(HintKind.WRITING, str(path)))
                feed(inbox, spool)
                assert spool.scan(path.stat().st_mtime + pause) == [], f"taken at piece {n}"
        if watching:
            wait_for(inbox, spool, lambda h: h == SpoolHint(HintKind.COMPLETE, str(path)))
        closed = path.stat().st_mtime
        [c] = spool.scan(closed if watching else closed + settle)
    assert c.data == b"".join(pieces)


def test_in_place_events_say_writing_then_complete(
        layout: SpoolLayout, hints: queue.SimpleQueue[SpoolHint]) -> None:
    spool = DropFolder(layout)
    path = layout.incoming / "inplace.txt"
    path.write_bytes(PROMPT)
    first = wait_for(hints, spool, lambda h: h.path == str(path))
    assert first.kind is HintKind.WRITING
    wait_for(hints, spool, lambda h: h.path == str(path) and h.kind is HintKind.COMPLETE)
    assert [c.name for c in spool.scan(time.time())] == ["inplace.txt"]


def test_a_writer_holding_the_file_open_is_waited_for_until_it_closes(
        layout: SpoolLayout) -> None:
    spool = DropFolder(layout, settle=0.5, writer_timeout=60.0, rescan_interval=1000.0)
    path = layout.incoming / "typing.txt"
    path.write_bytes(PROMPT[:10])
    mtime = path.stat().st_mtime
    spool.note(SpoolHint(HintKind.WRITING, str(path)))
    assert spool.scan(mtime + 10) == []  # a pause while typing is not the end
    assert spool.next_scan_at == pytest.approx(mtime + 60)
    spool.note(SpoolHint(HintKind.COMPLETE, str(path)))
    assert [c.data for c in spool.scan(mtime)] == [PROMPT[:10]]


def test_after_lost_events_a_writing_file_settles_normally(layout: SpoolLayout) -> None:
    spool = DropFolder(layout, settle=0.5, writer_timeout=60.0)
    path = layout.incoming / "lost-close.txt"
    path.write_bytes(PROMPT)
    mtime = path.stat().st_mtime
    spool.note(SpoolHint(HintKind.WRITING, str(path)))
    assert spool.scan(mtime + 1) == []
    spool.note(SpoolHint(HintKind.RESCAN))  # its close may have been among the lost events
    assert [c.name for c in spool.scan(mtime + 1)] == ["lost-close.txt"]


def test_a_complete_file_written_to_again_waits_again(layout: SpoolLayout) -> None:
    spool = DropFolder(layout, settle=0.5)
    path = drop(layout, "grows.txt")
    spool.note(SpoolHint(HintKind.COMPLETE, str(path)))
    with open(path, "ab") as f:
        f.write(b"more")
    now = path.stat().st_mtime
    assert spool.scan(now) == []  # not the file the hint was about any more
    assert [c.data for c in spool.scan(now + 0.5)] == [PROMPT + b"more"]


def test_files_dropped_while_the_daemon_was_down_are_taken_at_start(
        layout: SpoolLayout) -> None:
    old = drop(layout, "old.txt", b"old")
    os.utime(old, (time.time() - 60, time.time() - 60))
    fresh = drop(layout, "fresh.txt", b"fresh")
    spool = DropFolder(layout, settle=0.5)
    with SpoolWatcher(layout, lambda hint: None):
        now = time.time()
        assert spool.due(now)
        [c] = spool.scan(now)
        assert c.name == "old.txt"
        spool.accept(c, "b0001")
        assert spool.next_scan_at == pytest.approx(fresh.stat().st_mtime + 0.5)
        assert [c.name for c in spool.scan(spool.next_scan_at)] == ["fresh.txt"]


def test_scans_are_due_after_hints_at_the_limit_and_periodically(
        layout: SpoolLayout) -> None:
    spool = DropFolder(layout, rescan_interval=2.0)
    now = time.time() + LATER
    for i in range(3):
        drop(layout, f"p{i}.txt", b"%d" % i)
    first = spool.scan(now, limit=2)
    assert [c.name for c in first] == ["p0.txt", "p1.txt"]
    assert spool.due(now)  # stopped at its limit: go on at once
    spool.accept_all([(c, f"b{i}") for i, c in enumerate(first)])
    assert [c.name for c in spool.scan(now)] == ["p2.txt"]
    assert not spool.due(now) and spool.due(now + 2.0)
    spool.note(SpoolHint(HintKind.WRITING, str(layout.incoming / "p3.txt")))
    assert spool.due(now)
    assert spool.due(now - 100)  # the clock went back: look rather than wait


def test_one_scan_reads_a_bounded_amount_of_data(layout: SpoolLayout) -> None:
    spool = DropFolder(layout, scan_bytes=1_000_000)
    for i in range(3):
        drop(layout, f"big{i}.txt", bytes([i]) * 600_000)
    assert len(spool.scan(time.time() + LATER)) == 2
    assert spool.due(time.time())


def test_dot_files_are_left_to_their_writers(layout: SpoolLayout) -> None:
    (layout.incoming / ".sunset.txt.tmp").write_bytes(PROMPT)
    (layout.incoming / ".hidden-dir").mkdir()
    spool = DropFolder(layout)
    assert spool.scan(time.time() + 3600) == []
    assert names(layout.incoming) == {"force", ".sunset.txt.tmp", ".hidden-dir"}


def _take_everything(layout: SpoolLayout, n: int, inbox: queue.SimpleQueue[SpoolHint]
                     ) -> list[Candidate]:
    """The loop's way: note hints, scan when due (at most 500 a turn), accept them all."""
    spool = DropFolder(layout)
    taken: list[Candidate] = []
    deadline = time.monotonic() + 60
    while len(taken) < n and time.monotonic() < deadline:
        feed(inbox, spool)
        now = time.time() + LATER
        if spool.due(now):
            batch = spool.scan(now, limit=500)
            assert len(batch) <= 500
            moved = spool.accept_all([(c, f"b{len(taken) + i:05d}")
                                      for i, c in enumerate(batch)])
            assert None not in moved
            taken += batch
    return taken


def test_ten_thousand_dropped_at_once_are_all_taken_once(
        layout: SpoolLayout, hints: queue.SimpleQueue[SpoolHint]) -> None:
    n = 10_000
    for i in range(n):
        drop(layout, f"p{i:05d}.txt", b"video %d\n\n10\n\nprompt\n" % i)
    taken = _take_everything(layout, n, hints)
    assert sorted(c.name for c in taken) == [f"p{i:05d}.txt" for i in range(n)]
    assert len({c.sha256 for c in taken}) == n
    assert names(layout.incoming) == {"force"}
    assert len(names(layout.accepted)) == n


# --- refusing --------------------------------------------------------------------------


def make_directory(layout: SpoolLayout) -> Path:
    path = layout.incoming / "folder"
    path.mkdir()
    (path / "inside.txt").write_bytes(PROMPT)
    return path


def make_symlink(layout: SpoolLayout) -> Path:
    target = layout.tmp / "target.txt"
    target.write_bytes(PROMPT)
    path = layout.incoming / "link.txt"
    path.symlink_to(target)
    return path


def make_dangling_symlink(layout: SpoolLayout) -> Path:
    path = layout.incoming / "dangling.txt"
    path.symlink_to(layout.tmp / "nothing-here")
    return path


def make_fifo(layout: SpoolLayout) -> Path:
    path = layout.incoming / "pipe.txt"
    os.mkfifo(path)
    return path


def make_too_big(layout: SpoolLayout) -> Path:
    return drop(layout, "huge.txt", b"x" * (MAX_FILE_BYTES + 1))


def make_bad_name(layout: SpoolLayout) -> Path:
    return drop(layout, b"caf\xe9.txt")  # latin-1, not UTF-8


def make_long_name(layout: SpoolLayout) -> Path:
    return drop(layout, "n" * 250 + ".txt")


def make_unreadable(layout: SpoolLayout) -> Path:
    path = drop(layout, "secret.txt")
    path.chmod(0)
    return path


REFUSALS = {
    "directory": (make_directory, "a directory"),
    "symlink": (make_symlink, "a symbolic link"),
    "dangling-symlink": (make_dangling_symlink, "a symbolic link"),
    "fifo": (make_fifo, "a FIFO (named pipe), not a regular file"),
    "too-big": (make_too_big, "1,048,577 bytes: larger than the limit of 1,048,576 bytes"),
    "name-not-utf8": (make_bad_name, "the file name is not valid UTF-8"),
    "name-too-long": (make_long_name, "the file name is 254 bytes long"),
}
if os.geteuid() != 0:  # root reads a file whatever its mode
    REFUSALS["unreadable"] = (make_unreadable, "cannot be read: Permission denied")


@pytest.mark.timeout(20)  # opening the FIFO for reading would hang here
@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
def test_what_the_spool_refuses_goes_to_rejected_with_a_reason(
        layout: SpoolLayout, case: tuple[Callable[[SpoolLayout], Path], str]) -> None:
    make, why = case
    path = make(layout)
    kind = os.lstat(path).st_mode & 0o170000
    spool = DropFolder(layout)
    assert spool.scan(time.time() + LATER) == []
    assert names(layout.incoming) == {"force"}
    [moved] = [p for p in layout.rejected.iterdir() if not p.name.endswith(".reason")]
    assert os.lstat(moved).st_mode & 0o170000 == kind  # moved as it was: never followed
    assert os.fsencode(moved.name) == os.fsencode(path.name)[:MAX_NAME_BYTES]
    reason = reason_of(moved)
    assert reason.startswith(why)
    assert "\nrejected 20" in reason and "from incoming/" in reason


@pytest.mark.timeout(20)
def test_a_file_swapped_for_a_fifo_while_scanning_is_never_opened_blocking(
        layout: SpoolLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    path = drop(layout, "swapped.txt")
    spool = DropFolder(layout)
    ready_at = spool._settle.ready_at  # between listing and reading, the file is replaced

    def swap_then_ask(name: str, st: os.stat_result, now: float) -> float:
        path.unlink()
        os.mkfifo(path)
        return ready_at(name, st, now)

    monkeypatch.setattr(spool._settle, "ready_at", swap_then_ask)
    assert spool.scan(time.time() + LATER) == []
    monkeypatch.setattr(spool._settle, "ready_at", ready_at)
    assert spool.scan(time.time() + LATER) == []
    assert reason_of(layout.rejected / "swapped.txt").startswith("a FIFO")


def test_a_rejected_directory_and_link_keep_what_they_held(layout: SpoolLayout) -> None:
    make_directory(layout)
    make_symlink(layout)
    DropFolder(layout).scan(time.time() + LATER)
    assert (layout.rejected / "folder" / "inside.txt").read_bytes() == PROMPT
    assert os.readlink(layout.rejected / "link.txt") == str(layout.tmp / "target.txt")
    assert (layout.tmp / "target.txt").read_bytes() == PROMPT


def test_a_file_of_exactly_1_mib_is_read(layout: SpoolLayout) -> None:
    drop(layout, "edge.txt", b"x" * MAX_FILE_BYTES)
    [c] = DropFolder(layout).scan(time.time() + LATER)
    assert len(c.data) == MAX_FILE_BYTES


def test_a_directory_dropped_into_force_is_refused_and_force_itself_kept(
        layout: SpoolLayout) -> None:
    (layout.force / "sub").mkdir()
    DropFolder(layout).scan(time.time() + LATER)
    assert names(layout.force) == set()
    assert "from incoming/force/sub" in reason_of(layout.rejected / "sub")


@pytest.mark.parametrize("data,why", [(b"caf\xe9\n\n10\n\nprompt\n", "not UTF-8"),
                                      (b"only a name\n", "unparsable")])
def test_the_planners_refusals_are_rejected_by_the_loop_with_its_reason(
        layout: SpoolLayout, data: bytes, why: str) -> None:
    drop(layout, "bad.txt", data)
    spool = DropFolder(layout)
    now = time.time() + LATER
    [c] = spool.scan(now)
    with pytest.raises(BadInput) as refused:
        parse_prompt_file(c.data, c.name)
    assert spool.reject(c, str(refused.value), now) == layout.rejected / "bad.txt"
    assert reason_of(layout.rejected / "bad.txt").startswith(str(refused.value))


def test_rejected_names_never_collide(layout: SpoolLayout) -> None:
    spool = DropFolder(layout)
    (layout.rejected / "same.txt.reason").write_text("left by someone")
    for n in range(3):
        drop(layout, "same.txt", b"%d" % n)
        [c] = spool.scan(time.time() + LATER)
        spool.reject(c, f"reason {n}", time.time())
    assert names(layout.rejected) == {"same.txt.reason", "same.txt.1", "same.txt.1.reason",
                                      "same.txt.2", "same.txt.2.reason", "same.txt.3",
                                      "same.txt.3.reason"}
    assert reason_of(layout.rejected / "same.txt.3").startswith("reason 2\n")


def test_any_entry_of_incoming_can_be_rejected_by_path(layout: SpoolLayout) -> None:
    spool = DropFolder(layout)
    path = drop(layout, "whatever.txt", force=True)
    assert spool.reject(path, "cancelled by hand", time.time()) == (
        layout.rejected / "whatever.txt")
    assert "from incoming/force/whatever.txt" in reason_of(layout.rejected / "whatever.txt")
    assert spool.reject(path, "again", time.time()) is None  # gone: nothing to do


# --- duplicates, crashes and changes -----------------------------------------------------


def loop_turn(spool: DropFolder, recorded: dict[str, str], now: float) -> None:
    """What the loop does with one scan (the duplicate rule is the loop's; it knows the
    recorded sha256s from the event log): a batch for new content, a rejection for the same
    content again unless forced, and the moves to accepted/ once the batches are durable."""
    accepts: list[tuple[Candidate, str]] = []
    for c in spool.scan(now):
        if c.sha256 in recorded and not c.force:
            spool.reject(c, f"duplicate of batch {recorded[c.sha256]}; use --force", now)
            continue
        batch_id = f"b{len(accepts) + len(list(spool.layout.accepted.iterdir())) + 1:04d}"
        recorded.setdefault(c.sha256, batch_id)
        accepts.append((c, batch_id))
    spool.accept_all(accepts)  # after the commit


def test_a_duplicate_is_rejected_unless_forced(layout: SpoolLayout) -> None:
    spool = DropFolder(layout)
    recorded: dict[str, str] = {}
    drop(layout, "sunset.txt")
    loop_turn(spool, recorded, time.time() + LATER)
    drop(layout, "sunset-again.txt")
    drop(layout, "sunset-forced.txt", force=True)
    loop_turn(spool, recorded, time.time() + LATER)
    assert names(layout.accepted) == {"b0001-sunset.txt", "b0002-sunset-forced.txt"}
    assert names(layout.rejected) == {"sunset-again.txt", "sunset-again.txt.reason"}
    assert reason_of(layout.rejected / "sunset-again.txt").startswith(
        "duplicate of batch b0001")


def test_a_file_left_in_incoming_by_a_crash_is_accepted_for_its_recorded_batch(
        layout: SpoolLayout) -> None:
    drop(layout, "sunset.txt")
    [c] = DropFolder(layout).scan(time.time() + LATER)
    recorded = {c.sha256: ("b0001", c.name)}  # the batch is durable; then the crash
    restarted = DropFolder(layout)
    [again] = restarted.scan(time.time() + LATER)
    batch_id, source = recorded[again.sha256]
    assert source == again.name and not names(layout.accepted)
    assert restarted.accept(again, batch_id) == layout.accepted / "b0001-sunset.txt"
    assert names(layout.accepted) == {"b0001-sunset.txt"}
    assert names(layout.incoming) == {"force"}


def test_a_file_replaced_after_it_was_read_is_not_moved(layout: SpoolLayout) -> None:
    path = drop(layout, "sunset.txt")
    spool = DropFolder(layout)
    [c] = spool.scan(time.time() + LATER)
    path.write_bytes(b"another video")
    assert spool.accept(c, "b0001") is None
    assert spool.reject(c, "too late", time.time()) is None
    assert names(layout.accepted) == set() and names(layout.rejected) == set()
    [again] = spool.scan(time.time() + LATER)
    assert again.data == b"another video"


def test_a_file_that_cannot_be_moved_is_left_alone_until_it_changes(
        layout: SpoolLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    path = drop(layout, "stuck.txt")
    spool = DropFolder(layout)
    [c] = spool.scan(time.time() + LATER)

    def refuse(src: object, dst: object) -> None:
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", refuse)
        assert spool.accept(c, "b0001") is None
    assert path.exists()
    assert spool.scan(time.time() + LATER) == []  # not read again every turn
    path.write_bytes(b"fixed")
    [again] = spool.scan(time.time() + LATER)
    assert again.data == b"fixed"


# --- names ----------------------------------------------------------------------------


def test_any_utf8_name_is_accepted_under_its_batch_id(layout: SpoolLayout) -> None:
    name = "vidéo 1 — 🌅 (final)\n.txt"
    drop(layout, name)
    spool = DropFolder(layout)
    [c] = spool.scan(time.time() + LATER)
    assert c.name == name
    assert spool.accept(c, "b0007") == layout.accepted / f"b0007-{name}"


@pytest.mark.parametrize("batch_id", ["", "../b1", "b/1", ".", ".."])
def test_a_batch_id_that_is_not_a_plain_name_is_a_bug(layout: SpoolLayout,
                                                      batch_id: str) -> None:
    drop(layout, "x.txt")
    spool = DropFolder(layout)
    [c] = spool.scan(time.time() + LATER)
    with pytest.raises(ValueError, match="not a plain file name"):
        spool.accept(c, batch_id)
    assert names(layout.incoming) == {"force", "x.txt"}


# --- hints ------------------------------------------------------------------------------


@pytest.mark.parametrize("event,hint", [
    (FileMovedEvent("", "/s/incoming/a.txt"), SpoolHint(HintKind.COMPLETE, "/s/incoming/a.txt")),
    (FileMovedEvent("/s/incoming/.a.tmp", "/s/incoming/a.txt"),
     SpoolHint(HintKind.COMPLETE, "/s/incoming/a.txt")),
    (FileClosedEvent("/s/incoming/a.txt"), SpoolHint(HintKind.COMPLETE, "/s/incoming/a.txt")),
    (FileCreatedEvent("/s/incoming/a.txt"), SpoolHint(HintKind.WRITING, "/s/incoming/a.txt")),
    (FileModifiedEvent("/s/incoming/a.txt"), SpoolHint(HintKind.WRITING, "/s/incoming/a.txt")),
    (DirCreatedEvent("/s/incoming/d"), SpoolHint(HintKind.WRITING, "/s/incoming/d")),
    (FileMovedEvent("/s/incoming/a.txt", ""), None),  # moved out
    (FileCreatedEvent("/s/incoming/.a.tmp"), None),
    (FileOpenedEvent("/s/incoming/a.txt"), None),
])
def test_events_become_hints(event: FileSystemEvent, hint: SpoolHint | None) -> None:
    assert hint_for(event) == hint


def test_an_inotify_overflow_warning_posts_a_rescan_hint(layout: SpoolLayout) -> None:
    posted: list[SpoolHint] = []
    watchdog_log = logging.getLogger(OVERFLOW_LOGGER)
    with SpoolWatcher(layout, posted.append):
        watchdog_log.warning("something else")
        watchdog_log.warning("Inotify queue overflowed; filesystem events were lost")
    watchdog_log.warning("Inotify queue overflowed; filesystem events were lost")
    assert posted == [SpoolHint(HintKind.RESCAN)]  # once, and not after stop


def test_a_watcher_that_cannot_watch_says_so(tmp_path: Path) -> None:
    missing = SpoolLayout.under(tmp_path)  # never created
    before = set(threading.enumerate())
    with pytest.raises(OSError):
        SpoolWatcher(missing, lambda hint: None).start()
    assert set(threading.enumerate()) <= before  # its inotify reader was stopped too
