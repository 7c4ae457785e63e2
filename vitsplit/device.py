"""The one device rule: which ``torch.device`` a ``--device`` option means, and which autocast
dtype a run's ``--precision`` means on it.

``resolve_device(pref, local_rank)``: ``"auto"`` is CUDA when a GPU is visible, else the CPU;
``"cuda"`` is the process's GPU (``local_rank`` under ``torchrun``, else the current one);
``"cuda:N"`` is that GPU; ``"cpu"`` the CPU. Asking for CUDA without a visible GPU, or for an
unknown device, is a :class:`~vitsplit.errors.UserError`.
"""

from __future__ import annotations

import torch

from .errors import UserError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(pref: str, local_rank: int | None = None) -> torch.device:
    """``pref`` ("auto", "cpu", "cuda" or "cuda:N") -> the device to run on (see the module docstring)."""
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {pref} was asked for but no CUDA GPU is visible; use --device cpu")
        if ":" in pref:
            return torch.device(pref)
        return torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
    if pref != "cpu":
        raise UserError(f"unknown device '{pref}': use auto, cpu or cuda")
    return torch.device("cpu")


def train_autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of training steps: bf16 for ``--precision bf16``, and for ``auto`` on CUDA;
    None (fp32) otherwise."""
    return torch.bfloat16 if (precision == "bf16" or (precision == "auto" and device.type == "cuda")) else None


def eval_autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of evaluation: bf16 on CUDA unless the run was trained in fp32; fp32 on CPU.
    Used for a run's own eval.json and for ``cka-split evaluate`` of that run, so the two agree."""
    return torch.bfloat16 if (device.type == "cuda" and precision != "fp32") else None
