"""ViT-Adapter: geometry, the zero-initialised injector, and parameter totals against the published ones.

Published totals (ViT-Adapter paper's ADE20K UperNet table, 150 classes): S 57.6 M, B 133.9 M,
L 363.8 M; DINOv2 + UperNet (the ViT-Split paper's table): B 120.7 M, L 341.2 M. They count every
trained parameter, the auxiliary FCN head included. Exact counts are asserted so that any change in
the layer list shows; the large models are built on the meta device (no memory, no init cost).
"""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vitsplit.backbones import Backbone, create_vit, resolve_name
from vitsplit.model import build_model, count_trainable
from vitsplit.model.adapter_blocks import InteractionBlock
from vitsplit.model.plain_pyramid import PlainPyramid, pyramid_layers
from vitsplit.model.upernet import UperNetSegHead
from vitsplit.model.vit_adapter import PUBLISHED_ADAPTERS, ViTAdapter, adapter_config, interaction_groups
from vitsplit.ops.ms_deform_attn import MSDeformAttn, reference_points


def trainable(m):
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def meta_backbone(name):
    with torch.device("meta"):
        return Backbone(create_vit(resolve_name(name)), name=name, weights_source="random")


def adapter_upernet_total(name):
    with torch.device("meta"):
        bb = meta_backbone(name)
        model = torch.nn.ModuleDict({"adapter": ViTAdapter(bb), "head": UperNetSegHead([bb.embed_dim] * 4, 150)})
    return trainable(model), trainable(model["head"].aux)


# (timm backbone, exact total with the auxiliary head, published total or None)
ADAPTER_ROWS = [
    ("deit_small_patch16_224", 57_605_692, 57.6),  # ViT-Adapter-S, the released DeiT-S config
    ("vit_base_patch16_384", 133_910_284, 133.9),  # ViT-Adapter-B, the released AugReg-B config (384 px pos. embedding)
    ("deit_base_patch16_224", 133_618_444, None),  # the released DeiT-B config: 380 fewer pos.-embedding rows
    ("vit_large_patch16_384", 363_752_940, 363.8),  # ViT-Adapter-L, the released AugReg-L config (384 px)
]


@pytest.mark.parametrize("name,exact,published", ADAPTER_ROWS)
def test_vit_adapter_upernet_totals(name, exact, published):
    total, aux = adapter_upernet_total(name)
    assert total == exact
    if published is not None:
        assert round(total / 1e6, 1) == published
        assert round((total - aux) / 1e6, 1) != published  # the published figure includes the auxiliary head


def test_b_and_l_totals_differ_from_the_224px_backbones_by_the_position_embedding():
    """The paper's B/L figures use 384 px position embeddings (24 x 24 + 1 rows): on 224 px
    backbones (14 x 14 + 1 rows) the totals are (577 - 197) * C smaller."""
    assert ADAPTER_ROWS[1][1] - ADAPTER_ROWS[2][1] == (577 - 197) * 768
    total_224, _ = adapter_upernet_total("vit_large_patch16_224")
    assert ADAPTER_ROWS[3][1] - total_224 == (577 - 197) * 1024


@pytest.mark.parametrize(
    "name,exact,published", [("dinov2_vitb14", 120_721_196, 120.7), ("dinov2_vitl14", 341_196_076, 341.2)]
)
def test_dinov2_full_upernet_totals(name, exact, published):
    """Full fine-tuning (every backbone parameter) + UperNet with its auxiliary head, on a
    parameter-free four-level neck."""
    bb = meta_backbone(name)
    with torch.device("meta"):
        head = UperNetSegHead([bb.embed_dim] * 4, 150)
    total = sum(p.numel() for p in bb.parameters()) + trainable(head)
    assert total == exact and round(total / 1e6, 1) == published


