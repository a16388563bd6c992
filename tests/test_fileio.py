"""Atomic writes: the finished file or folder appears whole, with ordinary permissions, and a failed
write leaves what was there before untouched."""

import os
import stat

import pytest

from tunesmith.fileio import atomic_write_dir, atomic_write_file, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_and_folders_get_the_modes_open_and_mkdir_would_give(tmp_path):
    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "hello")
        atomic_write_file(tmp_path / "b.bin", lambda p: p.write_bytes(b"\0\1"))
        atomic_write_dir(tmp_path / "folder", lambda p: (p / "x.json").write_text("{}"))
    finally:
        os.umask(mask)
    expected_file = 0o666 & ~mask  # FILE_MODE was read from the umask at import
    assert _mode(tmp_path / "a.txt") == expected_file  # not mkstemp's owner-only 0600
    assert _mode(tmp_path / "b.bin") == expected_file
    assert _mode(tmp_path / "folder") == 0o777 & ~mask  # not mkdtemp's 0700
    assert (tmp_path / "a.txt").read_text() == "hello"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")

    def fail(path):
        path.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_file(target, fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
