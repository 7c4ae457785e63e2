"""The Backbone wrapper on every family: tokens equal timm's own forward, task-head copies called
through the family's block adapter reproduce the backbone, prefix tokens, re-normalisation."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_vits import TINY, tiny_backbone

from vitsplit.backbones.families import size_kwargs
from vitsplit.errors import UserError
from vitsplit.ops.imagenet import IMAGENET_MEAN as INPUT_MEAN
from vitsplit.ops.imagenet import IMAGENET_STD as INPUT_STD

FAMILIES = list(TINY)
# (prefix tokens, class token, registers, patch size, family class name)
EXPECTED = {
    "dinov2": (5, True, 4, 14, "vit"),
    "dinov3": (5, True, 4, 16, "eva"),
    "dinov3_swiglu": (5, True, 4, 16, "eva"),
    "dinov3_qkvb": (5, True, 4, 16, "eva"),
    "eva02": (1, True, 0, 14, "eva"),
    "clip": (1, True, 0, 16, "vit"),
    "siglip": (0, False, 0, 16, "vit"),
    "mae": (1, True, 0, 16, "vit"),
    "sam": (0, False, 0, 16, "sam"),
}


def images(h: int = 50, w: int = 37, seed: int = 1) -> torch.Tensor:
    """Not a multiple of 14 or 16: every family pads."""
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


def timm_reference(bb, x: torch.Tensor) -> torch.Tensor:
    """timm's own forward on the re-normalised, padded input: last block's tokens, final-normed
    (SAM: the last block's (B, C, h, w) intermediate, flattened; SAM has no final norm)."""
    vit = bb.vit
    xm = (
        (x * torch.tensor(INPUT_STD).view(1, 3, 1, 1) + torch.tensor(INPUT_MEAN).view(1, 3, 1, 1))
        - torch.tensor(bb.pixel_mean).view(1, 3, 1, 1)
    ) / torch.tensor(bb.pixel_std).view(1, 3, 1, 1)
    xm = bb.pad(xm)
    if bb.family.name == "sam":
        out = vit.forward_intermediates(xm, indices=[bb.num_layers - 1], intermediates_only=True)[0]
        return out.flatten(2).transpose(1, 2)
    out = vit.forward_features(xm)
    return bb.family.final_norm(vit)(out) if isinstance(vit.norm, torch.nn.Identity) else out


@pytest.mark.parametrize("family", FAMILIES)
def test_tokens_equal_timms_forward_and_layout(family):
    bb = tiny_backbone(family)
    prefix, cls, regs, p, fam = EXPECTED[family]
    assert (bb.num_prefix_tokens, bb.has_class_token, bb.num_registers, bb.patch_size, bb.family.name) == (
        prefix,
        cls,
        regs,
        p,
        fam,
    )
    x = images()
    hw = bb.grid_size(*x.shape[-2:])
    assert hw == (-(-50 // p), -(-37 // p))
    with torch.no_grad():
        got = bb(x)
        want = timm_reference(bb, x)
    assert got.shape == (2, prefix + hw[0] * hw[1], 64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert bb.tokens_to_map(got, hw).shape == (2, 64, *hw)


@pytest.mark.parametrize("family", FAMILIES)
def test_task_head_copies_through_the_block_adapter_reproduce_the_backbone(family):
    """ViT-Split's task head: deep copies of blocks [k, L) fed block k-1's tokens, called with the
    grid's context, must give the backbone's last block exactly (RoPE for Eva, the grid for SAM)."""
    bb = tiny_backbone(family)
    L, k = bb.num_layers, 2
    x = images()
    hw = bb.grid_size(*x.shape[-2:])
    copies = [copy.deepcopy(bb.family.blocks(bb.vit)[i]) for i in range(k, L)]
    with torch.no_grad():
        feats = bb.forward_layers(x, [k - 1, L - 1])
        ctx = bb.block_context(hw)
        t = feats[k - 1]
        for i, block in zip(range(k, L), copies):
            t = bb.call_block(block, t, ctx, i)
        torch.testing.assert_close(t, feats[L - 1], rtol=0, atol=1e-6)
        torch.testing.assert_close(bb.run_blocks(feats[k - 1], k, L, ctx), feats[L - 1], rtol=0, atol=1e-6)


def test_eva_copies_need_the_rope_context():
    """Without the grid's RoPE a DINOv3 block computes something else: the adapter is not a no-op."""
    bb = tiny_backbone("dinov3")
    x = images()
    with torch.no_grad():
        feats = bb.forward_layers(x, [1, 2])
        block = bb.family.blocks(bb.vit)[2]
        assert (block(feats[1], rope=None) - feats[2]).abs().max() > 1e-3
    with pytest.raises(UserError, match="context"):
        bb.run_blocks(feats[1], 2, 3)


def test_forward_layers_stops_early():
    bb = tiny_backbone("dinov3")
    calls = []
    for i, b in enumerate(bb.family.blocks(bb.vit)):
        b.register_forward_hook(lambda *a, i=i: calls.append(i))
    out = bb.forward_layers(images(), [0, 2])
    assert sorted(out) == [0, 2] and calls == [0, 1, 2]
    with pytest.raises(UserError, match="outside"):
        bb.forward_layers(images(), [4])


@pytest.mark.parametrize(
    "family,renorm",
    [("clip", True), ("siglip", True), ("eva02", True), ("dinov3", False), ("mae", False), ("sam", False)],
)
def test_models_trained_with_other_statistics_are_renormalised(family, renorm):
    bb = tiny_backbone(family)
    assert bb._renormalize is renorm
    x = images(32, 32)
    raw = x * torch.tensor(INPUT_STD).view(1, 3, 1, 1) + torch.tensor(INPUT_MEAN).view(1, 3, 1, 1)  # [0, 1]-ish
    want = (raw - torch.tensor(bb.pixel_mean).view(1, 3, 1, 1)) / torch.tensor(bb.pixel_std).view(1, 3, 1, 1)
    torch.testing.assert_close(bb.to_model_input(x), bb.pad(want), rtol=0, atol=1e-6)


def test_size_kwargs_per_family():
    assert size_kwargs("samvit_base_patch16") == {}
    assert size_kwargs("vit_small_patch16_dinov3") == {"dynamic_img_size": True}
    assert size_kwargs("vit_base_patch16_siglip_224") == {"dynamic_img_size": True}
    with pytest.raises(UserError, match="unknown timm model"):
        size_kwargs("not_a_model")


def test_unsupported_architectures_are_refused():
    import timm

    from vitsplit.backbones import Backbone

    with pytest.raises(UserError, match="not a plain ViT"):
        Backbone(timm.create_model("resnet18", pretrained=False, num_classes=0), name="r", weights_source="random")


@pytest.mark.parametrize(
    "name,family,stats",
    [
        ("vit_base_patch16_224.mae", "vit", (0.485, 0.456, 0.406)),  # MAE: ImageNet statistics
        ("vit_base_patch16_224", "vit", (0.5, 0.5, 0.5)),  # its default tag (augreg) differs
        ("vit_base_patch16_clip_224.openai", "vit", (0.48145466, 0.4578275, 0.40821073)),
        ("vit_base_patch16_siglip_224.v2_webli", "vit", (0.5, 0.5, 0.5)),
        ("eva02_base_patch14_224.mim_in22k", "eva", (0.48145466, 0.4578275, 0.40821073)),
        ("samvit_base_patch16", "sam", (0.485, 0.456, 0.406)),
        ("dinov3_vitb16", "eva", (0.485, 0.456, 0.406)),
    ],
)
def test_timm_names_of_every_family_build_with_the_tags_statistics(name, family, stats):
    """Built on the meta device (no memory): the pretrained tag decides the input statistics."""
    from vitsplit.backbones import build_backbone, resolve_name

    spec = resolve_name(name)
    assert ("dynamic_img_size" in spec.timm_kwargs) == (family != "sam")
    with torch.device("meta"):
        bb = build_backbone(spec, "random")
    assert bb.family.name == family and bb.pixel_mean == pytest.approx(stats)


def test_unknown_tags_and_names_are_refused():
    from vitsplit.backbones import resolve_name

    with pytest.raises(UserError, match="no pretrained tag"):
        resolve_name("vit_base_patch16_224.not_a_tag")
    with pytest.raises(UserError, match="DINOv3, CLIP, SigLIP, MAE, SAM, EVA-02"):
        resolve_name("not_a_model")


@pytest.mark.parametrize("name", ["naflexvit_base_patch16_siglip", "convnext_tiny", "swin_tiny_patch4_window7_224"])
def test_other_timm_classes_are_refused_before_building(name):
    from vitsplit.backbones import resolve_name

    with pytest.raises(UserError, match="not a plain ViT this tool can split"):
        resolve_name(name)
