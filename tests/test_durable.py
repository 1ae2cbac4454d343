"""statemachine.durable: files that appear whole, with real files in a tmp directory."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest

from statemachine.durable import fsync_dir, write_atomic


def test_write_atomic_creates_then_replaces_a_file_and_leaves_no_tmp(tmp_path: Path) -> None:
    target = tmp_path / "status.json"
    write_atomic(target, b"one")
    write_atomic(target, b"two, longer")
    assert target.read_bytes() == b"two, longer"
    assert os.listdir(tmp_path) == ["status.json"]


@pytest.mark.parametrize("fsync", [True, False])
def test_fsync_decides_whether_the_file_and_its_directory_are_synced(
        tmp_path: Path, fsync: bool) -> None:
    with mock.patch.object(os, "fsync", wraps=os.fsync) as synced:
        write_atomic(tmp_path / "f", b"data", fsync=fsync)
    assert synced.call_count == (2 if fsync else 0)  # the file, then its directory
    assert (tmp_path / "f").read_bytes() == b"data"


def test_a_tmp_elsewhere_is_renamed_from_there(tmp_path: Path) -> None:
    tmp, target = tmp_path / "tmp" / "a.txt", tmp_path / "incoming" / "a.txt"
    write_atomic(target, b"prompt", tmp=tmp, make_dirs=True)
    assert target.read_bytes() == b"prompt"
    assert not tmp.exists()
    assert os.listdir(tmp_path / "tmp") == []


def test_missing_directories_are_an_error_unless_asked_to_make_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "no" / "f", b"x")
    write_atomic(tmp_path / "no" / "f", b"x", make_dirs=True)
    assert (tmp_path / "no" / "f").read_bytes() == b"x"


def test_a_failed_write_keeps_the_old_file_and_removes_the_tmp(tmp_path: Path) -> None:
    target = tmp_path / "snapshot.json"
    write_atomic(target, b"old")
    with mock.patch.object(os, "rename", side_effect=OSError(28, "No space")), \
            pytest.raises(OSError):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["snapshot.json"]


def test_a_leftover_tmp_from_a_crash_is_overwritten(tmp_path: Path) -> None:
    (tmp_path / ".f.tmp").write_bytes(b"half a write from before a crash")
    write_atomic(tmp_path / "f", b"whole")
    assert (tmp_path / "f").read_bytes() == b"whole"
    assert os.listdir(tmp_path) == ["f"]


def test_fsync_dir_syncs_a_directory_and_refuses_a_file(tmp_path: Path) -> None:
    fsync_dir(tmp_path)
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        fsync_dir(tmp_path / "f")
