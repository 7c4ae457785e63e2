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
    ``hf_id`` the timm weights on the Hugging Face hub; ``hf_dir`` a local HF folder (``hf:``).
    """

    name: str
    timm_name: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    hub_file: str | None = None
    hub_url: str | None = None
    hf_id: str | None = None
    hf_dir: str | None = None
