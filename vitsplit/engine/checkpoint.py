"""The resume checkpoint ``OUT/last.pt``: everything a run needs to continue bit-identically.

Contents (one ``torch.save`` dict, written atomically through :func:`vitsplit.fileio.atomic_write`):
``model`` (the trainable state dict, buffers included), ``optimizer``, ``scheduler``, ``step``
(optimizer steps done), ``rng`` (torch CPU, CUDA per device, numpy's global, Python's ``random``),
``data`` (the sampler position, a pure function of seed and step, stored to check it), ``elapsed``
(training seconds so far) and ``config`` (the run's TrainConfig, to refuse a mismatched resume).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..fileio import atomic_write, load_torch_restricted


def rng_state() -> dict[str, Any]:
    """Every global RNG state that training draws from."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str | Path,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer: Any,
    scheduler: Any,
    step: int,
    data: dict[str, Any],
    elapsed: float,
    config: dict[str, Any],
) -> Path:
    """Write the resume checkpoint atomically (temp file in the same folder, then rename)."""
    payload = {
        "format": "cka-split-resume-1",
        "model": {k: v.detach().cpu().clone() for k, v in model_state.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": int(step),
        "rng": rng_state(),
        "data": dict(data),
        "elapsed": float(elapsed),
        "config": config,
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


# numpy's global RNG state is a tuple holding one uint32 array; these globals rebuild such an array and
# nothing else (torch.load weights_only=True refuses every other class or function).
_NUMPY_ARRAY_GLOBALS = (np.zeros(1).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32)))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` without running code from it: a run
    directory may come from someone else, so ``last.pt`` is read with ``torch.load(weights_only=True)``
    (tensors, numbers, strings, containers, and the numpy array of the RNG state)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"cannot resume: {path} does not exist (run without --resume, or point --out at the run to continue)"
        )
    remedy = "delete it, or give another --out"
    ckpt = load_torch_restricted(
        path, what="resume checkpoint", allow=_NUMPY_ARRAY_GLOBALS, remedy=f"cka-split train did not write it: {remedy}"
    )
    if not isinstance(ckpt, dict) or ckpt.get("format") != "cka-split-resume-1":
        raise UserError(f"cannot resume: {path} was not written by cka-split train; {remedy}")
    return ckpt
