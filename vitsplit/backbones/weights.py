"""Pretrained weights for a backbone's timm ViT: the one entry point, :func:`load_weights`, used by
:func:`vitsplit.backbones.build.build_backbone`.

- a path: a ``.pth``/``.pt``/``.bin`` file (read with ``weights_only=True``), ``.safetensors``, or
  a Hugging Face folder (:mod:`~vitsplit.backbones.reading`, :mod:`~vitsplit.backbones.hf`), in any
  layout :mod:`~vitsplit.backbones.layouts` converts; loading is strict.
- ``"auto"``: the usual caches first, a download only when online, else a fast ``UserError``
  naming ``--weights PATH`` and ``--weights random`` (:mod:`~vitsplit.backbones.hub`); for
  ``demo-vit``, the weights shipped in the package, else those ``cka-split pretrain-demo`` cached
  (:mod:`~vitsplit.backbones.demo_vit`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import UserError
from ..fileio import sha256_file
from . import demo_vit, hub
from .hf import HF_WEIGHT_FILES, hf_weight_files
from .layouts import load_strict, to_timm_layout
from .reading import backbone_state, read_checkpoint, weights_path
from .spec import WAYS_FORWARD, BackboneSpec


def load_weights(vit: nn.Module, spec: BackboneSpec, weights: str | os.PathLike) -> str:
    """Load ``weights`` ("auto" or a path) into ``vit`` (built from ``spec``), strictly.

    Returns the weights_source string: ``"file <abs path> sha256:<hex>"`` for a path,
    ``"hub <id> (file <path> sha256:<hex>)"`` / ``"torch.hub <url> (file ...)"`` for ``auto``.
    Raises ``UserError`` for missing/unreadable files, foreign architectures and offline misses.
    """
    if str(weights) == "auto":
        return _load_auto(vit, spec)
    path = weights_path(weights)
    if path.is_dir():
        files = hf_weight_files(path)
        if not files:
            raise UserError(f"{path} is a folder without {' or '.join(HF_WEIGHT_FILES[::2])}: pass a weights file")
        return _load_files(vit, spec, files)
    return _load_files(vit, spec, [path])


def _load_files(vit: nn.Module, spec: BackboneSpec, files: list[Path], label: str | None = None) -> str:
    origin = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} shards)"
    if len(files) == 1:
        state = backbone_state(read_checkpoint(files[0]), origin)
    else:  # shards of one flat state dict: the prefix is found once all keys are together
        merged: dict[str, Any] = {}
        for f in files:
            shard = read_checkpoint(f)
            if not isinstance(shard, Mapping):
                raise UserError(f"shard {f} does not hold a state dict: re-download the model folder")
            merged.update(shard)
        state = backbone_state(merged, origin)
    load_strict(vit, to_timm_layout(state, vit, origin), spec, origin)
    demo = demo_vit.source_of_file(files[0]) if len(files) == 1 and label is None else None
    if demo is not None:
        return demo
    where = ", ".join(f"file {f} sha256:{sha256_file(f)}" for f in files)
    return f"{label} ({where})" if label else where


def _load_auto(vit: nn.Module, spec: BackboneSpec) -> str:
    if spec.name == "demo-vit":
        return demo_vit.load_demo_vit_into(vit)
    if spec.hf_dir:
        folder = Path(spec.hf_dir)
        files = hf_weight_files(folder)
        if not files and spec.hf_id and hub.offline_reason() is None:
            files = [Path(hub.hf_download(spec.hf_id, "model.safetensors"))]
        if not files:
            raise UserError(f"{folder} has no weights ({', '.join(HF_WEIGHT_FILES)}): {WAYS_FORWARD}")
        return _load_files(vit, spec, files, label=f"hf {spec.hf_id}" if spec.hf_id else None)
    found = hub.cached_weights(spec)
    if found:
        path, label = found[0]
        return _load_files(vit, spec, [path], label=label)
    reason = hub.offline_reason()
    if reason is not None:
        looked = [str(hub.torch_hub_checkpoints_dir() / spec.hub_file)] if spec.hub_file else []
        repos = hub.hub_repos(spec)
        if repos:
            looked.append(f"{' and '.join(repos)} in {hub.hf_cache_dir()}")
        where = f"looked for {' and '.join(looked)}" if looked else "it has no known pretrained weights"
        raise UserError(
            f"no cached pretrained weights for '{spec.name}' ({where}) and {reason}: {hub.ways_forward(spec)}"
        )
    path, label = hub.download(spec)
    return _load_files(vit, spec, [path], label=label)
