"""The one file format for trained weights: ``model.safetensors`` = trainable weights + config + backbone hash.

Tensors: the model's ``trainable_state_dict()`` (everything training changes, BatchNorm buffers
included). Metadata (JSON strings): ``"format"`` (``FORMAT``), ``"vitsplit_config"`` (the model's
``config()``: method, task, head settings and ``"backbone"`` with its name, weights source, shape and
``state_sha256``, the hash of the weights the model was built on), and, when ``cka-split train``
wrote it, ``"train_config"`` (the resolved TrainConfig, so that the backbone can be rebuilt).

Every load goes through :func:`check_backbone`: a backbone of another shape, or with other weights
than the recorded hash, is refused with a :class:`~vitsplit.errors.UserError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..backbones import Backbone, build_backbone, state_hash
from ..errors import UserError
from ..fileio import atomic_write, read_safetensors
from .build import model_from_config

FORMAT = "cka-split trained weights 1"
FILE_NAME = "model.safetensors"


@dataclass
class TrainedFile:
    """What :func:`read_trained` returns."""

    path: Path
    model_config: dict[str, Any]
    train_config: dict[str, Any] | None
    state: dict[str, torch.Tensor]


def save_trained(model: nn.Module, path: str | Path, train_config: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s trainable weights and config (and ``train_config`` if given), atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    meta = {"format": FORMAT, "vitsplit_config": json.dumps(model.config())}
    if train_config is not None:
        meta["train_config"] = json.dumps(train_config)
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def read_trained(path: str | Path) -> TrainedFile:
    """Read a file written by :func:`save_trained` (``path`` may be the run directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise UserError(f"{path} does not exist: give a training output directory or its {FILE_NAME}")
    meta, state = read_safetensors(path)
    if "vitsplit_config" not in meta:
        raise UserError(
            f"{path} has no model config in its metadata: it was not written by cka-split "
            "(cka-split train or vitsplit.model.save_trained)"
        )
    try:
        model_config = json.loads(meta["vitsplit_config"])
        train_config = json.loads(meta["train_config"]) if "train_config" in meta else None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} has a corrupt config in its metadata ({e}): train again") from e
    return TrainedFile(path, model_config, train_config, state)


def check_backbone(trained: TrainedFile, backbone: Backbone) -> None:
    """Refuse ``backbone`` unless it has the recorded shape and weights (``state_sha256``)."""
    want = trained.model_config.get("backbone") or {}
    path = trained.path
    if (backbone.num_layers, backbone.embed_dim) != (want.get("num_layers"), want.get("embed_dim")):
        raise UserError(
            f"{path} was trained on {want.get('name')} ({want.get('num_layers')} blocks, width "
            f"{want.get('embed_dim')}); the given backbone {backbone.name} has {backbone.num_layers} blocks, "
            f"width {backbone.embed_dim}"
        )
    recorded = want.get("state_sha256")
    if not recorded:
        raise UserError(
            f"{path} does not record the hash of its backbone's weights, so it cannot be checked: "
            "train it again with this version"
        )
    got = state_hash(backbone)
    if got != recorded:
        raise UserError(
            f"{path} was trained on backbone weights {recorded[:12]} ({want.get('weights_source')}); "
            f"the given backbone's weights are {got[:12]} ({backbone.weights_source}): load the same weights"
        )


def load_trainable(path: str | Path, backbone: Backbone, *, deform_impl: str = "fast") -> nn.Module:
    """Rebuild the trained model on ``backbone`` (which must be the one it was trained on, see
    :func:`check_backbone`) and load its trainable weights. Returns the model in eval mode."""
    trained = read_trained(path)
    check_backbone(trained, backbone)
    model = model_from_config(trained.model_config, backbone, deform_impl=deform_impl)
    model.load_trainable_state_dict(trained.state)
    return model.eval()


def load_trained(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, its resolved training config as a dict) from a run directory or its
    ``model.safetensors``: the backbone is rebuilt from the training config's model and weights and
    checked against the recorded hash (full fine-tuning and LoRA then restore their trained weights)."""
    trained = read_trained(path)
    cfg = trained.train_config
    if cfg is None:
        raise UserError(
            f"{trained.path} was not written by 'cka-split train' (no training config in its metadata); "
            "load it with vitsplit.model.load_trainable(path, backbone)"
        )
    if cfg.get("weights") == "given":
        raise UserError(
            f"{trained.path} was trained on a backbone given through the Python API; rebuild that backbone "
            "and call vitsplit.model.load_trainable(path, backbone)"
        )
    seed = cfg.get("seed") if cfg.get("weights") == "random" else None
    backbone = build_backbone(cfg["model"], cfg["weights"], seed=seed)
    check_backbone(trained, backbone)
    model = model_from_config(trained.model_config, backbone)
    model.load_trainable_state_dict(trained.state)
    return model.eval(), cfg
