"""Baselines trained by the same trainer as ViT-Split: ``linear``, ``full`` and ``lora``.

All three put a head on the backbone's **final** feature map (final-normed patch tokens reshaped
to (B, C, h, w)) and expose ViT-Split's interface: ``forward(images)``, ``loss(batch)``,
``trainable_state_dict()``, ``load_trainable_state_dict(state)``, ``param_groups(lr, wd)``, ``config()``.

- ``linear``: frozen backbone (no grad, eval mode); segmentation head = BatchNorm + 1x1 conv with
  bilinearly upsampled logits, DINOv2's linear evaluation (Oquab et al. 2023, ``BNHead`` of the
  DINOv2 segmentation configs, "lin." setting on the last layer).
- ``full``: every backbone parameter trained, same head.
- ``lora``: LoRA (Hu et al. 2022) from ``peft`` on each block's attention ``qkv``/``proj`` and MLP
  ``fc1``/``fc2`` (SwiGLU: ``fc1_g``/``fc1_x``/``fc2``); the pretrained weights stay frozen; same head.

Segmentation head (``head``): ``linear`` (above) or, for ``full`` and ``lora``, ``upernet``: UperNet
with its auxiliary FCN head (:mod:`.upernet`) on a parameter-free four-level pyramid of four
intermediate blocks (:mod:`.plain_pyramid`), the "DINOv2 + UperNet" rows of the ViT-Split paper.

Detection and depth use :class:`~vitsplit.model.heads.DetHead` / :class:`~vitsplit.model.heads.DepthHead` on the
final map, as ViT-Split uses them on its fused map. Learning rates: parameters that start from
pretrained weights (the backbone under ``full``) get lr x ``PRETRAINED_LR_SCALE`` (0.1), as ViT-Split's task head
(copied
pretrained blocks) does; new parameters (heads, LoRA matrices) get lr.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone, backbone_config, state_hash
from ..backbones.backbone import tensors_hash
from ..errors import UserError
from .configs import BASELINES, HEADS, PRETRAINED_LR_SCALE, TASKS, UPERNET_METHODS
from .heads import DepthHead, DetHead, SegHead
from .plain_pyramid import PlainPyramid, pyramid_layers
from .upernet import UperNetSegHead

METHODS = BASELINES
# fc1_g / fc1_x: the gate and value linears of timm's SwiGLU MLP (DINOv3 S+/H+/7B, EVA-02).
LORA_TARGETS = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc1_g|fc1_x|fc2))"


def call_qkv_as_module(vit: nn.Module) -> None:
    """Make timm's Eva attention call its ``qkv`` linear as a module. With a qkv bias (EVA-02,
    DINOv3 ``_qkvb``) it otherwise computes ``F.linear(x, qkv.weight, bias)`` directly, which would
    bypass a LoRA adapter on ``qkv`` without a word; its ``qkv_bias_separate`` path computes
    ``qkv(x) + bias`` instead, the same function."""
    for m in vit.modules():
        if hasattr(m, "qkv_bias_separate") and getattr(m, "q_bias", None) is not None:
            m.qkv_bias_separate = True


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``model`` when its keys are exactly ``model.trainable_state_dict()``'s;
    otherwise a UserError naming ``what`` (e.g. "full baseline") and the first keys that differ."""
    want = set(model.trainable_state_dict())
    missing, unexpected = want - set(state), set(state) - want
    if missing or unexpected:
        raise UserError(
            f"checkpoint does not fit this {what} (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); build the model with the checkpoint's config"
        )
    model.load_state_dict(state, strict=False)


