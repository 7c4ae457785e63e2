"""Atomic writes: content, permissions, no leftovers, and no process-wide side effects."""

import os
import stat

import pytest

from vitsplit import fileio


def test_atomic_write_never_touches_the_process_umask(tmp_path, monkeypatch):
    """The umask is process-wide (another thread may be creating files): it must not be changed,
    not even briefly, to learn its value. The kernel applies it to the new file instead."""
    mask = os.umask(0o027)
    os.umask(mask)

    def forbidden(*args):
        raise AssertionError("os.umask called")

    monkeypatch.setattr(os, "umask", forbidden)
    path = fileio.atomic_write_text(tmp_path / "a" / "x.txt", "hello")
    monkeypatch.undo()
    assert path.read_text() == "hello"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in path.parent.iterdir()] == ["x.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "x.json"
    fileio.atomic_write_json(target, {"a": 1})

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        fileio.atomic_write(target, fail)
    assert fileio.read_json(target) == {"a": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
