"""The vit-adapter method and the UperNet head in the trainer: optimiser groups, state, one training
step per new method/head, reload, option checks."""

import json

import pytest
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from vitsplit.backbones import Backbone
from vitsplit.data import build_dataset
from vitsplit.engine import TrainConfig, train
from vitsplit.engine.config import default_lr, resolve_config
from vitsplit.engine.loop import seed_everything
from vitsplit.engine.train import build_model
from vitsplit.errors import UserError
from vitsplit.evaluation import evaluate_model
from vitsplit.model import load_trainable
from vitsplit.model.adapter_baseline import LAYER_DECAY, ViTAdapterBaseline

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_backbone() -> Backbone:
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=0, dynamic_img_size=True
    )
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


@pytest.mark.parametrize("method,head", [("vit-adapter", "upernet"), ("full", "upernet"), ("vit-adapter", "linear")])
def test_one_training_step_then_reload(tmp_path, method, head):
    """One optimizer step through ``train`` moves the weights; the saved file rebuilds the model
    (config + backbone hash) and scores exactly what eval.json says."""
    out = tmp_path / "run"
    cfg = TrainConfig(
        task="seg",
        method=method,
        head=head,
        data="synthetic:size=32,classes=2",
        iters=1,
        batch_size=2,
        crop=32,
        lr=1e-3,
        checkpoint_every=1,
        log_every=1,
        val_length=2,
        out=str(out),
    )
    result = train(cfg, backbone=tiny_backbone())
    conf = json.loads((out / "config.json").read_text())
    assert conf["head"] == head and conf["model_config"]["head"] == head and conf["model_config"]["method"] == method
    seed_everything(0)
    fresh = build_model(resolve_config(cfg), tiny_backbone(), 3)
    saved = load_file(str(out / "model.safetensors"))
    assert saved.keys() == fresh.trainable_state_dict().keys()
    moved = [k for k, v in fresh.trainable_state_dict().items() if not torch.equal(v, saved[k])]
    assert any(k.startswith("head.") for k in moved)
    assert any(".blocks." in k for k in moved)  # the ViT itself is trained under both methods
    if method == "vit-adapter":
        assert any(k.startswith("adapter.spm.") for k in moved)
    model = load_trainable(out / "model.safetensors", tiny_backbone())
    again = evaluate_model(
        model, build_dataset(cfg.data, "val", task="seg", crop=32, augment=False, length=2, seed=0), "seg", crop=32
    )
    assert again["IoU"] == result["IoU"]


def test_options_that_do_not_fit_are_refused():
    for kw, match in [
        (dict(method="linear", head="upernet"), "upernet"),
        (dict(method="vitsplit", head="upernet"), "own"),
        (dict(method="full", head="upernet", task="det"), "segmentation head"),
        (dict(method="vit-adapter", task="depth"), "segmentation"),
        (dict(method="full", head="fpn"), "unknown head"),
    ]:
        with pytest.raises(UserError, match=match):
            resolve_config(TrainConfig(**kw))


def test_default_lr_is_the_adapter_release_for_vit_adapter():
    assert default_lr("seg", tiny_backbone(), "vit-adapter") == 6e-5
    deep = Backbone(
        VisionTransformer(
            img_size=32, patch_size=8, embed_dim=32, depth=24, num_heads=2, num_classes=0, dynamic_img_size=True
        ),
        name="deep",
        weights_source="random",
    )
    assert default_lr("seg", deep, "vit-adapter") == 2e-5 and default_lr("seg", deep, "full") == 3e-4
