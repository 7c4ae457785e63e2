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


def test_safetensors_bytes_are_the_same_every_time_and_read_back_exactly(tmp_path):
    """safetensors' own writer orders the metadata by a per-instance random hash (ten writes of this
    dict gave nine different files); ours must give one file, readable by the library."""
    import torch
    from safetensors.torch import load_file

    tensors = {
        "w": torch.randn(3, 5),
        "a": torch.arange(7),
        "h": torch.randn(4).bfloat16(),
        "s": torch.tensor(2.5),
        "m": torch.tensor([True, False]),
        "e": torch.zeros(0, 3),
    }
    meta = {f"key{i}": f"value {i}" for i in range(8)}
    files = {fileio.safetensors_bytes(tensors, meta) for _ in range(5)}
    assert len(files) == 1
    path = fileio.atomic_write_safetensors(tmp_path / "x.safetensors", tensors, meta)
    assert path.read_bytes() == files.pop()
    back_meta, back = fileio.read_safetensors(path)
    assert back_meta == meta
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t)
    assert torch.equal(load_file(str(path))["w"], tensors["w"])
    # a different value or key order of the *input* changes nothing but what it should
    assert (
        fileio.safetensors_bytes(dict(reversed(list(tensors.items()))), dict(reversed(list(meta.items()))))
        == path.read_bytes()
    )
    assert fileio.safetensors_bytes(tensors, {**meta, "key0": "other"}) != path.read_bytes()
