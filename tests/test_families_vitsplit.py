"""ViT-Split and the baselines on every backbone family at tiny size with random weights: seg, det and
depth build and train one step; only the trainable parts learn; LoRA reaches the qkv of Eva models
with a qkv bias."""

from __future__ import annotations

import pytest
import torch
from tiny_vits import TINY, tiny_backbone

from vitsplit.backbones import state_hash
from vitsplit.model import ViTSplit, count_trainable
from vitsplit.model.baselines import Baseline

FAMILIES = list(TINY)


def seg_batch(b: int = 2, h: int = 34, w: int = 40, k: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(b, 3, h, w, generator=g),
        "seg": torch.randint(0, k, (b, h, w), generator=g),
        "depth": torch.rand(b, h, w, generator=g) * 5 + 0.5,
    }


def det_batch() -> dict:
    masks = torch.zeros(2, 56, 70, dtype=torch.uint8)
    masks[0, 5:40, 6:30] = 1
    masks[1, 20:50, 10:60] = 1
    return {
        "image": torch.randn(2, 3, 56, 70, generator=torch.Generator().manual_seed(1)),
        "boxes": [torch.tensor([[6.0, 5.0, 30.0, 40.0]]), torch.tensor([[10.0, 20.0, 60.0, 50.0]])],
        "labels": [torch.tensor([1]), torch.tensor([2])],
        "masks": [masks[:1], masks[1:]],
    }


def one_step(model, batch) -> float:
    model.train()
    opt = torch.optim.AdamW(model.param_groups(1e-3), betas=(0.9, 0.999))
    loss = model.loss(batch)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    return float(loss.detach())


@pytest.mark.parametrize("family,task", [(f, "seg") for f in FAMILIES] + [("dinov3", "depth"), ("sam", "depth")])
def test_vitsplit_trains_a_step_on_every_family(family, task):
    bb = tiny_backbone(family)
    m = ViTSplit(bb, 2, [0, 1, 3], task, 3)
    before = state_hash(bb)
    batch = seg_batch()
    head_w = m.split.task_head.blocks[0].norm1.weight.detach().clone()
    loss = one_step(m, batch)
    assert all(p.grad is None for p in bb.parameters())
    assert state_hash(bb) == before
    assert (m.split.task_head.blocks[0].norm1.weight - head_w).abs().max() > 0  # the copies learn
    assert m.loss(batch)["loss"].item() != pytest.approx(loss, abs=1e-7)
    m.eval()
    with torch.no_grad():
        out = m(batch["image"])
    assert out.shape == ((2, 3, 34, 40) if task == "seg" else (2, 1, 34, 40))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dinov3", "sam"])
def test_vitsplit_det_trains_a_step(family):
    bb = tiny_backbone(family)
    m = ViTSplit(bb, 2, [0, 1], "det", 2)
    one_step(m, det_batch())
    assert m.split.task_head.blocks[0].norm1.weight.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        dets = m(torch.randn(1, 3, 56, 70))
    assert len(dets) == 1 and {"boxes", "labels", "scores", "masks"} <= set(dets[0])


@pytest.mark.parametrize("family,method", [("eva02", "lora"), ("sam", "full"), ("siglip", "linear")])
def test_baselines_train_a_step(family, method):
    m = Baseline(tiny_backbone(family), method, "seg", 3)
    one_step(m, seg_batch())
    assert count_trainable(m) > 0


@pytest.mark.parametrize("family", ["eva02", "dinov3_qkvb", "dinov3"])
def test_lora_on_qkv_reaches_eva_attention(family):
    """Eva attention with a qkv bias (EVA-02, DINOv3 _qkvb) would compute F.linear(x, qkv.weight,
    bias) and bypass the adapter: with the adapters' B at zero the output must be the backbone's,
    and with B random on qkv only it must differ."""
    bb = tiny_backbone(family)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = bb(x)
    m = Baseline(bb, "lora", "seg", 3)
    with torch.no_grad():
        torch.testing.assert_close(m.backbone(x), ref, rtol=0, atol=1e-5)
        for n, p in m.backbone.named_parameters():
            if "lora_B" in n and ".qkv." in n:
                p.normal_()
        assert (m.backbone(x) - ref).abs().max() > 1e-3
