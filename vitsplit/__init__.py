"""ViT-Split (Li et al., ICCV 2025) on a frozen vision foundation model, and everything to train it.

Public names: :func:`build_backbone`, :class:`Backbone`, :class:`ViTSplit`, :class:`MultiTaskViTSplit`,
:class:`UserError`. Sub-packages: ``ops``, ``backbones``, ``data``, ``model``, ``evaluation``,
``engine``, ``pretrain`` (``docs/architecture.md``).
"""

from .backbones import Backbone, build_backbone
from .errors import UserError
from .model import MultiTaskViTSplit, ViTSplit

__all__ = ["Backbone", "build_backbone", "UserError", "ViTSplit", "MultiTaskViTSplit"]
