"""How to build one named backbone (:class:`BackboneSpec`), and the one hint every weight problem ends with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

WAYS_FORWARD = "pass --weights PATH (a .pth/.pt/.safetensors file) or --weights random"


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one named backbone.

    ``timm_name`` is the timm architecture; ``timm_kwargs`` are passed to ``timm.create_model``;
    ``hub_file`` is the torch.hub checkpoint file name of the official release (DINOv2 only);
    ``hf_id`` the timm weights on the Hugging Face hub; ``hf_dir`` a local HF folder (``hf:``);
    ``arch_label`` how messages name the architecture when ``timm_name`` alone would not say it
    (an ``hf:`` model of a width timm has no name for is built from a timm architecture of
    another width with its own ``embed_dim``/``depth``).
    """

    name: str
    timm_name: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    hub_file: str | None = None
    hub_url: str | None = None
    hf_id: str | None = None
    hf_dir: str | None = None
    arch_label: str | None = None

    @property
    def label(self) -> str:
        """The architecture as messages name it."""
        return self.arch_label or f"timm {self.timm_name}"
