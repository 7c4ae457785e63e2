"""ViT-Split (Li et al., "ViT-Split: Unleashing the Power of Vision Foundation Models via Efficient
Splitting Heads", ICCV 2025), as the public release builds it (``docs/architecture.md``).

A frozen backbone runs once (no grad, stopping at the deepest block anyone reads). Trainable parts
(:class:`SplitHeads`):
- task head: a deep copy of the last K_t blocks ``[L-K_t, ..., L-1]``, fed the detached token
  sequence after block ``L-K_t-1`` (the copies are called as the backbone's family calls its
  blocks: with the grid's RoPE for DINOv3/EVA-02, on the 2D grid for SAM); its output goes through
  the backbone's frozen final norm, the prefix tokens (class token, registers; none for SigLIP and
  SAM) are dropped and patch tokens become a (B, C, h, w) map;
- prior head: the listed frozen layers' patch tokens (final-normed) concatenated on channels,
  then Conv 1x1 (K_p*C -> C) + GELU + DeformBlock + GELU;
- fusion net: [prior, task] -> Conv 1x1 (2C -> C) + GELU + DeformBlock + GELU;
- the task's head (:mod:`vitsplit.model.heads`).

:class:`ViTSplit` is one backbone plus one :class:`SplitHeads`; :mod:`vitsplit.model.multitask` puts
several :class:`SplitHeads` on one frozen pass.
"""

from __future__ import annotations

import copy
import numbers
from typing import Any, Iterable

import torch
from torch import nn

from ..backbones import Backbone, BlockContext, backbone_config
from ..errors import UserError
from ..ops.deform_conv import set_deform_impl
from .configs import PRETRAINED_LR_SCALE, TASKS
from .deform_block import DeformBlock
from .heads import DepthHead, DetHead, SegHead


def count_trainable(module: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (shared parameters counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters() if p.requires_grad}.values())


class TaskHead(nn.Module):
    """Deep copy of blocks ``[L-K_t, ..., L-1]`` (trainable). (B, T, C) tokens -> (B, T, C).

    The copies are called the way their family calls its blocks (:mod:`vitsplit.backbones.families`):
    with the patch grid's RoPE embedding for DINOv3 / EVA-02, on the 2D token grid for SAM; ``ctx``
    is the backbone's :meth:`~vitsplit.backbones.Backbone.block_context` of the grid."""

    def __init__(self, backbone: Backbone, k_t: int):
        super().__init__()
        first = backbone.num_layers - k_t
        self.first_layer = first
        self.family = backbone.family
        blocks = backbone.family.blocks(backbone.vit)
        self.blocks = nn.Sequential(*[copy.deepcopy(blocks[i]) for i in range(first, backbone.num_layers)])
        for p in self.blocks.parameters():
            p.requires_grad_(True)

    def forward(self, tokens: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            tokens = self.family.call_block(block, tokens, ctx, self.first_layer + i)
        return tokens


class PriorHead(nn.Module):
    """(B, K_p*C, h, w) concatenated frozen features -> (B, C, h, w)."""

    def __init__(self, channels: int, k_p: int, *, deform_impl: str = "fast"):
        super().__init__()
        self.reduce = nn.Conv2d(k_p * channels, channels, 1)
        self.act1 = nn.GELU()
        self.deform = DeformBlock(channels, channels, impl=deform_impl)
        self.act2 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.deform(self.act1(self.reduce(x))))