@pytest.mark.parametrize(
    "name,exact", [("dinov2_vits14", 57_996_220), ("dinov2_vitb14", 134_399_500), ("dinov2_vitl14", 364_429_804)]
)
def test_vit_adapter_on_dinov2_totals(name, exact):
    """ViT-Adapter-S/B/L on DINOv2 (patch 14, 37 x 37 + 1 position rows, layer scale): the adapter
    and head are the same as on DeiT/AugReg; the backbone part differs."""
    total, _ = adapter_upernet_total(name)
    assert total == exact


def test_published_configs_and_rule():
    s, b, l = PUBLISHED_ADAPTERS[(12, 384)], PUBLISHED_ADAPTERS[(12, 768)], PUBLISHED_ADAPTERS[(24, 1024)]
    assert s.interaction_indexes == b.interaction_indexes == ((0, 2), (3, 5), (6, 8), (9, 11))
    assert l.interaction_indexes == ((0, 5), (6, 11), (12, 17), (18, 23))
    assert (s.deform_num_heads, b.deform_num_heads, l.deform_num_heads) == (6, 12, 16)
    assert (s.deform_ratio, b.deform_ratio, l.deform_ratio) == (1.0, 0.5, 0.5)
    rule = adapter_config(8, 32, 2)
    assert rule.interaction_indexes == ((0, 1), (2, 3), (4, 5), (6, 7)) and rule.deform_num_heads == 2


def tiny_backbone(patch=16, depth=4, dim=32, prefix_cls=True):
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=64,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=2,
        num_classes=0,
        dynamic_img_size=True,
        class_token=prefix_cls,
        global_pool="token" if prefix_cls else "avg",
    )
    return Backbone(vit, name="tiny", weights_source="random (seed 0)").eval()


def test_geometry_patch16_matches_the_release():
    """Patch 16, input divisible by 32: levels at exactly H/4, H/8, H/16, H/32 (the release's
    ``h // 8`` etc.) and the ViT grid equals the 1/16 level."""
    ad = ViTAdapter(tiny_backbone()).eval()
    with torch.no_grad():
        feats = ad(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, 32, 16, 24), (2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3)]


def test_geometry_patch14_odd_sizes():
    ad = ViTAdapter(tiny_backbone(patch=14)).eval()
    with torch.no_grad():
        feats = ad(torch.randn(1, 3, 100, 76))  # padded to 112 x 84: grid 8 x 6
    assert [tuple(f.shape[-2:]) for f in feats] == [(28, 21), (14, 11), (7, 6), (4, 3)]


def test_tokens_use_patch_positions_only():
    """At the native grid the adapter's ViT tokens are the backbone's patch tokens (cls slot of
    the position embedding dropped); the unused cls token and final norm are frozen."""
    bb = tiny_backbone()
    ad = ViTAdapter(bb).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        tokens, grid = ad._tokens(x)
        ref = bb.embed(x)[:, bb.num_prefix_tokens :]
    assert grid == (4, 4) and torch.equal(tokens, ref)
    frozen = {n for n, p in ad.named_parameters() if not p.requires_grad}
    assert frozen == {"backbone.vit.cls_token", "backbone.vit.norm.weight", "backbone.vit.norm.bias"}


def test_zero_gamma_injector_leaves_the_vit_path_unchanged():
    """gamma starts at 0 (the paper's init): the ViT tokens after an interaction are the plain
    blocks' output, whatever the spatial features; with gamma != 0 they are not."""
    torch.manual_seed(0)
    bb = tiny_backbone()
    blk = InteractionBlock(
        32,
        num_heads=2,
        n_points=4,
        deform_ratio=1.0,
        cffn_ratio=0.25,
        drop_path=0.0,
        init_values=0.0,
        extra_extractors=True,
    ).eval()
    shapes = [(8, 8), (4, 4), (2, 2)]
    x, c = torch.randn(1, 16, 32), torch.randn(1, 84, 32)
    args = ([bb.vit.blocks[0], bb.vit.blocks[1]], (4, 4), shapes, reference_points([(4, 4)]), reference_points(shapes))
    with torch.no_grad():
        x_out, c_out = blk(x, c, *args)
        plain = bb.vit.blocks[1](bb.vit.blocks[0](x))
        assert torch.equal(x_out, plain)
        assert c_out.shape == c.shape and float((c_out - c).abs().max()) > 1e-3  # the extractors did update c
        blk.injector.gamma.fill_(0.5)
        assert float((blk(x, c, *args)[0] - plain).abs().max()) > 1e-3