class LinearSegHead(nn.Module):
    """(B, C, h, w) -> BatchNorm -> 1x1 conv -> logits (B, K, H, W), bilinear to the image size."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.cls(self.bn(feats)), size=size, mode="bilinear", align_corners=False)

    loss = SegHead.loss  # the same cross-entropy (mmseg 0.20 averaging) as ViT-Split's head


def check_head(head: str, method: str, task: str) -> None:
    """Refuse a head the method/task cannot take (``UserError``): UperNet is a segmentation head
    for the methods that train the backbone (:data:`~vitsplit.model.configs.UPERNET_METHODS`)."""
    if head not in HEADS:
        raise UserError(f"unknown head '{head}': use {' or '.join(HEADS)}")
    if head == "upernet" and (task != "seg" or method not in UPERNET_METHODS):
        raise UserError(
            f"--head upernet is a segmentation head for --method {', '.join(UPERNET_METHODS)}; "
            f"not for --method {method} --task {task}"
        )


class Baseline(nn.Module):
    """``Baseline(backbone, method, task, num_classes, masks=True, lora_rank=8, lora_alpha=16, head="linear")``."""

    def __init__(
        self,
        backbone: Backbone,
        method: str,
        task: str,
        num_classes: int = 1,
        *,
        masks: bool = True,
        lora_rank: int = 8,
        lora_alpha: int = 16,
        det_preset: str = "coco",
        head: str = "linear",
    ):
        super().__init__()
        self.det_preset = det_preset
        if method not in METHODS:
            raise UserError(f"unknown baseline method '{method}': use one of {', '.join(METHODS)}")
        if task not in TASKS:
            raise UserError(f"unknown task '{task}': use one of {', '.join(TASKS)}")
        check_head(head, method, task)
        self.head_name = head
        if task in ("det", "depth") and backbone.embed_dim % 32:
            raise UserError(
                f"{backbone.name} has width {backbone.embed_dim}; the det/depth heads' GroupNorm(32, C) needs a "
                f"multiple of 32"
            )
        self.method, self.task = method, task
        self.num_classes = int(num_classes) if task != "depth" else 1
        self.masks = bool(masks) if task == "det" else False
        self.lora_rank, self.lora_alpha = int(lora_rank), int(lora_alpha)
        self.backbone = backbone
        C = backbone.embed_dim
        for p in backbone.parameters():
            p.requires_grad_(method == "full")
        # Full fine-tuning changes the backbone: remember the weights the model was built on (the
        # trained-weights file records them, and loading checks them).
        self._built_on_sha256 = state_hash(backbone) if method == "full" else None
        if method == "lora":
            # noqa: PLC0415 - peft takes seconds to import; only LoRA needs it
            from peft import LoraConfig, inject_adapter_in_model

            call_qkv_as_module(backbone.vit)
            cfg = LoraConfig(
                r=self.lora_rank, lora_alpha=self.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none"
            )
            inject_adapter_in_model(cfg, backbone.vit)
            for n, p in backbone.named_parameters():
                p.requires_grad_("lora_" in n)
        if task == "seg" and head == "upernet":
            self.pyramid_layers = pyramid_layers(backbone.num_layers)
            self.pyramid = PlainPyramid()
            self.head: nn.Module = UperNetSegHead([C] * 4, self.num_classes)
        elif task == "seg":
            self.head = LinearSegHead(C, self.num_classes)
        elif task == "depth":
            self.head = DepthHead(C)
        else:
            self.head = DetHead(C, self.num_classes, self.masks, patch_size=backbone.patch_size, preset=det_preset)

    def train(self, mode: bool = True) -> "Baseline":
        super().train(mode)
        if self.method == "linear":
            self.backbone.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) normalised -> final-normed patch-token map (B, C, h, w)."""
        hw = self.backbone.grid_size(*images.shape[-2:])
        if self.method == "linear":
            with torch.no_grad():
                tokens = self.backbone(images)
        else:
            tokens = self.backbone(images)
        return self.backbone.tokens_to_map(tokens, hw)

    def pyramid_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, 3, H, W) normalised -> the four maps UperNet reads: blocks :func:`pyramid_layers`,
        final-normed, at 4x, 2x, 1x and 0.5x the patch grid (:class:`PlainPyramid`)."""
        hw = self.backbone.grid_size(*images.shape[-2:])
        layers = self.backbone.forward_layers(images, self.pyramid_layers)
        return self.pyramid(
            [self.backbone.tokens_to_map(self.backbone.final_norm(layers[i]), hw) for i in self.pyramid_layers]
        )

    def forward(self, images: torch.Tensor) -> Any:
        """Seg logits (B, K, H, W) | depth (B, 1, H, W) metres | det list of dicts (torchvision style)."""
        size = tuple(images.shape[-2:])
        if self.head_name == "upernet":
            return self.head(self.pyramid_features(images), size)
        f = self.features(images)
        if self.task == "depth":
            return torch.exp(self.head(f, size))
        return self.head(f, size)

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Same losses as ViT-Split: CE (seg), scale-invariant log (depth), Mask/Faster R-CNN (det)."""
        images = batch["image"]
        size = tuple(images.shape[-2:])
        if self.head_name == "upernet":
            return self.head.loss(self.pyramid_features(images), batch["seg"].to(images.device))
        f = self.features(images)
        if self.task == "seg":
            ce = self.head.loss(self.head(f, size), batch["seg"].to(f.device))
            return {"loss": ce, "loss_ce": ce.detach()}
        if self.task == "depth":
            si = DepthHead.loss(self.head(f, size), batch["depth"].to(f.device))
            return {"loss": si, "loss_silog": si.detach()}
        keys = ("boxes", "labels", "masks") if self.masks else ("boxes", "labels")
        targets = [{k: batch[k][i] for k in keys} for i in range(f.shape[0])]
        parts = self.head.loss(f, targets, size)
        return {"loss": sum(parts.values()), **{k: v.detach() for k, v in parts.items()}}

    def _is_trainable_key(self, key: str) -> bool:
        return key.startswith("head.") or self.method == "full" or (self.method == "lora" and "lora_" in key)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What training changes: the head (with BN buffers), plus all backbone weights (full) or
        the LoRA matrices (lora)."""
        return {k: v for k, v in self.state_dict().items() if self._is_trainable_key(k)}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable(self, state, f"{self.method} baseline")

    def param_groups(
        self, lr: float, weight_decay: float = 1e-2, pretrained_lr_scale: float = PRETRAINED_LR_SCALE
    ) -> list[dict[str, Any]]:
        """The new weights (head, LoRA matrices) at lr; the backbone under ``full`` at lr x
        ``pretrained_lr_scale`` (the release: 0.1)."""
        pretrained = [p for p in self.backbone.parameters() if p.requires_grad] if self.method == "full" else []
        new = [p for n, p in self.named_parameters() if p.requires_grad and (n.startswith("head.") or "lora_" in n)]
        groups = [{"params": new, "lr": lr, "weight_decay": weight_decay, "name": "heads"}]
        if pretrained:
            groups.insert(
                0,
                {
                    "params": pretrained,
                    "lr": lr * pretrained_lr_scale,
                    "weight_decay": weight_decay,
                    "name": "backbone",
                },
            )
        return groups

    def backbone_sha256(self) -> str:
        """:func:`~vitsplit.backbones.state_hash` of the backbone this model was built on: the frozen
        backbone (linear); the weights before training (full); the frozen base weights under LoRA,
        hashed with the names they have without the adapters (lora)."""
        if self.method == "full":
            return self._built_on_sha256
        if self.method == "lora":
            return tensors_hash(
                {k.replace(".base_layer.", "."): v for k, v in self.backbone.state_dict().items() if "lora_" not in k}
            )
        return state_hash(self.backbone)

    def config(self) -> dict[str, Any]:
        """JSON-ready: method, task, head settings and the backbone it was built on (with its hash)."""
        info = backbone_config(self.backbone, state_sha256=self.backbone_sha256())
        return {
            "method": self.method,
            "task": self.task,
            "head": self.head_name,
            "num_classes": self.num_classes,
            "masks": self.masks,
            "det_preset": self.det_preset if self.task == "det" else None,
            "lora_rank": self.lora_rank if self.method == "lora" else None,
            "lora_alpha": self.lora_alpha if self.method == "lora" else None,
            "backbone": info,
        }