class FusionNet(nn.Module):
    """[prior (B, C, h, w), task (B, C, h, w)] -> fused (B, C, h, w)."""

    def __init__(self, channels: int, *, deform_impl: str = "fast"):
        super().__init__()
        self.reduce = nn.Conv2d(2 * channels, channels, 1)
        self.act1 = nn.GELU()
        self.deform = DeformBlock(channels, channels, impl=deform_impl)
        self.act2 = nn.GELU()
        # The release defines this BatchNorm in its fusion module but its forward never calls it.
        # It is kept (and never called) only so that trainable-parameter totals equal the published
        # ones (10.23M / 40.52M / 88.64M / 326.53M); it has no effect on outputs or gradients.
        self.unused_norm = nn.BatchNorm2d(channels)

    def forward(self, prior: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        return self.act2(self.deform(self.act1(self.reduce(torch.cat([prior, task], dim=1)))))


def _is_int(v: Any) -> bool:
    """An integer (Python or NumPy/torch integer scalar), not a bool or a float."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_args(backbone: Backbone, k_t: Any, prior_layers: Any, task: Any, num_classes: Any) -> tuple[int, list[int]]:
    L, C = backbone.num_layers, backbone.embed_dim
    if task not in TASKS:
        raise UserError(f"unknown task '{task}': use one of {', '.join(TASKS)}")
    if not _is_int(k_t) or not 1 <= k_t <= L - 1:
        raise UserError(
            f"K_t={k_t!r} is impossible for {backbone.name} with {L} blocks: use an integer in [1, {L - 1}]"
        )
    layers = list(prior_layers) if isinstance(prior_layers, Iterable) and not isinstance(prior_layers, str) else None
    if not layers or not all(_is_int(i) for i in layers):
        raise UserError(f"prior layers {prior_layers!r} must be a non-empty list of block indices in [0, {L - 1}]")
    bad = [i for i in layers if not 0 <= i <= L - 1]
    if bad:
        raise UserError(f"prior layers {bad} are outside [0, {L - 1}] for {backbone.name} (0-based block indices)")
    if task in ("seg", "det") and (not _is_int(num_classes) or num_classes < 1):
        raise UserError(f"num_classes={num_classes!r} must be a positive integer for task '{task}'")
    if C % 32:
        raise UserError(
            f"{backbone.name} has width {C}; ViT-Split's GroupNorm(32, C) heads need a width divisible by 32"
        )
    return int(k_t), [int(i) for i in layers]


class SplitHeads(nn.Module):
    """Everything trainable for one task: task head, prior head, fusion net and the task's head.

    It reads frozen token sequences ``{layer: (B, T, C)}`` produced by a backbone pass over
    :attr:`needed_layers`. ``deform_impl`` picks the deformable conv ("fast" or "torchvision").
    """

    def __init__(
        self,
        backbone: Backbone,
        k_t: int,
        prior_layers: Iterable[int],
        task: str,
        num_classes: int = 1,
        *,
        masks: bool = True,
        deform_impl: str = "fast",
        det_preset: str = "coco",
    ):
        super().__init__()
        self.det_preset = det_preset
        self.k_t, self.prior_layers = _check_args(backbone, k_t, prior_layers, task, num_classes)
        self.task = task
        self.num_classes = int(num_classes) if task != "depth" else 1
        self.masks = bool(masks) if task == "det" else False
        self.num_layers = backbone.num_layers
        C = backbone.embed_dim
        self.task_head = TaskHead(backbone, self.k_t)
        self.prior_head = PriorHead(C, len(self.prior_layers), deform_impl=deform_impl)
        self.fusion = FusionNet(C, deform_impl=deform_impl)
        if task == "seg":
            self.head: nn.Module = SegHead(C, self.num_classes)
        elif task == "depth":
            self.head = DepthHead(C)
        else:
            self.head = DetHead(C, self.num_classes, self.masks, patch_size=backbone.patch_size, preset=det_preset)

    @property
    def task_input_layer(self) -> int:
        """The frozen block whose output feeds the task head: L - K_t - 1."""
        return self.num_layers - self.k_t - 1

    @property
    def needed_layers(self) -> list[int]:
        """Frozen blocks this head reads (sorted, unique); the pass stops at the last one."""
        return sorted(set(self.prior_layers) | {self.task_input_layer})

    def set_deform_impl(self, impl: str) -> None:
        set_deform_impl(self, impl)

    def fuse(self, backbone: Backbone, feats: dict[int, torch.Tensor], hw: tuple[int, int]) -> torch.Tensor:
        """Frozen tokens {layer: (B, T, C)} on a (h, w) patch grid -> fused map (B, C, h, w)."""
        t = self.task_head(feats[self.task_input_layer].detach(), backbone.block_context(hw))
        task_map = backbone.tokens_to_map(backbone.final_norm(t), hw)
        with torch.no_grad():  # prior features are frozen
            prior = torch.cat(
                [backbone.tokens_to_map(backbone.final_norm(feats[i]), hw) for i in self.prior_layers], dim=1
            )
        return self.fusion(self.prior_head(prior), task_map)

    def predict(self, fused: torch.Tensor, image_size: tuple[int, int]) -> Any:
        """Predictions from a fused map: seg logits (B, K, H, W); depth (B, 1, H, W) metres;
        det a list of dicts (torchvision style).

        Seg/depth: the 4x map covers the centre-padded image (e.g. 518 px for a 512 crop) and is
        resized as a whole to the input size, as the release does (it is not cropped first).
        Det: boxes are mapped back through the padding offset exactly (see :class:`DetHead`)."""
        out = self.head(fused, image_size)
        return torch.exp(out) if self.task == "depth" else out  # the depth head predicts log-depth

    def compute_loss(
        self, fused: torch.Tensor, batch: dict[str, Any], image_size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        """Losses for a batch (the layout of :func:`vitsplit.data.collate`); key "loss" is the total."""
        if self.task == "seg":
            if "seg" not in batch:
                raise UserError("the segmentation task needs 'seg' labels in the data")
            ce = self.head.loss(self.head(fused, image_size), batch["seg"].to(fused.device))
            return {"loss": ce, "loss_ce": ce.detach()}
        if self.task == "depth":
            if "depth" not in batch:
                raise UserError("the depth task needs 'depth' maps in the data")
            si = self.head.loss(self.head(fused, image_size), batch["depth"].to(fused.device))
            return {"loss": si, "loss_silog": si.detach()}
        for key in ("boxes", "labels") + (("masks",) if self.masks else ()):
            if key not in batch:
                raise UserError(
                    f"the detection task needs '{key}' in the data"
                    + (" (or build the model with masks=False)" if key == "masks" else "")
                )
        n = fused.shape[0]
        targets = [
            {k: batch[k][i] for k in ("boxes", "labels", "masks") if k in batch and (k != "masks" or self.masks)}
            for i in range(n)
        ]
        parts = self.head.loss(fused, targets, image_size)
        total = sum(parts.values())
        return {"loss": total, **{k: v.detach() for k, v in parts.items()}}

    def head_config(self) -> dict[str, Any]:
        return {
            "k_t": self.k_t,
            "prior_layers": list(self.prior_layers),
            "task": self.task,
            "num_classes": self.num_classes,
            "masks": self.masks,
            **({"det_preset": self.det_preset} if self.task == "det" else {}),
        }


def freeze_backbone(backbone: Backbone) -> None:
    """requires_grad False on every backbone parameter, and eval mode."""
    for p in backbone.parameters():
        p.requires_grad_(False)
    backbone.eval()


def frozen_pass(backbone: Backbone, images: torch.Tensor, layers: Iterable[int]) -> dict[int, torch.Tensor]:
    """One no-grad backbone pass: images (B, 3, H, W) normalised -> {layer: (B, T, C)}, stopping at
    the deepest listed block."""
    with torch.no_grad():
        return backbone.forward_layers(images, layers)


def _param_groups(
    heads: Iterable[SplitHeads], lr: float, weight_decay: float, pretrained_lr_scale: float
) -> list[dict[str, Any]]:
    task_params, other = [], []
    for h in heads:
        task_params += [p for p in h.task_head.parameters() if p.requires_grad]
        other += [p for n, p in h.named_parameters() if p.requires_grad and not n.startswith("task_head.")]
    return [
        {"params": task_params, "lr": lr * pretrained_lr_scale, "weight_decay": weight_decay, "name": "task_head"},
        {"params": other, "lr": lr, "weight_decay": weight_decay, "name": "heads"},
    ]


class ViTSplit(nn.Module):
    """A frozen backbone and one task's :class:`SplitHeads`.

    ``ViTSplit(backbone, k_t, prior_layers, task, num_classes, masks=True)``; ``task`` in
    seg | det | depth. ``masks=False`` makes the detection head Faster R-CNN.
    """

    def __init__(
        self,
        backbone: Backbone,
        k_t: int,
        prior_layers: Iterable[int],
        task: str,
        num_classes: int = 1,
        *,
        masks: bool = True,
        deform_impl: str = "fast",
        det_preset: str = "coco",
    ):
        super().__init__()
        self.split = SplitHeads(
            backbone, k_t, prior_layers, task, num_classes, masks=masks, deform_impl=deform_impl, det_preset=det_preset
        )
        self.backbone = backbone
        freeze_backbone(backbone)

    # convenience views
    @property
    def task(self) -> str:
        return self.split.task

    @property
    def k_t(self) -> int:
        return self.split.k_t

    @property
    def num_classes(self) -> int:
        return self.split.num_classes

    @property
    def prior_layers(self) -> list[int]:
        return list(self.split.prior_layers)

    def train(self, mode: bool = True) -> "ViTSplit":
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm-free, but dropout/drop-path must stay off
        return self

    def fused(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) normalised -> fused map (B, C, h, w)."""
        feats = frozen_pass(self.backbone, images, self.split.needed_layers)
        return self.split.fuse(self.backbone, feats, self.backbone.grid_size(*images.shape[-2:]))

    def forward(self, images: torch.Tensor) -> Any:
        """images (B, 3, H, W) normalised -> seg logits (B, K, H, W) | depth (B, 1, H, W) metres |
        det list of {"boxes", "labels", "scores"[, "masks"]} dicts."""
        return self.split.predict(self.fused(images), tuple(images.shape[-2:]))

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """batch: {"image": (B, 3, H, W), "seg" (B, H, W) | "depth" (B, H, W) | "boxes"/"labels"/"masks"
        lists}. Returns {"loss": total, ...parts (detached)}."""
        images = batch["image"]
        return self.split.compute_loss(self.fused(images), batch, tuple(images.shape[-2:]))

    def set_deform_impl(self, impl: str) -> None:
        """ "fast" (grid_sample + matmul) or "torchvision" (``torchvision.ops.deform_conv2d``)."""
        self.split.set_deform_impl(impl)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the backbone (keys relative to :class:`SplitHeads`), incl. BN buffers."""
        return self.split.state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.split.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(
                f"checkpoint does not fit this ViT-Split (missing {list(missing)[:3]}, unexpected "
                f"{list(unexpected)[:3]}); "
                "build the model with the checkpoint's config"
            )

    def param_groups(
        self, lr: float, weight_decay: float = 1e-2, pretrained_lr_scale: float = PRETRAINED_LR_SCALE
    ) -> list[dict[str, Any]]:
        """AdamW groups: the task head at lr x ``pretrained_lr_scale`` (the release: 0.1), everything else
        trainable at lr; the same weight decay on every trainable parameter (the release's setting)."""
        return _param_groups([self.split], lr, weight_decay, pretrained_lr_scale)

    def config(self, *, with_hash: bool = True) -> dict[str, Any]:
        """JSON-ready: the head config and the backbone's (``state_sha256`` only if ``with_hash``)."""
        bb = (
            backbone_config(self.backbone)
            if with_hash
            else {
                "name": self.backbone.name,
                "weights_source": self.backbone.weights_source,
                "num_layers": self.backbone.num_layers,
                "embed_dim": self.backbone.embed_dim,
                "patch_size": self.backbone.patch_size,
                "num_prefix_tokens": self.backbone.num_prefix_tokens,
            }
        )
        return {**self.split.head_config(), "backbone": bb}
