"""One constructor for every method: ViT-Split or a baseline, from arguments or from a saved config."""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from ..backbones import Backbone
from ..errors import UserError
from .baselines import Baseline
from .configs import METHODS
from .vit_split import ViTSplit


def build_model(method: str, backbone: Backbone, task: str, num_classes: int, *, k_t: int | None = None,
                prior_layers: Iterable[int] | None = None, masks: bool = True, det_preset: str = "coco",
                lora_rank: int = 8, lora_alpha: int = 16, deform_impl: str = "fast") -> nn.Module:
    """:class:`ViTSplit` (``method="vitsplit"``, with ``k_t`` and ``prior_layers``) or a
    :class:`Baseline` (linear, full, lora) on ``backbone``, which the model takes over."""
    if method not in METHODS:
        raise UserError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
    if method == "vitsplit":
        return ViTSplit(backbone, k_t, prior_layers, task, num_classes, masks=masks, deform_impl=deform_impl,
                        det_preset=det_preset)
    return Baseline(backbone, method, task, num_classes, masks=masks, lora_rank=lora_rank, lora_alpha=lora_alpha,
                    det_preset=det_preset)


def model_from_config(config: dict[str, Any], backbone: Backbone, *, deform_impl: str = "fast") -> nn.Module:
    """Rebuild the model whose ``config()`` is ``config`` on ``backbone`` (fresh trainable weights)."""
    try:
        return build_model(config.get("method", "vitsplit"), backbone, config["task"], int(config["num_classes"]),
                           k_t=config.get("k_t"), prior_layers=config.get("prior_layers"), masks=bool(config["masks"]),
                           det_preset=config.get("det_preset") or "coco", lora_rank=config.get("lora_rank") or 8,
                           lora_alpha=config.get("lora_alpha") or 16, deform_impl=deform_impl)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"the saved model config lacks or mangles a field ({e}); it was not written by this version") from e
