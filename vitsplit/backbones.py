"""Vision foundation model backbones: names, architectures, and layer access.

A :class:`Backbone` wraps a timm ``VisionTransformer`` and exposes what the rest of the toolkit
needs: the token sequence after any block (``forward_layers``), the frozen final norm, the patch
size and the number of prefix (cls + register) tokens, and ``weights_source``, a string saying
exactly where the weights came from ("random", a file path with its sha256, or a hub id).

Names (``resolve_name``):
- ``dinov2_vit{s,b,l,g}14`` and ``dinov2_vit{s,b,l,g}14_reg``: DINOv2 (Oquab et al. 2023) and
  DINOv2 with registers (Darcet et al. 2024), built as timm's ``vit_*_patch14_dinov2`` and
  ``vit_*_patch14_reg4_dinov2`` architectures.
- any timm ``VisionTransformer`` name (``vit_small_patch16_224``, ...).
- ``hf:<dir>``: a Hugging Face ``Dinov2Model``/``Dinov2WithRegistersModel`` folder (``config.json`` +
  weights), or ``hf:<org>/<model>`` already in the Hugging Face cache (:func:`vitsplit.checkpoints.hf_spec`).
- ``demo-vit``: the small DINOv2-architecture ViT that ``cka-split demo`` pretrains itself.

Where the weights come from (``weights``): ``"random"`` (explicit, and recorded as such),
``"auto"`` (pretrained weights from the usual caches, see :mod:`vitsplit.checkpoints`), or a path.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_DINOV2_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}


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


# The demo backbone: DINOv2's architecture (layer scale, patch 14, cls token, no registers) at a
# size a laptop CPU pretrains in minutes. Its weights come only from `cka-split demo`'s own
# pretraining (cached under a name that includes the recipe), never from random init.
DEMO_VIT_KWARGS: dict[str, Any] = dict(
    patch_size=14, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0, init_values=1e-5,
    img_size=112, num_classes=0, dynamic_img_size=True,
)


def resolve_name(name: str) -> BackboneSpec:
    """Map a user-facing model name to a :class:`BackboneSpec`. Raises ``UserError`` if unknown."""
    if name == "demo-vit":
        return BackboneSpec(name="demo-vit", timm_name="vit_small_patch14_dinov2", timm_kwargs=dict(DEMO_VIT_KWARGS))
    if name.startswith("hf:"):
        from .checkpoints import hf_spec  # one place for the HF format

        return hf_spec(name)
    if name.startswith("dinov2_vit"):
        rest = name[len("dinov2_vit"):]
        reg = rest.endswith("_reg")
        core = rest[: -len("_reg")] if reg else rest
        if len(core) != 3 or core[0] not in _DINOV2_SIZES or core[1:] != "14":
            raise UserError(
                f"unknown DINOv2 model '{name}': use dinov2_vit{{s,b,l,g}}14 or dinov2_vit{{s,b,l,g}}14_reg"
            )
        size = _DINOV2_SIZES[core[0]]
        timm_name = f"vit_{size}_patch14_reg4_dinov2" if reg else f"vit_{size}_patch14_dinov2"
        stem = f"dinov2_vit{core}" + ("_reg4" if reg else "")
        return BackboneSpec(
            name=name,
            timm_name=timm_name,
            timm_kwargs=dict(num_classes=0, dynamic_img_size=True),
            hub_file=f"{stem}_pretrain.pth",
            hub_url=f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{core}/{stem}_pretrain.pth",
            hf_id=f"timm/{timm_name}.lvd142m",
        )
    import timm

    base = name.split(".")[0]
    if base not in timm.list_models():
        raise UserError(
            f"unknown model '{name}': use dinov2_vit{{s,b,l,g}}14[_reg], a timm ViT name, hf:<dir>, or demo-vit"
        )
    return BackboneSpec(name=name, timm_name=base, timm_kwargs=dict(num_classes=0, dynamic_img_size=True),
                        hf_id=f"timm/{name}" if "." in name else None)


class Backbone(nn.Module):
    """A ViT with per-block access.

    Attributes: ``vit`` (the timm ``VisionTransformer``), ``num_layers`` (blocks, L),
    ``embed_dim`` (C), ``patch_size`` (p), ``num_prefix_tokens`` (cls + registers),
    ``weights_source`` (str), ``name``.
    """

    def __init__(self, vit: nn.Module, *, name: str, weights_source: str):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(vit, VisionTransformer):
            raise UserError(f"model '{name}' is not a timm VisionTransformer; only plain ViTs have the layer structure this tool splits")
        self.vit = vit
        self.name = name
        self.weights_source = weights_source
        self.num_layers = len(vit.blocks)
        self.embed_dim = vit.embed_dim
        ps = vit.patch_embed.patch_size
        self.patch_size = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    # ----------------------------------------------------------------------------------- geometry
    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (h, w) of an image of ``height x width`` after padding to a multiple of p."""
        p = self.patch_size
        return math.ceil(height / p), math.ceil(width / p)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Centre-pad ``x`` (B, 3, H, W) with zeros to a multiple of the patch size, as DINOv2's
        ``CenterPadding`` does (the extra pixel goes right/bottom). Returns (B, 3, H', W')."""
        p = self.patch_size
        ph, pw = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        if ph == 0 and pw == 0:
            return x
        return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> ImageNet-normalised."""
        return (x - self.pixel_mean) / self.pixel_std

    # ------------------------------------------------------------------------------------ forward
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> token sequence before block 0, (B, T, C), where
        T = num_prefix_tokens + h*w. Pads to a multiple of the patch size first."""
        vit = self.vit
        x = vit.patch_embed(self.pad(x))
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def forward_layers(self, x: torch.Tensor, layers: Iterable[int]) -> dict[int, torch.Tensor]:
        """Token sequences after each listed block.

        x: (B, 3, H, W) normalised images (any H, W; padded to a multiple of p).
        Returns {layer: (B, T, C)} with T = num_prefix_tokens + h*w (prefix tokens first), taken
        after the block and before the final norm. Blocks deeper than the deepest listed layer are
        not run.
        """
        wanted = sorted(set(int(i) for i in layers))
        for i in wanted:
            if not 0 <= i < self.num_layers:
                raise UserError(f"layer {i} is outside [0, {self.num_layers - 1}] for {self.name}")
        out: dict[int, torch.Tensor] = {}
        if not wanted:
            return out
        h = self.embed(x)
        for i in range(wanted[-1] + 1):
            h = self.vit.blocks[i](h)
            if i in wanted:
                out[i] = h
        return out

    def run_blocks(self, tokens: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run blocks ``start .. stop-1`` on a token sequence (B, T, C) -> (B, T, C)."""
        for i in range(start, stop):
            tokens = self.vit.blocks[i](tokens)
        return tokens

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """The backbone's final LayerNorm on (B, T, C) -> (B, T, C)."""
        return self.vit.norm(tokens)

    def tokens_to_map(self, tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Drop prefix tokens and reshape patch tokens: (B, T, C) -> (B, C, h, w)."""
        b, _, c = tokens.shape
        patches = tokens[:, self.num_prefix_tokens:]
        return patches.transpose(1, 2).reshape(b, c, hw[0], hw[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> final-normed token sequence (B, T, C)."""
        return self.final_norm(self.forward_layers(x, [self.num_layers - 1])[self.num_layers - 1])


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_hash(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, shapes, dtypes, bytes), in key order."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def create_vit(spec: BackboneSpec) -> nn.Module:
    """The timm architecture of ``spec`` with fresh (random) parameters."""
    import timm

    try:
        return timm.create_model(spec.timm_name, pretrained=False, **spec.timm_kwargs)
    except (RuntimeError, ValueError, TypeError) as e:  # bad kwargs for that architecture
        raise UserError(f"cannot build '{spec.name}' as timm '{spec.timm_name}': {e}") from e


def build_backbone(name: str | BackboneSpec, weights: str = "auto", *, seed: int | None = None) -> Backbone:
    """Build a named backbone with weights from ``weights``: "random", "auto", or a file path.

    ``name`` is a model name (see :func:`resolve_name`) or an already resolved
    :class:`BackboneSpec` (for architectures without a name, such as tests' tiny ViTs).
    "random" gives freshly initialised weights (``seed`` makes them reproducible) and records
    ``weights_source="random"``. "auto" and paths are resolved by :mod:`vitsplit.checkpoints`;
    loading is strict (a checkpoint for another architecture fails naming the mismatched keys).
    """
    spec = name if isinstance(name, BackboneSpec) else resolve_name(name)
    name = spec.name
    if seed is not None:
        torch.manual_seed(seed)
    vit = create_vit(spec)
    if weights == "random":
        source = "random" if seed is None else f"random (seed {seed})"
    else:
        from .checkpoints import load_weights

        source = load_weights(vit, spec, weights)
    bb = Backbone(vit, name=name, weights_source=source)
    bb.eval()
    return bb


def backbone_config(bb: Backbone) -> dict[str, Any]:
    """What a run records about its backbone (JSON-ready)."""
    return {
        "name": bb.name,
        "weights_source": bb.weights_source,
        "num_layers": bb.num_layers,
        "embed_dim": bb.embed_dim,
        "patch_size": bb.patch_size,
        "num_prefix_tokens": bb.num_prefix_tokens,
        "state_sha256": state_hash(bb),
    }


def load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise UserError(f"{path} does not exist") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from e
