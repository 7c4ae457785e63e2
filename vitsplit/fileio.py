"""Atomic file writes: write to a temporary file in the same folder, then rename.

A reader never sees a half-written file, and a run killed mid-write leaves the old file intact.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import secrets
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

from safetensors import safe_open

from .errors import UserError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` onto ``path``. Returns ``Path(path)``.

    The temporary file is created with mode 0666 minus the process umask, as ``open()`` would
    create ``path`` (a run directory is meant to be shared); the umask is applied by the kernel,
    never read or changed here.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def ensure_writable_dir(path: str | os.PathLike, what: str) -> list[Path]:
    """Create the folder ``path`` (and missing parents) and write a probe file in it, so that a run
    fails before its work, not after, when the folder is a file, lies under a file, or cannot be
    written. Returns the folders it created (outermost first); a UserError names ``what`` otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder; give a folder path")
    missing = []
    for p in [path, *path.parents]:
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise UserError(f"{what} {path} cannot be created: {p} is a file, not a folder")
            break
        missing.append(p)
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.unlink(_create_temp(path / ".write-test"))
    except OSError as e:
        raise UserError(
            f"{what} {path} is not writable ({e.strerror or type(e).__name__}); give a folder you can write to"
        ) from None
    return missing[::-1]


def check_output_file(path: str | os.PathLike, what: str) -> None:
    """Refuse, before any work, an output file path that is a folder or whose folder cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file name such as {path / 'metrics.json'}")
    ensure_writable_dir(path.parent, f"{what} {path}: its folder")


def existing_path(path: str | os.PathLike, what: str) -> Path:
    """``path`` with every symlink resolved; a UserError naming ``what`` when it does not exist, is a
    symlink loop, or cannot be looked at (e.g. a folder without search permission on the way)."""
    p = Path(path).expanduser()
    try:
        return p.resolve(strict=True)
    except FileNotFoundError:
        raise UserError(f"{what} {p} does not exist") from None
    except RuntimeError:  # Python < 3.13 reports a symlink loop this way
        raise UserError(
            f"{what} {p} is a symlink loop (it leads back to itself); give the file it should point at"
        ) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(
                f"{what} {p} is a symlink loop (it leads back to itself); give the file it should point at"
            ) from None
        raise UserError(f"{what} {p} cannot be read ({e.strerror or type(e).__name__})") from None


def _create_temp(path: Path) -> str:
    """An empty new file ``.<name>.<random>.tmp`` beside ``path`` (O_EXCL: never an existing file)."""
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, _write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# safetensors dtype names (the format's specification) of the torch dtypes a checkpoint holds.
_SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def safetensors_bytes(tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's bytes, the same bytes for the same tensors and metadata in every process.

    The library's writer keeps ``metadata`` in a Rust ``HashMap`` whose iteration order is seeded per
    process, so the same state dict written twice gives files with different sha256. Here the header
    is canonical JSON (keys sorted, no spaces), the tensors are laid out in name order, and the header
    is space-padded to a multiple of 8 bytes, as the format allows. Layout: 8-byte little-endian
    header length, the header ``{"__metadata__": {...}, name: {"dtype", "shape", "data_offsets"}}``,
    then the tensors' little-endian bytes. ``tensors``: {name: CPU-able torch tensor}.
    """
    import sys

    import torch

    if sys.byteorder != "little":
        raise UserError("writing safetensors needs a little-endian machine")
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(sorted(metadata.items()))
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        dtype = _SAFETENSORS_DTYPES.get(str(t.dtype).removeprefix("torch."))
        if dtype is None:
            raise ValueError(f"tensor {name}: dtype {t.dtype} has no safetensors name")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, sort_keys=False, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def atomic_write_safetensors(
    path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> Path:
    """Write :func:`safetensors_bytes` atomically: the same input gives a byte-identical file."""
    data = safetensors_bytes(tensors, metadata)

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, _write)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, Any]]:
    """(metadata, tensors) of a safetensors file; a missing or corrupt file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a corrupt file
        raise UserError(f"{path} is not a safetensors file ({e})") from e


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file's content; a missing or malformed file is a UserError."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise UserError(f"{path} does not exist") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from e


def load_torch_restricted(
    path: str | os.PathLike, *, remedy: str, allow: Sequence[Any] = (), what: str = "file"
) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and plain containers only,
    plus the classes and functions in ``allow``; a file that pickles anything else is refused and
    nothing in it is imported or called. Torch's two-line warning about the pickle protocol of a file
    that ``torch.save`` did not write is silenced: the UserError says what is wrong with the ``what``
    (e.g. "weights file"), ending in ``remedy`` (what the user should do)."""
    import pickle
    import re
    import warnings
    import zipfile

    import torch

    path = Path(path)
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(allow)):
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)|but got <class '([^']+)'>", str(e))
        if found:  # the restricted unpickler met a class or function: it was neither imported nor called
            raise UserError(
                f"refused to load {path}: it pickles '{found.group(1) or found.group(2)}', which is not a "
                "tensor or plain container, and loading it could run code (torch.load weights_only=True); "
                f"{remedy}"
            ) from e
        raise UserError(
            f"cannot read {what} {path}: not a torch file that loads with weights_only=True (no code is run); {remedy}"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as e:
        raise UserError(
            f"cannot read {what} {path} ({type(e).__name__}: {' '.join(str(e).split())[:200]}); {remedy}"
        ) from e


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions a run records in its config.json (Python, platform and the packages that set results)."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("cka-split", "torch", "torchvision", "timm", "numpy", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
