"""One constructor for every method (ViT-Split, a baseline, ViT-Adapter, ViT-CoMer), from arguments or saved config."""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from ..backbones import Backbone
from ..errors import UserError
from .adapter_baseline import ViTAdapterBaseline
from .baselines import Baseline
from .comer_baseline import ViTCoMerBaseline
from .configs import METHODS
from .vit_adapter import AdapterConfig
from .vit_comer import CoMerConfig
from .vit_split import ViTSplit


def build_model(
    method: str,
    backbone: Backbone,
    task: str,
    num_classes: int,
    *,
    k_t: int | None = None,
    prior_layers: Iterable[int] | None = None,
    masks: bool = True,
    det_preset: str = "coco",
    lora_rank: int = 8,
    lora_alpha: int = 16,
    deform_impl: str = "fast",
    head: str = "linear",
    adapter: AdapterConfig | None = None,
    comer: CoMerConfig | None = None,
) -> nn.Module:
    """:class:`ViTSplit` (``method="vitsplit"``, with ``k_t`` and ``prior_layers``), a
    :class:`Baseline` (linear, full, lora; ``head`` linear or upernet) or a
    :class:`ViTAdapterBaseline` (``vit-adapter``; ``adapter``: its configuration, default the published
    one for the backbone) or a :class:`ViTCoMerBaseline` (``vit-comer``; ``comer``: its configuration) on
    ``backbone``, which the model takes over."""
    if method not in METHODS:
        raise UserError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
    if method == "vitsplit":
        if head != "linear":
            raise UserError(f"ViT-Split has its own linear segmentation head; --head {head} is for the baselines")
        return ViTSplit(
            backbone, k_t, prior_layers, task, num_classes, masks=masks, deform_impl=deform_impl, det_preset=det_preset
        )
    if method == "vit-adapter":
        return ViTAdapterBaseline(backbone, task, num_classes, head=head, config=adapter)
    if method == "vit-comer":
        return ViTCoMerBaseline(backbone, task, num_classes, head=head, config=comer)
    return Baseline(
        backbone,
        method,
        task,
        num_classes,
        masks=masks,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        det_preset=det_preset,
        head=head,
    )


def model_from_config(config: dict[str, Any], backbone: Backbone, *, deform_impl: str = "fast") -> nn.Module:
    """Rebuild the model whose ``config()`` is ``config`` on ``backbone`` (fresh trainable weights)."""
    try:
        adapter = config.get("adapter")
        if adapter is not None:
            adapter = AdapterConfig(
                **{**adapter, "interaction_indexes": tuple(tuple(g) for g in adapter["interaction_indexes"])}
            )
        return build_model(
            config.get("method", "vitsplit"),
            backbone,
            config["task"],
            int(config["num_classes"]),
            k_t=config.get("k_t"),
            prior_layers=config.get("prior_layers"),
            masks=bool(config["masks"]),
            det_preset=config.get("det_preset") or "coco",
            lora_rank=config.get("lora_rank") or 8,
            lora_alpha=config.get("lora_alpha") or 16,
            deform_impl=deform_impl,
            head=config.get("head") or "linear",
            adapter=adapter,
            comer=CoMerConfig.from_dict(config["comer"]) if config.get("comer") is not None else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"the saved model config lacks or mangles a field ({e}); it was not written by this version"
        ) from e
