"""ViT-CoMer (vit-comer): MRFP/CTI shapes, the published parameter totals on the meta device, one
training step through the trainer, the layer-decay groups and the option checks."""

import pytest
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from vitsplit.backbones import Backbone, create_vit, resolve_name
from vitsplit.engine import TrainConfig, train
from vitsplit.engine.config import resolve_config
from vitsplit.errors import UserError
from vitsplit.model import model_from_config
from vitsplit.model.comer_baseline import ViTCoMerBaseline
from vitsplit.model.comer_blocks import MRFP, CoMerInteraction, CTIToCNN, CTIToViT
from vitsplit.model.upernet import UperNetSegHead
from vitsplit.model.vit_comer import ViTCoMer
from vitsplit.ops.ms_deform_attn import reference_points

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(8, 8), (4, 4), (2, 2)]  # the 1/8, 1/16, 1/32 levels of a 64 px image
S = sum(h * w for h, w in SHAPES)


def tiny_backbone() -> Backbone:
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=0, dynamic_img_size=True
    )
    return Backbone(vit, name="tiny", weights_source="random (seed 0)").eval()


def test_mrfp_and_cti_shapes_and_what_they_change():
    torch.manual_seed(0)
    c, x = torch.randn(2, S, 32), torch.randn(2, 16, 32)
    ref = reference_points(SHAPES)
    assert MRFP(32, 48)(c, SHAPES).shape == (2, S, 32)
    tov = CTIToViT(32, 2, 4, 1.0, 0.25, 0.0)
    assert torch.equal(tov(x, c, ref, (4, 4), SHAPES), x)  # gamma starts at 0: the ViT is untouched
    with torch.no_grad():
        tov.gamma.fill_(1.0)
    assert not torch.allclose(tov(x, c, ref, (4, 4), SHAPES), x)
    for with_ffn in (False, True):
        assert CTIToCNN(32, 2, 4, 1.0, 0.25, 0.0, with_ffn=with_ffn)(c, x, ref, (4, 4), SHAPES).shape == (2, S, 32)
    block = CoMerInteraction(32, 2, 4, 1.0, 0.25, 0.0, 0.0, 48, extra=True)
    assert len(block.extra_ctis) == 4
    x2, c2 = block(x, c, [torch.nn.Identity()], (4, 4), SHAPES, ref)
    assert x2.shape == x.shape and c2.shape == c.shape


def test_pyramid_levels_for_patch_16_and_14():
    for patch, size in ((16, 64), (14, 56)):
        vit = VisionTransformer(
            img_size=size, patch_size=patch, embed_dim=32, depth=4, num_heads=2, num_classes=0, dynamic_img_size=True
        )
        feats = ViTCoMer(Backbone(vit, name="t", weights_source="random")).eval()(torch.randn(2, 3, size, size))
        assert [tuple(f.shape) for f in feats] == [(2, 32, -(-size // s), -(-size // s)) for s in (4, 8, 16, 32)]


@pytest.mark.parametrize(
    "name,published",
    [("deit_tiny_patch16_224", 38.7), ("deit_small_patch16_224", 61.4), ("deit_base_patch16_224", 144.7)],
)
def test_published_totals_on_the_released_backbones(name, published):
    """The ViT-CoMer release's ADE20K table: T/S/B + UperNet 38.7 / 61.4 / 144.7 M trainable."""
    with torch.device("meta"):
        bb = Backbone(create_vit(resolve_name(name)), name=name, weights_source="random")
        parts = (ViTCoMer(bb), UperNetSegHead([bb.embed_dim] * 4, 150))  # what --head upernet trains
    total = sum(p.numel() for m in parts for p in m.parameters() if p.requires_grad)
    assert round(total / 1e6, 1) == published
    if name == "deit_small_patch16_224":
        assert total == 61_382_284


def test_layer_decay_groups_and_config_roundtrip():
    model = ViTCoMerBaseline(tiny_backbone(), "seg", 3, head="upernet")
    groups = model.param_groups(1e-3, 0.05)
    named = dict(model.named_parameters())
    where = {id(p): g for g in groups for p in g["params"]}
    assert len(where) == sum(p.requires_grad for p in named.values())
    assert where[id(named["adapter.backbone.vit.blocks.0.attn.qkv.weight"])]["lr"] == pytest.approx(1e-3 * 0.95**4)
    assert where[id(named["adapter.interactions.0.mrfp.fc1.weight"])]["lr"] == pytest.approx(1e-3)
    conf = model.config()
    assert conf["method"] == "vit-comer" and conf["comer"]["interaction_indexes"] == [[0, 0], [1, 1], [2, 2], [3, 3]]
    rebuilt = model_from_config(conf, tiny_backbone())
    assert isinstance(rebuilt, ViTCoMerBaseline) and rebuilt.adapter.config == model.adapter.config


def test_one_training_step_moves_the_weights(tmp_path):
    cfg = TrainConfig(
        method="vit-comer",
        head="upernet",
        task="seg",
        data="synthetic",
        iters=2,
        batch_size=2,
        crop=64,
        train_length=4,
        val_length=2,
        checkpoint_every=100,
        log_every=1,
        out=str(tmp_path / "run"),
        device="cpu",
        evaluate=False,
    )
    bb = tiny_backbone()
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    train(cfg, backbone=bb)
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    prefix = "adapter.backbone.vit."
    blocks = [k for k in saved if k.startswith(prefix + "blocks.")]
    assert blocks and any(
        not torch.equal(before[k[len("adapter.backbone.") :]], saved[k]) for k in blocks
    )  # the ViT trained
    assert any(k.startswith("adapter.interactions.3.extra_ctis.3.") for k in saved)


def test_option_checks():
    with pytest.raises(UserError, match="does not apply to vit-comer"):
        resolve_config(TrainConfig(method="vit-comer", pretrained_lr_scale=0.1))
    with pytest.raises(UserError, match="vit-comer is built for segmentation"):
        resolve_config(TrainConfig(method="vit-comer", task="depth"))
    assert resolve_config(TrainConfig(method="vit-comer")).pretrained_lr_scale is None
