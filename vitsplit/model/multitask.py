"""Several ViT-Split tasks on one frozen backbone pass (the paper's multi-task deployment, Sec. 3.4).

One no-grad pass computes every block any task reads (the union of their needed layers, stopping
at the deepest); each task's :class:`~vitsplit.model.vit_split.SplitHeads` then runs on those shared frozen
tokens. Outputs equal those of separate single-task :class:`~vitsplit.model.vit_split.ViTSplit` models with
the same weights; the saving is the repeated backbone computation.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..backbones import Backbone
from ..errors import UserError
from .configs import PRETRAINED_LR_SCALE
from .vit_split import SplitHeads, ViTSplit, _param_groups, freeze_backbone, frozen_pass


class MultiTaskViTSplit(nn.Module):
    """``MultiTaskViTSplit(backbone, {name: heads})`` where each value is a :class:`SplitHeads`
    (e.g. ``vitsplit_model.split``, shared, not copied) or the keyword arguments of one:
    ``{"k_t": 3, "prior_layers": [2, 5, 8, 11], "task": "seg", "num_classes": 150}``.
    """

    def __init__(
        self, backbone: Backbone, heads: Mapping[str, SplitHeads | Mapping[str, Any]], *, deform_impl: str = "fast"
    ):
        super().__init__()
        if not heads:
            raise UserError("a multi-task model needs at least one task")
        built = {}
        for name, h in heads.items():
            if isinstance(h, SplitHeads):
                if h.num_layers != backbone.num_layers:
                    raise UserError(f"task '{name}' was built for a {h.num_layers}-block backbone, not {backbone.name}")
                built[name] = h
            else:
                kw = dict(h)
                built[name] = SplitHeads(
                    backbone,
                    kw.pop("k_t"),
                    kw.pop("prior_layers"),
                    kw.pop("task"),
                    kw.pop("num_classes", 1),
                    deform_impl=deform_impl,
                    **kw,
                )
        self.heads = nn.ModuleDict(built)
        self.backbone = backbone
        freeze_backbone(backbone)

    @classmethod
    def from_models(cls, models: Mapping[str, ViTSplit]) -> "MultiTaskViTSplit":
        """Combine single-task models that share one backbone object (their heads are shared)."""
        backbones = {id(m.backbone) for m in models.values()}
        if len(backbones) != 1:
            raise UserError(
                "multi-task models must share one backbone object (build every ViTSplit on the same backbone)"
            )
        bb = next(iter(models.values())).backbone
        return cls(bb, {name: m.split for name, m in models.items()})

    @property
    def needed_layers(self) -> list[int]:
        """Union of every task's frozen layers (sorted)."""
        return sorted(set().union(*(h.needed_layers for h in self.heads.values())))

    def train(self, mode: bool = True) -> "MultiTaskViTSplit":
        super().train(mode)
        self.backbone.eval()
        return self

    def fused(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) normalised -> {task: fused (B, C, h, w)} from one frozen pass."""
        feats = frozen_pass(self.backbone, images, self.needed_layers)
        hw = self.backbone.grid_size(*images.shape[-2:])
        return {name: h.fuse(self.backbone, feats, hw) for name, h in self.heads.items()}

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        """{task: that task's predictions} (see :meth:`ViTSplit.forward`)."""
        size = tuple(images.shape[-2:])
        return {name: self.heads[name].predict(f, size) for name, f in self.fused(images).items()}

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Sum of every task's total as "loss", plus "NAME/part" entries. ``batch`` carries every
        task's targets."""
        images = batch["image"]
        size = tuple(images.shape[-2:])
        out: dict[str, torch.Tensor] = {}
        total = None
        for name, f in self.fused(images).items():
            parts = self.heads[name].compute_loss(f, batch, size)
            total = parts["loss"] if total is None else total + parts["loss"]
            out.update({f"{name}/{k}": (v.detach() if k == "loss" else v) for k, v in parts.items()})
        out["loss"] = total
        return out

    def param_groups(
        self, lr: float, weight_decay: float = 1e-2, pretrained_lr_scale: float = PRETRAINED_LR_SCALE
    ) -> list[dict[str, Any]]:
        """Every task's task heads at lr x ``pretrained_lr_scale`` (the release: 0.1), the rest at lr."""
        return _param_groups(self.heads.values(), lr, weight_decay, pretrained_lr_scale)