def test_backward_reaches_every_trainable_parameter():
    torch.manual_seed(0)
    ad = ViTAdapter(tiny_backbone())
    with torch.no_grad():  # move off the init's zeros, which block some gradients exactly
        for blk in ad.interactions:
            blk.injector.gamma.fill_(0.1)  # gamma 0: no gradient into the injector's attention
        for m in ad.modules():
            if isinstance(m, MSDeformAttn):  # zero offset/weight matrices: no gradient into the query path
                torch.nn.init.normal_(m.sampling_offsets.weight, std=0.01)
                torch.nn.init.normal_(m.attention_weights.weight, std=0.01)
    head = UperNetSegHead([32] * 4, 3, channels=16, aux_channels=8)
    loss = head.loss(ad(torch.randn(2, 3, 64, 64)), torch.randint(0, 3, (2, 64, 64)))["loss"]
    loss.backward()
    missing = [n for n, p in ad.named_parameters() if p.requires_grad and (p.grad is None or not bool(p.grad.any()))]
    # pos_embed's cls row gets no gradient (the release also keeps that unused row); everything else does
    assert missing == []
    assert not bool(ad.backbone.vit.pos_embed.grad[0, 0].any())


def test_groups_rule_reproduces_the_published_indexes_and_the_pyramid_reads_their_ends():
    assert interaction_groups(12) == PUBLISHED_ADAPTERS[(12, 384)].interaction_indexes
    assert interaction_groups(24) == PUBLISHED_ADAPTERS[(24, 1024)].interaction_indexes
    assert pyramid_layers(12) == [2, 5, 8, 11] and pyramid_layers(24) == [5, 11, 17, 23]
    maps = [torch.randn(1, 4, 5, 7) for _ in range(4)]
    assert [tuple(m.shape[-2:]) for m in PlainPyramid()(maps)] == [(20, 28), (10, 14), (5, 7), (2, 3)]
    assert sum(p.numel() for p in PlainPyramid().parameters()) == 0


def test_method_models_train_exactly_the_counted_modules():
    """What the trainer trains (count_trainable of the built method) is the adapter (or whole
    backbone) plus the UperNet head counted above."""
    for method in ("vit-adapter", "full"):
        model = build_model(method, tiny_backbone(depth=4), "seg", 150, head="upernet")
        head = UperNetSegHead([32] * 4, 150)
        body = ViTAdapter(tiny_backbone(depth=4)) if method == "vit-adapter" else tiny_backbone(depth=4)
        assert count_trainable(model) == trainable(body) + trainable(head)


def test_rope_backbones_are_refused_and_the_spatial_prior_sees_the_models_normalisation():
    from timm.models.eva import Eva

    from vitsplit.errors import UserError

    eva = Eva(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=4,
        num_heads=2,
        num_classes=0,
        use_rot_pos_emb=True,
        dynamic_img_size=True,
    )
    with pytest.raises(UserError, match="VisionTransformer"):
        ViTAdapter(Backbone(eva, name="eva-tiny", weights_source="random"))
    bb = tiny_backbone()
    bb.vit.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # AugReg's normalisation
    bb = Backbone(bb.vit, name="augreg-like", weights_source="random")
    ad = ViTAdapter(bb).eval()
    seen = []
    ad.spm.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ad(x)
    assert torch.allclose(seen[0], bb.to_model_input(x)) and not torch.allclose(seen[0], x)
