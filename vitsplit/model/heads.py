"""Task heads on a fused ViT-Split map (B, C, h, w): segmentation, depth, detection.

Source: the ViT-Split release (Li et al., ICCV 2025), which these follow layer for layer
(``docs/architecture.md``); the baselines reuse them on a plain ViT's last feature map.

- :class:`SegHead`: 4x up path (two ConvTranspose2d(2, 2) + GroupNorm(32, C) + GELU), BatchNorm,
  1x1 "linear" classifier; logits are bilinearly resized to the requested size.
- :class:`DepthHead`: the same path with one output channel read as log-depth (depth = exp).
- :class:`DetHead`: the four-scale neck (4x, 2x, 1x, 0.5x, a BatchNorm per scale), torchvision's
  ``FeaturePyramidNetwork`` (256 channels, 5 outputs) and torchvision's Mask R-CNN (or Faster
  R-CNN) RPN and RoI heads with torchvision's default hyper-parameters, driven directly with our
  feature dict so that nothing is re-normalised or resized.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..data.labels import IGNORE_INDEX
from ..errors import UserError


def _up_block(c: int) -> list[nn.Module]:
    """ConvTranspose2d(C, C, 2, stride 2) + GroupNorm(32, C) + GELU: (B, C, h, w) -> (B, C, 2h, 2w)."""
    return [nn.ConvTranspose2d(c, c, 2, stride=2), nn.GroupNorm(32, c), nn.GELU()]


class SegHead(nn.Module):
    """(B, C, h, w) fused map -> (B, num_classes, H, W) logits.

    ``up`` (4x), ``bn`` (SyncBatchNorm under DDP: the trainer converts it), ``cls`` (1x1 conv).
    C must be divisible by 32 (GroupNorm(32, C)). Dropout is 0 (the release's ADE20K setting).
    """

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.up = nn.Sequential(*_up_block(channels), *_up_block(channels))
        self.bn = nn.BatchNorm2d(channels)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, fused: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """fused: (B, C, h, w); size: (H, W) -> logits (B, K, H, W), bilinear (align_corners=False)."""
        logits = self.cls(self.bn(self.up(fused)))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def loss(
        self,
        logits: torch.Tensor,
        label: torch.Tensor,
        ignore_index: int = IGNORE_INDEX,
        *,
        avg_non_ignore: bool = False,
    ) -> torch.Tensor:
        """Cross-entropy; logits (B, K, H', W') are resized to the label size (B, H, W) first.

        The release's MMSegmentation 0.20 computes per-pixel CE (0 on ignored pixels) and takes the
        mean over **all** pixels, ignored ones included (``avg_non_ignore=False``, the default that
        mmseg 0.23 later made optional); ``avg_non_ignore=True`` gives PyTorch's mean over labelled
        pixels only. A batch with no labelled pixel gives 0 (not NaN) either way.
        """
        if logits.shape[-2:] != label.shape[-2:]:
            logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
        per_pixel = F.cross_entropy(logits, label.long(), ignore_index=ignore_index, reduction="none")
        count = (label != ignore_index).sum() if avg_non_ignore else torch.tensor(label.numel(), device=label.device)
        return per_pixel.sum() / count.clamp_min(1)


class DepthHead(nn.Module):
    """(B, C, h, w) fused map -> log-depth (B, 1, H, W); depth = exp(log-depth) is positive.

    The segmentation path with one output channel (the spec's "natural" depth head).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.up = nn.Sequential(*_up_block(channels), *_up_block(channels))
        self.bn = nn.BatchNorm2d(channels)
        self.out = nn.Conv2d(channels, 1, 1)

    @torch.no_grad()
    def start_at(self, log_depth: float) -> None:
        """Set the output bias so that the untrained head predicts about ``log_depth`` everywhere (the
        training data's mean log-depth): with a bias of 0 it starts at 1 m, and the scale-invariant loss
        moves the global scale slowly (lambda 0.85 discounts it), so a short run never reaches metres
        of the data's size."""
        self.out.bias.fill_(float(log_depth))

    def forward(self, fused: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Returns log-depth (B, 1, H, W) resized bilinearly to ``size``."""
        log_depth = self.out(self.bn(self.up(fused)))
        return F.interpolate(log_depth, size=size, mode="bilinear", align_corners=False)

    @staticmethod
    def loss(log_depth: torch.Tensor, depth: torch.Tensor, variance_focus: float = 0.85) -> torch.Tensor:
        """Scale-invariant log loss (Eigen et al. 2014) in the form of BTS/AdaBins (Lee et al. 2019):
        ``sqrt(mean(d^2) - lambda * mean(d)^2)`` with ``d = log(pred) - log(gt)`` over the valid
        pixels (gt > 0) of the whole batch, lambda = 0.85; without BTS's extra x10 factor.

        log_depth: (B, 1, H', W') (resized to the label size if needed); depth: (B, H, W) metres.
        """
        if log_depth.shape[-2:] != depth.shape[-2:]:
            log_depth = F.interpolate(log_depth, size=depth.shape[-2:], mode="bilinear", align_corners=False)
        valid = depth > 0
        if not bool(valid.any()):
            return log_depth.sum() * 0.0  # no valid pixel: zero loss, graph kept for DDP
        d = log_depth[:, 0][valid] - torch.log(depth[valid])
        return torch.sqrt(((d**2).mean() - variance_focus * d.mean() ** 2).clamp_min(1e-12))


class FixedStrideAnchorGenerator(nn.Module):
    """torchvision's ``AnchorGenerator`` with the feature strides given, not inferred.

    torchvision infers a level's stride as ``image_size // grid_size`` (integer), which is wrong for
    patch-14 maps (stride 3.5 at 4x). Here level i has stride ``strides[i]`` (floats allowed):
    anchor centres are at ``(x * stride, y * stride)`` as in torchvision.
    """

    def __init__(
        self,
        sizes: tuple[tuple[int, ...], ...],
        aspect_ratios: tuple[tuple[float, ...], ...],
        strides: tuple[float, ...],
    ):
        super().__init__()
        from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: PLC0415 - torchvision takes seconds to import; only detection needs it

        self.base = AnchorGenerator(sizes, aspect_ratios)
        self.strides = tuple(float(s) for s in strides)

    def num_anchors_per_location(self) -> list[int]:
        return self.base.num_anchors_per_location()

    def forward(self, image_list, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Returns one (A, 4) xyxy anchor tensor per image (the same for every image)."""
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        self.base.set_cell_anchors(dtype, device)
        per_level = []
        for fmap, stride, cell in zip(feature_maps, self.strides, self.base.cell_anchors):
            gh, gw = fmap.shape[-2:]
            sx = torch.arange(gw, dtype=dtype, device=device) * stride
            sy = torch.arange(gh, dtype=dtype, device=device) * stride
            yy, xx = torch.meshgrid(sy, sx, indexing="ij")
            shifts = torch.stack((xx.reshape(-1), yy.reshape(-1), xx.reshape(-1), yy.reshape(-1)), dim=1)
            per_level.append((shifts.view(-1, 1, 4) + cell.view(1, -1, 4)).reshape(-1, 4))
        anchors = torch.cat(per_level)
        return [anchors for _ in range(len(image_list.image_sizes))]


@contextlib.contextmanager
def _training_mode(modules: list[nn.Module], training: bool) -> Iterator[None]:
    """Temporarily set ``.training`` of ``modules`` (torchvision's RPN/RoI heads pick their loss or
    inference path from it; they hold no BatchNorm/dropout, so nothing else changes)."""
    before = [m.training for m in modules]
    for m in modules:
        m.train(training)
    try:
        yield
    finally:
        for m, t in zip(modules, before):
            m.train(t)


class DetNeck(nn.Module):
    """Fused map (B, C, h, w) -> four maps at 4x, 2x, 1x, 0.5x of (h, w), each through a BatchNorm."""

    def __init__(self, channels: int):
        super().__init__()
        self.up4 = nn.Sequential(*_up_block(channels), *_up_block(channels))
        self.up2 = nn.Sequential(*_up_block(channels))
        self.down2 = nn.MaxPool2d(2)
        self.norms = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(4))

    def forward(self, fused: torch.Tensor) -> list[torch.Tensor]:
        maps = [self.up4(fused), self.up2(fused), fused, self.down2(fused)]
        return [bn(m) for bn, m in zip(self.norms, maps)]


# Detection hyper-parameters that must follow the image scale. "coco" is torchvision's MaskRCNN default
# (images of 800-1333 px). "small" is for crops below ~320 px (tests, the demo's 112 px scenes):
# anchors 8..128 instead of 32..512, which would all be larger than the image, and fewer RoIs per
# image (the mask head's four 256-channel convs on 14x14 RoIs dominate a CPU step at 512 RoIs).
DET_PRESETS: dict[str, dict[str, Any]] = {
    "coco": dict(anchor_sizes=(32, 64, 128, 256, 512), rois_per_image=512, rpn_train=2000, rpn_test=1000),
    "small": dict(anchor_sizes=(8, 16, 32, 64, 128), rois_per_image=64, rpn_train=300, rpn_test=300),
}


def det_preset_for(crop: int) -> str:
    """The preset a crop of ``crop`` pixels gets when none is named."""
    return "small" if crop < 320 else "coco"


class DetHead(nn.Module):
    """Four-scale neck + FPN + Mask R-CNN (``masks=True``) or Faster R-CNN (``masks=False``).

    ``num_classes`` object classes (labels 1..K; 0 is background, torchvision's convention);
    ``patch_size`` p sets the strides (p/4, p/2, p, 2p and 4p for the FPN's extra max-pool level).
    Hyper-parameters are torchvision's ``MaskRCNN`` defaults (anchor sizes 32..512, ratios
    0.5/1/2, RPN 2000/1000 proposals train/test, RoIAlign 7x7 boxes and 14x14 masks, 512 RoIs per
    image, 100 detections per image). They are close to, not identical with, the release's mmdet
    2.x Mask R-CNN 1x (mmdet keeps 1000 RPN proposals after NMS in training and uses mmcv's
    aligned RoIAlign with adaptive sampling).
    """

    def __init__(
        self, channels: int, num_classes: int, masks: bool = True, *, patch_size: int = 14, preset: str = "coco"
    ):
        super().__init__()
        if preset not in DET_PRESETS:
            raise UserError(f"unknown detection preset '{preset}': use {' or '.join(DET_PRESETS)}")
        hp = DET_PRESETS[preset]
        self.preset = preset
        # torchvision takes seconds to import and only detection needs it: imported here, not at the top.
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
        from torchvision.models.detection.roi_heads import RoIHeads
        from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
        from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
        from torchvision.ops.poolers import LevelMapper

        self.num_classes = num_classes
        self.masks = masks
        self.patch_size = patch_size
        p = float(patch_size)
        self.strides = (p / 4, p / 2, p, 2 * p, 4 * p)
        self.neck = DetNeck(channels)
        self.fpn = FeaturePyramidNetwork([channels] * 4, 256, extra_blocks=LastLevelMaxPool())
        anchors = FixedStrideAnchorGenerator(
            tuple((s,) for s in hp["anchor_sizes"]), ((0.5, 1.0, 2.0),) * 5, self.strides
        )
        self.rpn = RegionProposalNetwork(
            anchors,
            RPNHead(256, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=256,
            positive_fraction=0.5,
            pre_nms_top_n=dict(training=hp["rpn_train"], testing=hp["rpn_test"]),
            post_nms_top_n=dict(training=hp["rpn_train"], testing=hp["rpn_test"]),
            nms_thresh=0.7,
        )
        names = ["0", "1", "2", "3"]

        def pooler(size: int) -> MultiScaleRoIAlign:
            # Scales set explicitly (torchvision would round them to powers of two: 1/4 for 1/3.5).
            # Levels by box size as FPN's Eq. 1 with canonical 224 -> level 4, levels 2..5 = our 4 maps.
            pool = MultiScaleRoIAlign(names, output_size=size, sampling_ratio=2)
            pool.scales = [1.0 / s for s in self.strides[:4]]
            pool.map_levels = LevelMapper(2, 5, canonical_scale=224, canonical_level=4)
            return pool

        mask_kwargs = {}
        if masks:
            mask_kwargs = dict(
                mask_roi_pool=pooler(14),
                mask_head=MaskRCNNHeads(256, (256, 256, 256, 256), 1),
                mask_predictor=MaskRCNNPredictor(256, 256, num_classes + 1),
            )
        self.roi_heads = RoIHeads(
            pooler(7),
            TwoMLPHead(256 * 7 * 7, 1024),
            FastRCNNPredictor(1024, num_classes + 1),
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.5,
            batch_size_per_image=hp["rois_per_image"],
            positive_fraction=0.25,
            bbox_reg_weights=None,
            score_thresh=0.05,
            nms_thresh=0.5,
            detections_per_img=100,
            **mask_kwargs,
        )

    def features(self, fused: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """(B, C, h, w) -> FPN outputs {"0": 4x, "1": 2x, "2": 1x, "3": 0.5x, "pool"}, 256 channels."""
        maps = self.neck(fused)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))

    def _geometry(self, fused: torch.Tensor, image_size: tuple[int, int]) -> tuple[tuple[int, int], int, int]:
        """Padded size (H', W') = (h*p, w*p) and the (top, left) offset of the original image in it,
        following :meth:`vitsplit.backbones.backbone.Backbone.pad` (centre padding, extra pixel bottom/right)."""
        ph, pw = fused.shape[-2] * self.patch_size, fused.shape[-1] * self.patch_size
        h, w = int(image_size[0]), int(image_size[1])
        if ph < h or pw < w or ph - h >= self.patch_size or pw - w >= self.patch_size:
            raise ValueError(
                f"fused map {tuple(fused.shape[-2:])} does not match image size {image_size} at patch {self.patch_size}"
            )
        return (ph, pw), (ph - h) // 2, (pw - w) // 2

    def _image_list(self, fused: torch.Tensor, padded_size: tuple[int, int]):
        from torchvision.models.detection.image_list import ImageList  # noqa: PLC0415 - see DetHead.__init__

        # Only image_sizes and the batch size are read downstream (anchors use our fixed strides).
        return ImageList(fused.new_empty((fused.shape[0], 0, *padded_size)), [padded_size] * fused.shape[0])

    def loss(
        self, fused: torch.Tensor, targets: list[dict[str, torch.Tensor]], image_size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        """Training losses.

        fused: (B, C, h, w) from images of ``image_size`` (H, W) centre-padded to (h*p, w*p);
        targets: per image {"boxes": (N, 4) float xyxy pixels, "labels": (N,) int64 in 1..K,
        ["masks": (N, H, W) uint8]} in original-image pixels (shifted into the padded frame here).
        Returns torchvision's dict: loss_objectness, loss_rpn_box_reg, loss_classifier,
        loss_box_reg[, loss_mask].
        """
        padded, top, left = self._geometry(fused, image_size)
        shift = torch.tensor([left, top, left, top], dtype=torch.float32, device=fused.device)
        moved = []
        for t in targets:
            m = {
                "boxes": t["boxes"].to(fused.device, torch.float32).reshape(-1, 4) + shift,
                "labels": t["labels"].to(fused.device, torch.int64),
            }
            if self.masks:
                if "masks" not in t:
                    raise ValueError(
                        "Mask R-CNN needs 'masks' in every target (build the model with masks=False for boxes only)"
                    )
                mk = t["masks"].to(fused.device)
                m["masks"] = F.pad(mk, (left, padded[1] - left - mk.shape[-1], top, padded[0] - top - mk.shape[-2]))
            moved.append(m)
        feats = self.features(fused)
        images = self._image_list(fused, padded)
        with _training_mode([self.rpn, self.roi_heads], True):
            proposals, rpn_losses = self.rpn(images, feats, moved)
            _, roi_losses = self.roi_heads(feats, proposals, images.image_sizes, moved)
        return {**rpn_losses, **roi_losses}

    def forward(self, fused: torch.Tensor, image_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        """Detections in original-image pixels: per image {"boxes" (N, 4) xyxy, "labels" (N,),
        "scores" (N,)[, "masks" (N, 1, H, W) probabilities]} as torchvision's Mask R-CNN returns.
        Boxes are clipped to the image; boxes lying wholly in the padding are dropped."""
        from torchvision.models.detection.roi_heads import paste_masks_in_image  # noqa: PLC0415 - see DetHead.__init__
        from torchvision.ops import boxes as box_ops

        padded, top, left = self._geometry(fused, image_size)
        h, w = int(image_size[0]), int(image_size[1])
        feats = self.features(fused)
        images = self._image_list(fused, padded)
        with _training_mode([self.rpn, self.roi_heads], False):
            proposals, _ = self.rpn(images, feats)
            dets, _ = self.roi_heads(feats, proposals, images.image_sizes)
        shift = torch.tensor([left, top, left, top], dtype=fused.dtype, device=fused.device)
        out = []
        for d in dets:
            boxes = box_ops.clip_boxes_to_image(d["boxes"] - shift, (h, w))
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            r = {"boxes": boxes[keep], "labels": d["labels"][keep], "scores": d["scores"][keep]}
            if self.masks:
                pasted = paste_masks_in_image(d["masks"][keep], d["boxes"][keep], padded)
                r["masks"] = pasted[:, :, top : top + h, left : left + w]
            out.append(r)
        return out
