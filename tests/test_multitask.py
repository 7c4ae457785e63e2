"""Several tasks on one frozen pass give exactly the single-task models' outputs."""

import pytest
import timm
import torch

from vitsplit import UserError
from vitsplit.backbones import Backbone
from vitsplit.model import MultiTaskViTSplit, ViTSplit, count_trainable


def tiny_backbone(seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    vit = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        depth=4,
        embed_dim=64,
        num_heads=2,
        num_classes=0,
        dynamic_img_size=True,
        img_size=56,
        init_values=1.0,
    )
    return Backbone(vit, name="tiny", weights_source=f"random (seed {seed})").eval()


def _models(bb):
    return {
        "seg": ViTSplit(bb, 2, [0, 1], "seg", 3).eval(),
        "depth": ViTSplit(bb, 1, [1, 2], "depth").eval(),
        "det": ViTSplit(bb, 3, [0, 2], "det", 2, masks=False).eval(),
    }


def test_multitask_equals_single_task_and_runs_one_pass():
    bb = tiny_backbone()
    models = _models(bb)
    multi = MultiTaskViTSplit.from_models(models).eval()
    assert multi.needed_layers == [0, 1, 2]
    assert count_trainable(multi) == sum(count_trainable(m) for m in models.values())
    x = torch.randn(2, 3, 44, 58)
    calls = []
    hooks = [blk.register_forward_hook(lambda mod, i, o, k=k: calls.append(k)) for k, blk in enumerate(bb.vit.blocks)]
    with torch.no_grad():
        out = multi(x)
        frozen_calls = list(calls)
        single = {k: m(x) for k, m in models.items()}
    for h in hooks:
        h.remove()
    assert frozen_calls == [0, 1, 2]  # one pass, deepest needed block 2; single models run 2 + 3 + 3
    assert len(calls) - len(frozen_calls) == 2 + 3 + 3
    torch.testing.assert_close(out["seg"], single["seg"], rtol=0, atol=0)
    torch.testing.assert_close(out["depth"], single["depth"], rtol=0, atol=0)
    assert len(out["det"]) == 2
    for a, b in zip(out["det"], single["det"]):
        assert a.keys() == b.keys() and a["boxes"].shape[0] > 0
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_multitask_loss_is_sum_of_task_losses():
    bb = tiny_backbone()
    models = _models(bb)
    del models["det"]
    multi = MultiTaskViTSplit.from_models(models).train()
    assert not bb.training
    batch = {
        "image": torch.randn(2, 3, 42, 42),
        "seg": torch.randint(0, 3, (2, 42, 42)),
        "depth": torch.rand(2, 42, 42) + 0.5,
    }
    parts = multi.loss(batch)
    single = {k: m.loss(batch)["loss"] for k, m in models.items()}
    assert parts["loss"].item() == pytest.approx(single["seg"].item() + single["depth"].item(), rel=1e-6)
    assert parts["seg/loss"].item() == pytest.approx(single["seg"].item(), rel=1e-6)
    groups = multi.param_groups(1e-3)
    assert groups[0]["lr"] == pytest.approx(1e-4)
    assert sum(p.numel() for g in groups for p in g["params"]) == count_trainable(multi)


def test_multitask_from_configs_and_errors():
    bb = tiny_backbone()
    multi = MultiTaskViTSplit(
        bb,
        {
            "a": {"k_t": 2, "prior_layers": [0, 1], "task": "seg", "num_classes": 4},
            "b": {"k_t": 1, "prior_layers": [3], "task": "depth"},
        },
    )
    assert multi.needed_layers == [0, 1, 2, 3]
    out = multi.eval()(torch.randn(1, 3, 28, 28))
    assert out["a"].shape == (1, 4, 28, 28) and out["b"].shape == (1, 1, 28, 28)
    with pytest.raises(UserError, match="share one backbone"):
        MultiTaskViTSplit.from_models(
            {"x": ViTSplit(bb, 2, [0], "seg", 3), "y": ViTSplit(tiny_backbone(1), 2, [0], "seg", 3)}
        )
    with pytest.raises(UserError, match="K_t"):
        MultiTaskViTSplit(bb, {"a": {"k_t": 9, "prior_layers": [0], "task": "seg", "num_classes": 2}})
