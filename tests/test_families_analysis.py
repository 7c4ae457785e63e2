"""analyze + recommend on the new families: planted task copies (identical below block s, perturbed
from s on) of a tiny DINOv3 (RoPE, 4 registers), SigLIP (no class token) and SAM (2D token grid)
recover K_t = L - s exactly, with every feature mode the family supports."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_vits import TINY, randomize

from cka_split import analyze, recommend_split
from cka_split.probes.pca import pca_maps
from vitsplit.backbones import Backbone

DEPTH = 6


def tiny_deep(family: str, seed: int = 0) -> Backbone:
    import timm

    name, kwargs = TINY[family]
    vit = timm.create_model(name, pretrained=False, **dict(kwargs, depth=DEPTH))
    if family == "sam":
        vit = timm.create_model(name, pretrained=False, **dict(kwargs, depth=DEPTH, global_attn_indexes=[2, 5]))
    return Backbone(randomize(vit, seed).eval(), name=f"tiny-{family}", weights_source="random").eval()


def planted(bb: Backbone, s: int, seed: int = 1, scale: float = 0.5) -> Backbone:
    """A copy whose blocks s, s+1, ... are perturbed; blocks < s untouched."""
    out = copy.deepcopy(bb)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in list(out.family.blocks(out.vit))[s:]:
            for p in block.parameters():
                p.add_(scale * p.abs().mean().clamp_min(0.02) * torch.randn(p.shape, generator=g))
    return out


def probe(num: int = 3, b: int = 6, size: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, 3, size, size, generator=g) for _ in range(num)]


@pytest.mark.parametrize(
    "family,features",
    [
        ("dinov3", "tokens"),
        ("dinov3", "cls"),
        ("siglip", "tokens"),
        ("siglip", "mean"),
        ("sam", "tokens"),
    ],
)
def test_planted_copies_recover_k_t_exactly(family, features):
    bb = tiny_deep(family)
    for s in (2, 4):
        res = analyze({"pretrained": bb, "seg": planted(bb, s)}, probe(), features=features)
        diag = torch.diagonal(res.matrix("pretrained", "seg"))
        assert torch.all((diag[:s] - 1).abs() < 1e-12), diag
        assert torch.all(diag[s:] < 1 - 1e-4), diag
        rec = recommend_split(res, tasks=["seg"], num_layers=DEPTH)
        assert rec.per_task["seg"].k_t == DEPTH - s


def test_cls_features_refused_without_a_class_token():
    from vitsplit.errors import UserError

    with pytest.raises(UserError, match="class token"):
        analyze({"pretrained": tiny_deep("siglip")}, probe(1), features="cls")


@pytest.mark.parametrize("family", ["siglip", "sam", "dinov3"])
def test_pca_maps_with_any_prefix_count(tmp_path, family):
    """PCA maps read only patch tokens: zero prefix tokens (SigLIP, SAM) and five (DINOv3) alike."""
    bb = tiny_deep(family)
    x = probe(1, b=2)[0]
    idx = pca_maps({"pretrained": bb, "seg": planted(bb, 3)}, x, tmp_path, layers=[1, 5])
    assert idx["grid_hw"] == [4, 4] and idx["layers"] == [1, 5]
    assert (tmp_path / idx["images"][0]["maps"]["seg"]["5"]).is_file()
    # the PCA of layer 1 is fitted on identical tokens for both models: the maps are equal
    a = np.asarray(Image.open(tmp_path / idx["images"][0]["maps"]["pretrained"]["1"]))
    b = np.asarray(Image.open(tmp_path / idx["images"][0]["maps"]["seg"]["1"]))
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)
