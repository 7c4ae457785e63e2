"""The vit-adapter method's optimiser groups and state (the trainer-facing interface)."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vitsplit.model.adapter_baseline import LAYER_DECAY, ViTAdapterBaseline
from vitsplit.backbones import Backbone
from vitsplit.errors import UserError


def tiny_backbone() -> Backbone:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=0,
                            dynamic_img_size=True)
    return Backbone(vit, name="tiny", weights_source="random (seed 0)").eval()


def test_layer_decay_groups_as_the_release():
    model = ViTAdapterBaseline(tiny_backbone(), "seg", 3, head="upernet")
    groups = model.param_groups(1e-3, 0.05)
    where = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    # every trainable parameter exactly once; the unused cls token and final norm in none
    assert sum(len(g["params"]) for g in groups) == len(where) == sum(p.requires_grad for p in named.values())
    assert id(named["adapter.backbone.vit.cls_token"]) not in where
    depth = 4
    g = where[id(named["adapter.backbone.vit.blocks.2.attn.qkv.weight"])]
    assert g["lr"] == pytest.approx(1e-3 * LAYER_DECAY ** (depth - 2)) and g["weight_decay"] == 0.05
    g = where[id(named["adapter.backbone.vit.blocks.2.attn.qkv.bias"])]
    assert g["lr"] == pytest.approx(1e-3 * LAYER_DECAY ** (depth - 2)) and g["weight_decay"] == 0.0
    g = where[id(named["adapter.backbone.vit.pos_embed"])]
    assert g["lr"] == pytest.approx(1e-3 * LAYER_DECAY ** (depth + 1)) and g["weight_decay"] == 0.05
    for name in ("adapter.level_embed", "adapter.spm.conv2.0.weight", "head.decode.fpn_bottleneck.0.weight"):
        assert where[id(named[name])]["lr"] == 1e-3 and where[id(named[name])]["weight_decay"] == 0.05
    assert where[id(named["adapter.interactions.0.injector.gamma"])]["weight_decay"] == 0.0


def test_state_round_trip_and_refusals():
    a = ViTAdapterBaseline(tiny_backbone(), "seg", 3, head="upernet")
    state = a.trainable_state_dict()
    assert "adapter.backbone.vit.cls_token" not in state and "head.aux.convs.0.1.running_mean" in state
    bb = tiny_backbone()
    torch.manual_seed(1)  # other adapter/head init than a's
    b = ViTAdapterBaseline(bb, "seg", 3, head="upernet")
    assert not torch.equal(b.trainable_state_dict()["adapter.level_embed"], state["adapter.level_embed"])
    b.load_trainable_state_dict(state)
    assert all(torch.equal(v, b.trainable_state_dict()[k]) for k, v in state.items())
    with pytest.raises(UserError, match="does not fit"):
        ViTAdapterBaseline(tiny_backbone(), "seg", 3, head="linear").load_trainable_state_dict(state)
    with pytest.raises(UserError, match="segmentation"):
        ViTAdapterBaseline(tiny_backbone(), "depth", 1)
    with pytest.raises(UserError, match="unknown head"):
        ViTAdapterBaseline(tiny_backbone(), "seg", 3, head="mask2former")
