"""Vision foundation model backbones: names, the :class:`Backbone` wrapper, and weight files.

- :mod:`.spec` / :mod:`.names`: :class:`BackboneSpec`, :func:`resolve_name`, :func:`create_vit`;
- :mod:`.families`: how each timm ViT family (VisionTransformer, Eva, VisionTransformerSAM) is run
  block by block (:class:`BlockContext`, :func:`family_of`);
- :mod:`.backbone`: :class:`Backbone`, :func:`state_hash`, :func:`backbone_config`;
- :mod:`.dinov3`: DINOv3's short names and releases; :mod:`.dinov3_layouts`: its weight layouts;
- :mod:`.build`: :func:`build_backbone`;
- :mod:`.weights` (entry point), :mod:`.reading`, :mod:`.layouts`, :mod:`.hf`, :mod:`.hub`: weight files;
- :mod:`.demo_vit`: the demo backbone's recipe id, cache and file (its pretraining is :mod:`vitsplit.pretrain`).
"""

from ..fileio import sha256_file
from ..ops.imagenet import IMAGENET_MEAN, IMAGENET_STD
from .backbone import Backbone, backbone_config, state_hash
from .build import build_backbone
from .families import BlockContext, family_of
from .names import DEMO_VIT_KWARGS, create_vit, resolve_name
from .spec import BackboneSpec

__all__ = [
    "Backbone",
    "BackboneSpec",
    "BlockContext",
    "family_of",
    "DEMO_VIT_KWARGS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "backbone_config",
    "build_backbone",
    "create_vit",
    "resolve_name",
    "sha256_file",
    "state_hash",
]
