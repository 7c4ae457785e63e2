"""Backbone names -> :class:`~vitsplit.backbones.spec.BackboneSpec`, and the timm architecture of a spec.

Names (``resolve_name``):
- ``dinov2_vit{s,b,l,g}14`` and ``dinov2_vit{s,b,l,g}14_reg``: DINOv2 (Oquab et al. 2023) and
  DINOv2 with registers (Darcet et al. 2024), built as timm's ``vit_*_patch14_dinov2`` and
  ``vit_*_patch14_reg4_dinov2`` architectures.
- ``dinov3_vit{s,splus,b,l,hplus,7b}16``: DINOv3 (Simeoni et al. 2025), timm's
  ``vit_*_patch16_dinov3`` architectures (:mod:`vitsplit.backbones.dinov3`).
- any timm name of a plain ViT, with or without a pretrained tag: ``VisionTransformer`` (DINOv2,
  CLIP ``vit_*_clip_*``, SigLIP / SigLIP 2 ``vit_*_siglip_*``, MAE ``vit_*_224.mae``, ...), ``Eva``
  (DINOv3, EVA-02 ``eva02_*``) and ``VisionTransformerSAM`` (SAM ``samvit_*``); see
  :mod:`vitsplit.backbones.families`.
- ``hf:<dir>``: a Hugging Face ``Dinov2Model``/``Dinov2WithRegistersModel``/``DINOv3ViTModel`` folder
  (``config.json`` + weights), or ``hf:<org>/<model>`` already in the Hugging Face cache
  (:func:`vitsplit.backbones.hf.hf_spec`).
- ``demo-vit``: the small DINOv2-architecture ViT that ``cka-split demo`` pretrains itself.

Where the weights come from (``weights``): ``"random"`` (explicit, and recorded as such),
``"auto"`` (pretrained weights from the usual caches, see :mod:`vitsplit.backbones.weights`), or a path.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UserError
from .dinov3 import DINOV3_PREFIX, dinov3_release
from .dinov3 import NAMES as DINOV3_NAMES
from .families import size_kwargs
from .hf import hf_spec
from .spec import BackboneSpec

_DINOV2_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}

# The demo backbone: DINOv2's architecture (layer scale, patch 14, cls token, no registers) at a
# size a laptop CPU pretrains in minutes. Its weights come only from `cka-split demo`'s own
# pretraining (cached under a name that includes the recipe), never from random init.
# ``init_values`` is timm's layer-scale start for a fresh demo-vit (``--weights random``); pretraining
# sets every gamma to its recipe's ``layer_scale_init`` (1.0, see vitsplit.backbones.demo_vit.DemoRecipe).
DEMO_VIT_KWARGS: dict[str, Any] = dict(
    patch_size=14,
    embed_dim=192,
    depth=12,
    num_heads=3,
    mlp_ratio=4.0,
    init_values=1e-5,
    img_size=112,
    num_classes=0,
    dynamic_img_size=True,
)


def resolve_name(name: str) -> BackboneSpec:
    """Map a user-facing model name to a :class:`BackboneSpec`. Raises ``UserError`` if unknown."""
    if name == "demo-vit":
        return BackboneSpec(name="demo-vit", timm_name="vit_small_patch14_dinov2", timm_kwargs=dict(DEMO_VIT_KWARGS))
    if name.startswith("hf:"):
        return hf_spec(name)
    if name.startswith("dinov2_vit"):
        rest = name[len("dinov2_vit") :]
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
    release = dinov3_release(name)
    if release is not None:
        return BackboneSpec(
            name=name,
            timm_name=release.timm_name,
            timm_kwargs=dict(num_classes=0, dynamic_img_size=True),
            hub_file=release.official_file,
            hf_id=release.timm_hub,
            hf_alt_ids=(release.hf_hub,),
            gated=True,
        )
    if name.startswith(DINOV3_PREFIX):
        raise UserError(f"unknown DINOv3 model '{name}': use one of {', '.join(DINOV3_NAMES)}")
    import timm  # noqa: PLC0415 - timm's model list is slow to import; dinov2/hf:/demo names do not need it

    base = name.split(".")[0]
    if base not in timm.list_models():
        raise UserError(
            f"unknown model '{name}': use dinov2_vit{{s,b,l,g}}14[_reg], dinov3_vit{{s,splus,b,l,hplus,7b}}16, "
            "a timm ViT name (DINOv2, DINOv3, CLIP, SigLIP, MAE, SAM, EVA-02), hf:<dir>, or demo-vit"
        )
    if "." in name and name not in timm.list_pretrained(name):
        raise UserError(
            f"timm has no pretrained tag '{name}': use one of "
            f"{', '.join(timm.list_pretrained(base + '.*')[:6]) or base}"
        )
    return BackboneSpec(
        name=name,
        timm_name=name,
        timm_kwargs=dict(num_classes=0, **size_kwargs(base)),
        hf_id=f"timm/{name}" if "." in name else None,
        gated="dinov3" in base,
    )


def create_vit(spec: BackboneSpec) -> nn.Module:
    """The timm architecture of ``spec`` with fresh (random) parameters."""
    import timm  # noqa: PLC0415 - timm takes seconds to import; only building a model needs it

    try:
        return timm.create_model(spec.timm_name, pretrained=False, **spec.timm_kwargs)
    except (RuntimeError, ValueError, TypeError) as e:  # bad kwargs for that architecture
        raise UserError(f"cannot build '{spec.name}' as {spec.label}: {e}") from e
