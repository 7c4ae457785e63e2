"""ViT-Split (Li et al., ICCV 2025) on a frozen vision foundation model, and everything to train it.

Public names: :func:`build_backbone`, :class:`Backbone`, :class:`ViTSplit`, :class:`UserError`.
"""

from .backbones import Backbone, build_backbone
from .errors import UserError

__all__ = ["Backbone", "build_backbone", "UserError", "ViTSplit", "MultiTaskViTSplit"]


def __getattr__(name: str):  # ViTSplit is imported lazily so that backbones load without torchvision ops
    if name == "ViTSplit":
        from .model import ViTSplit

        return ViTSplit
    if name == "MultiTaskViTSplit":
        from .multitask import MultiTaskViTSplit

        return MultiTaskViTSplit
    raise AttributeError(name)
