"""Block features through forward hooks: modes, fixed token subsets, bf16 upcast, early stop."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from cka_split.estimator.features import BlockFeatures, select_features, token_positions, vit_blocks
from vitsplit.backbones import Backbone
from vitsplit.errors import UserError


def tiny_vit(**kw) -> VisionTransformer:
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=0, dynamic_img_size=True)
    args.update(kw)
    return VisionTransformer(**args).eval()


def tiny_backbone(**kw) -> Backbone:
    return Backbone(tiny_vit(**kw), name="tiny", weights_source="random")


def test_tokens_mean_cls_match_forward_layers():
    bb = tiny_backbone(reg_tokens=2)  # 1 cls + 2 registers + 16 patches
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = bb.forward_layers(x, [0, 2])
        for mode, expect in [
            ("tokens", lambda t: t[:, 3:].reshape(3, -1)),
            ("mean", lambda t: t[:, 3:].mean(1)),
            ("cls", lambda t: t[:, 0]),
        ]:
            with BlockFeatures(bb, [2, 0], mode) as bf:
                out = bf(x)
            assert list(out) == [2, 0]
            for i in (0, 2):
                torch.testing.assert_close(out[i], expect(ref[i]), rtol=0, atol=0)
    assert out[0].shape == (3, 32) and BlockFeatures(bb, [0], "tokens").prefix == 3


def test_timm_vit_directly_and_hooks_removed():
    vit = tiny_vit()
    assert vit_blocks(vit) is vit.blocks
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), BlockFeatures(vit, [1], "tokens") as bf:
        out = bf(x)
    assert out[1].shape == (2, 16 * 32)
    assert all(len(b._forward_hooks) == 0 for b in vit.blocks)


def test_forward_stops_after_deepest_block():
    vit = tiny_vit()
    ran = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(vit.blocks)]
    with torch.no_grad(), BlockFeatures(vit, [0, 1], "mean") as bf:
        bf(torch.randn(2, 3, 32, 32))
    for h in handles:
        h.remove()
    assert ran == [0, 1]


def test_token_subsample_is_fixed_seeded_and_shared_by_models():
    p1 = token_positions(16, 5, seed=0)
    assert p1.tolist() == sorted(set(p1.tolist())) and len(p1) == 5
    assert torch.equal(p1, token_positions(16, 5, seed=0))
    assert not torch.equal(p1, token_positions(16, 5, seed=1))
    assert token_positions(16, 16) is None and token_positions(16, None) is None
    a, b = tiny_backbone(), tiny_backbone()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ta, tb = a.forward_layers(x, [1])[1], b.forward_layers(x, [1])[1]
        with (
            BlockFeatures(a, [1], token_subsample=5, seed=0) as fa,
            BlockFeatures(b, [1], token_subsample=5, seed=0) as fb,
        ):
            oa, ob = fa(x)[1], fb(x)[1]
    torch.testing.assert_close(oa, ta[:, 1:][:, p1].reshape(2, -1), rtol=0, atol=0)
    torch.testing.assert_close(ob, tb[:, 1:][:, p1].reshape(2, -1), rtol=0, atol=0)
    assert oa.shape == (2, 5 * 32)


def test_bf16_autocast_features_are_upcast():
    bb = tiny_backbone()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), BlockFeatures(bb, [0, 3], "tokens") as bf:
        out = bf(x)
    assert all(v.dtype == torch.float32 for v in out.values())
    t = torch.randn(2, 5, 4).to(torch.bfloat16)
    assert select_features(t, "mean", 1).dtype == torch.float32


def test_transform_replaces_features_inside_the_hook():
    bb = tiny_backbone()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), BlockFeatures(bb, [1], "tokens", transform=lambda f: f.shape) as bf:
        assert bf(x)[1] == (4, 16, 32)  # unflattened (B, P, C) when a transform follows


def test_user_errors():
    with pytest.raises(UserError, match="class token"):
        BlockFeatures(tiny_backbone(class_token=False, global_pool="avg"), [0], "cls")
    with pytest.raises(UserError, match="outside"):
        BlockFeatures(tiny_backbone(), [4])
    with pytest.raises(UserError, match="feature mode"):
        BlockFeatures(tiny_backbone(), [0], "pooled")
    with pytest.raises(UserError, match="no transformer blocks"):
        vit_blocks(torch.nn.Linear(2, 2))
