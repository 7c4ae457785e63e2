"""The ``vit-adapter`` method: ViT-Adapter (Chen et al., ICLR 2023) + a segmentation head, trained
by the same trainer as ViT-Split and the other baselines (the interface of
:class:`vitsplit.baselines.Baseline`: ``forward``, ``loss``, ``trainable_state_dict``,
``load_trainable_state_dict``, ``param_groups``, ``config``).

Heads: ``upernet`` (the published configuration: UperNet on the four adapter levels with the
auxiliary FCN head on level 2, loss weight 0.4) or ``linear`` (BatchNorm + 1x1 conv on the 1/4
level, the toolkit's linear head). Segmentation only: the ViT-Split paper compares against
ViT-Adapter on ADE20K.

Optimiser groups follow the release's ``LayerDecayOptimizerConstructor`` (from BEiT): with L ViT
blocks, block i gets lr x 0.95^(L - i), the patch and position embeddings lr x 0.95^(L + 1), every
other parameter (adapter, heads) the full lr; 1-D parameters and biases get no weight decay.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..backbones import Backbone, backbone_config, state_hash
from ..errors import UserError
from .baselines import LinearSegHead, check_head, load_trainable
from .upernet import UperNetSegHead
from .vit_adapter import AdapterConfig, ViTAdapter

LAYER_DECAY = 0.95  # the released ViT-Adapter ADE20K configs' layer_decay_rate


class ViTAdapterBaseline(nn.Module):
    """``ViTAdapterBaseline(backbone, task, num_classes, head="linear", config=None)``; takes over ``backbone``."""

    method = "vit-adapter"

    def __init__(
        self,
        backbone: Backbone,
        task: str,
        num_classes: int,
        *,
        head: str = "linear",
        config: AdapterConfig | None = None,
    ):
        super().__init__()
        if task != "seg":
            raise UserError(
                f"--method {self.method} is built for segmentation (the paper's comparison), not '{task}'; "
                "use vitsplit, linear, full or lora for det/depth"
            )
        check_head(head, self.method, task)
        self.task, self.head_name, self.num_classes = task, head, int(num_classes)
        self._built_on_sha256 = state_hash(backbone)  # the weights training starts from (recorded, checked on load)
        self.adapter = self.build_body(backbone, config)
        c = backbone.embed_dim
        self.head: nn.Module = (
            UperNetSegHead([c] * 4, self.num_classes) if head == "upernet" else LinearSegHead(c, self.num_classes)
        )

    config_key = "adapter"  # where config() records the body's configuration

    @staticmethod
    def build_body(backbone: Backbone, config: Any) -> nn.Module:
        """The pyramid-producing body on the backbone (here :class:`ViTAdapter`)."""
        return ViTAdapter(backbone, config)

    @property
    def backbone(self) -> Backbone:
        return self.adapter.backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) normalised -> logits (B, K, H, W)."""
        size = tuple(images.shape[-2:])
        feats = self.adapter(images)
        return self.head(feats, size) if self.head_name == "upernet" else self.head(feats[0], size)

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        label = batch["seg"].to(images.device)
        feats = self.adapter(images)
        if self.head_name == "upernet":
            return self.head.loss(feats, label)
        ce = self.head.loss(self.head(feats[0], tuple(images.shape[-2:])), label)
        return {"loss": ce, "loss_ce": ce.detach()}

    def _frozen_keys(self) -> set[str]:
        """The backbone parameters the adapter never runs (frozen by :class:`ViTAdapter`)."""
        return {f"adapter.backbone.vit.{n}" for n, p in self.backbone.vit.named_parameters() if not p.requires_grad}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything training changes: adapter, ViT (all but its unused cls token, final norm, ...), head,
        BN buffers."""
        frozen = self._frozen_keys()
        return {k: v for k, v in self.state_dict().items() if k not in frozen}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable(self, state, f"{self.method} model")

    def param_groups(self, lr: float, weight_decay: float = 1e-2) -> list[dict[str, Any]]:
        """Layer-wise lr decay (see the module docstring); one group per (scale, decay) pair (no
        ``pretrained_lr_scale``: the decay sets the backbone's lr)."""
        depth = self.backbone.num_layers
        groups: dict[tuple[int, bool], dict[str, Any]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("adapter.backbone.vit.blocks."):
                layer = int(name.split(".")[4]) + 1
            elif name.startswith(("adapter.backbone.vit.patch_embed", "adapter.backbone.vit.pos_embed")):
                layer = 0
            else:
                layer = depth + 1
            no_decay = p.dim() == 1 or name.endswith(".bias")
            key = (layer, no_decay)
            if key not in groups:
                groups[key] = {
                    "params": [],
                    "lr": lr * LAYER_DECAY ** (depth + 1 - layer),
                    "weight_decay": 0.0 if no_decay else weight_decay,
                    "name": f"layer{layer}{'_no_decay' if no_decay else ''}",
                }
            groups[key]["params"].append(p)
        return [groups[k] for k in sorted(groups)]

    def backbone_sha256(self) -> str:
        """:func:`~vitsplit.backbones.state_hash` of the backbone weights before training."""
        return self._built_on_sha256

    def config(self) -> dict[str, Any]:
        """JSON-ready: method, task, head, the adapter configuration and the backbone it was built on."""
        return {
            "method": self.method,
            "task": self.task,
            "head": self.head_name,
            "num_classes": self.num_classes,
            "masks": False,
            self.config_key: self.adapter.config.to_dict(),
            "backbone": backbone_config(self.backbone, state_sha256=self._built_on_sha256),
        }
