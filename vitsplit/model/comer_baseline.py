"""The ``vit-comer`` method: ViT-CoMer (Xia et al., CVPR 2024) + a segmentation head, trained by the
same trainer as ViT-Split and the other baselines, with the interface and the training recipe of
:class:`~vitsplit.model.adapter_baseline.ViTAdapterBaseline` (the ViT-CoMer release is built on
ViT-Adapter's and uses its settings): heads ``upernet`` (the published configuration, with the
auxiliary FCN head) or ``linear``; layer-wise lr decay 0.95 (``LayerDecayOptimizerConstructor``,
``layer_decay_rate`` 0.95 in the released ADE20K configs) with the same groups; segmentation only.

The released ADE20K configs differ from ViT-Adapter's in the learning-rate schedule only in the
poly power (1.0 there, the trainer's ``--poly-power``) and in ViT-CoMer-T's lr (1.2e-4); S and B
use 6e-5, as ViT-Adapter-S/B.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..backbones import Backbone
from .adapter_baseline import ViTAdapterBaseline
from .vit_comer import ViTCoMer


class ViTCoMerBaseline(ViTAdapterBaseline):
    """``ViTCoMerBaseline(backbone, task, num_classes, head="linear", config=None)``; takes over ``backbone``.

    ``self.adapter`` is the :class:`ViTCoMer` body (the name the layer-decay groups and the saved
    weights share with vit-adapter)."""

    method = "vit-comer"
    config_key = "comer"

    @staticmethod
    def build_body(backbone: Backbone, config: Any) -> nn.Module:
        return ViTCoMer(backbone, config)
