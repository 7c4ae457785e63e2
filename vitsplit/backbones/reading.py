"""Reading a weights file: safetensors, or a torch file loaded with ``weights_only=True`` (so no
pickled code ever runs), and finding the backbone's tensors inside it.

The state dict may be nested under ``state_dict``/``model``/``teacher``/``module`` and its keys may
carry a prefix (``backbone.``, ``module.``, ``teacher.backbone.``, ``dinov2.``, ...).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import UserError
from ..fileio import existing_path, load_torch_restricted
from .dinov3_layouts import HF_DINOV3_ANCHOR
from .spec import WAYS_FORWARD

# Keys that identify a ViT state dict, and the layout each one means.
TIMM_ANCHOR = "patch_embed.proj.weight"  # timm and the official DINOv2 release
HF_ANCHOR = "embeddings.patch_embeddings.projection.weight"  # Hugging Face Dinov2Model
ANCHORS = (TIMM_ANCHOR, HF_ANCHOR, HF_DINOV3_ANCHOR)  # HF_DINOV3_ANCHOR: Hugging Face DINOv3ViTModel
# Wrapper keys of training checkpoints, tried in this order.
WRAPPER_KEYS = ("state_dict", "model", "teacher", "module")


def weights_path(weights: str | os.PathLike) -> Path:
    """A weights file or folder with symlinks resolved; a UserError if it is missing or a symlink loop."""
    try:
        return existing_path(weights, "weights file")
    except UserError as e:
        raise UserError(f"{e}: {WAYS_FORWARD}") from None


def read_checkpoint(path: Path) -> Any:
    """The object stored in a weights file: safetensors, or a torch zip/legacy file read with
    ``weights_only=True`` (plain tensors and containers only; pickled code is refused)."""
    path = weights_path(path)
    if not path.is_file():
        raise UserError(f"weights path {path} is not a file: {WAYS_FORWARD}")
    if path.suffix == ".json":  # a sharded checkpoint's index: read by hf_weight_files
        raise UserError(f"{path} is an index file: pass the folder that holds it and its shards")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise UserError(f"cannot read {path} as safetensors ({e}): pass a valid weights file") from e
    return load_torch_restricted(
        path, what="weights file", remedy="re-save just the state dict, or convert it to .safetensors"
    )


def _looks_like_safetensors(path: Path) -> bool:
    """True if the file starts like safetensors: an 8-byte little-endian header length then '{'."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def backbone_state(obj: Any, origin: Path | str) -> dict[str, torch.Tensor]:
    """The backbone's tensors from a loaded checkpoint: unwraps ``state_dict``/``model``/
    ``teacher``/``module`` nesting and strips the key prefix in front of the backbone (found by
    its patch-embedding key; a teacher is preferred over a student)."""
    for _ in range(len(WRAPPER_KEYS) + 1):
        if not isinstance(obj, Mapping):
            raise UserError(f"{origin} does not hold a state dict (found {type(obj).__name__}): {WAYS_FORWARD}")
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        prefixes = [k[: len(k) - len(a)] for k in tensors for a in ANCHORS if k == a or k.endswith("." + a)]
        if prefixes:
            prefix = min(prefixes, key=lambda p: ("student" in p, len(p), p))
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    keys = ", ".join(list(map(str, obj.keys()))[:6]) if isinstance(obj, Mapping) else ""
    raise UserError(
        f"{origin} holds no ViT weights (no key ending in {' or '.join(repr(a) for a in ANCHORS)}; "
        f"first keys: {keys or 'none'}): {WAYS_FORWARD}"
    )
