"""DINOv3 short names (``dinov3_vit{s,splus,b,l,hplus,7b}16``) and where their weights live.

DINOv3 (Simeoni et al. 2025, arXiv 2508.10104) ViTs: patch 16, a class token and 4 registers, RoPE,
layer scale; S+, H+ and 7B use SwiGLU MLPs. The architectures are timm's ``vit_*_patch16_dinov3``
(timm >= 1.0.20). The weights are gated behind Meta's DINOv3 licence on every hub: a download needs a
logged-in Hugging Face account that accepted the licence on the model's page.
"""

from __future__ import annotations

from dataclasses import dataclass

DINOV3_PREFIX = "dinov3_vit"


@dataclass(frozen=True)
class DINOv3Release:
    """One published DINOv3 ViT (the LVD-1689M weights).

    ``timm_name``: timm's architecture; ``official_file``: the release's checkpoint file name
    (facebookresearch/dinov3 ``hub/backbones.py``), looked for in torch.hub's checkpoint folder;
    ``timm_hub``: timm's weights on the Hugging Face hub; ``hf_hub``: the transformers model."""

    size: str
    timm_name: str
    official_file: str
    timm_hub: str
    hf_hub: str


def _release(size: str, timm_name: str, stem: str, file_hash: str) -> DINOv3Release:
    return DINOv3Release(
        size=size,
        timm_name=timm_name,
        official_file=f"dinov3_{stem}_pretrain_lvd1689m-{file_hash}.pth",
        timm_hub=f"timm/{timm_name}.lvd1689m",
        hf_hub=f"facebook/dinov3-{stem}-pretrain-lvd1689m",
    )


RELEASES: dict[str, DINOv3Release] = {
    "s": _release("s", "vit_small_patch16_dinov3", "vits16", "08c60483"),
    "splus": _release("splus", "vit_small_plus_patch16_dinov3", "vits16plus", "4057cbaa"),
    "b": _release("b", "vit_base_patch16_dinov3", "vitb16", "73cec8be"),
    "l": _release("l", "vit_large_patch16_dinov3", "vitl16", "8aa4cbdd"),
    "hplus": _release("hplus", "vit_huge_plus_patch16_dinov3", "vith16plus", "7c1da9a5"),
    "7b": _release("7b", "vit_7b_patch16_dinov3", "vit7b16", "a955f4ea"),
}
NAMES = tuple(f"{DINOV3_PREFIX}{size}16" for size in RELEASES)


def dinov3_release(name: str) -> DINOv3Release | None:
    """The release of a short name (``dinov3_vitb16`` -> ViT-B/16), None if ``name`` is not one."""
    if not (name.startswith(DINOV3_PREFIX) and name.endswith("16")):
        return None
    return RELEASES.get(name[len(DINOV3_PREFIX) : -2])


def gated_message(repo: str) -> str:
    """What to do when the hub refuses a gated DINOv3 download (or none is possible offline)."""
    return (
        f"DINOv3 weights are gated by Meta's licence: log in to the Hugging Face hub (`hf auth login`), "
        f"accept the licence on https://huggingface.co/{repo}, and retry; or pass --weights PATH "
        "(a timm, official DINOv3 or Hugging Face DINOv3 file or folder)"
    )
