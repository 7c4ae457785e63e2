"""ViT-Split: published parameter totals, frozen backbone, task-head init, heads, save/load."""

import pytest
import timm
import torch

from vitsplit import UserError, build_backbone
from vitsplit.backbones import Backbone, state_hash
from vitsplit.model import ViTSplit, count_trainable, load_trainable, prior_layers_uniform, save_trained
from vitsplit.model.heads import DetHead, FixedStrideAnchorGenerator

SPEC = {  # size: (K_t, prior layers, {component: published count in M}, total)
    "s": (
        3,
        [2, 5, 8, 11],
        dict(task=5.33, prior=0.59, offsets=0.12, deform=2.65, fusion=0.30, up=1.18, linear=0.06),
        10_231_098,
    ),
    "b": (
        3,
        [2, 5, 8, 11],
        dict(task=21.27, prior=2.36, offsets=0.25, deform=10.62, fusion=1.18, up=4.73, linear=0.12),
        40_516_026,
    ),
    "l": (
        4,
        [2, 5, 8, 11, 14, 17, 20, 23],
        dict(task=50.39, prior=8.39, offsets=0.33, deform=18.87, fusion=2.10, up=8.40, linear=0.15),
        88_639_674,
    ),
    "g": (
        8,
        [27, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39],
        dict(task=226.69, prior=33.03, offsets=0.50, deform=42.47, fusion=4.72, up=18.89, linear=0.23),
        326_530_234,
    ),
}


def tiny_backbone(seed: int = 0, depth: int = 4, dim: int = 64) -> Backbone:
    torch.manual_seed(seed)
    vit = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        depth=depth,
        embed_dim=dim,
        num_heads=2,
        num_classes=0,
        dynamic_img_size=True,
        img_size=56,
        init_values=1.0,
    )
    return Backbone(vit, name="tiny", weights_source=f"random (seed {seed})").eval()


def _components(m: ViTSplit) -> dict[str, float]:
    s = m.split
    n = count_trainable
    return dict(
        task=n(s.task_head),
        prior=n(s.prior_head.reduce),
        offsets=n(s.prior_head.deform.offset) + n(s.fusion.deform.offset),
        deform=n(s.prior_head.deform.conv) + n(s.fusion.deform.conv),
        fusion=n(s.fusion.reduce),
        # the table's "seg head up + norms" row includes the fusion's unused BatchNorm (C*2 params)
        up=n(s.head.up) + n(s.head.bn) + n(s.fusion.unused_norm),
        linear=n(s.head.cls),
    )


@pytest.mark.parametrize("size", ["s", "b", "l", "g"])
def test_trainable_parameters_equal_published_table(size):
    k_t, prior, rows, total = SPEC[size]
    with torch.device("meta"):
        bb = build_backbone(f"dinov2_vit{size}14", "random")
        m = ViTSplit(bb, k_t, prior, "seg", 150)
    assert count_trainable(m) == total
    assert round(total / 1e6, 2) == {"s": 10.23, "b": 40.52, "l": 88.64, "g": 326.53}[size]
    comp = _components(m)
    assert sum(comp.values()) == total
    assert {k: round(v / 1e6, 2) for k, v in comp.items()} == rows
    assert count_trainable(bb) == 0


def test_small_real_build_counts_and_prior_sampling():
    bb = build_backbone("dinov2_vits14", "random", seed=0)
    m = ViTSplit(bb, 3, prior_layers_uniform(12, 4, 2), "seg", 150)
    assert m.prior_layers == [2, 5, 8, 11]
    assert count_trainable(m) == SPEC["s"][3]
    assert prior_layers_uniform(40, 14, 27) == SPEC["g"][1]  # the g config repeats layer 27
    assert prior_layers_uniform(24, 8, 2) == SPEC["l"][1]


def test_argument_validation():
    bb = tiny_backbone()
    for k_t in (0, 4, 2.0):
        with pytest.raises(UserError, match="K_t"):
            ViTSplit(bb, k_t, [0, 1], "seg", 3)
    for prior in ([-1, 2], [0, 4], []):
        with pytest.raises(UserError, match="prior layers"):
            ViTSplit(bb, 2, prior, "seg", 3)
    with pytest.raises(UserError, match="unknown task"):
        ViTSplit(bb, 2, [0], "classify", 3)
    m = ViTSplit(bb, 3, [1, 1, 3], "seg", 3)  # repeats allowed; K_t = L-1 reads block 0
    assert m.split.needed_layers == [0, 1, 3]
    with pytest.raises(UserError, match="divisible by 32"):
        ViTSplit(tiny_backbone(dim=48), 2, [0], "seg", 3)


def test_task_head_starts_equal_to_backbone_blocks():
    bb = tiny_backbone()
    m = ViTSplit(bb, 2, [0, 1], "seg", 3)
    x = torch.randn(2, 3, 42, 56)
    with torch.no_grad():
        feats = bb.forward_layers(x, [1, 3])
        out = m.split.task_head(feats[1], bb.block_context(bb.grid_size(42, 56)))
        torch.testing.assert_close(out, feats[3], rtol=1e-5, atol=1e-5)
        assert (out - feats[1]).abs().max() > 0.1  # blocks 2-3 do change the tokens
    # the copies are independent parameters
    assert m.split.task_head.blocks[0].attn.qkv.weight.data_ptr() != bb.vit.blocks[2].attn.qkv.weight.data_ptr()


def test_frozen_pass_stops_at_deepest_needed_block():
    bb = tiny_backbone()
    m = ViTSplit(bb, 2, [0, 1], "seg", 3)  # task input = block 1, prior 0, 1: blocks 2, 3 unused
    calls = []  # hooks on the frozen blocks only (registered after the task head copied 2, 3)
    hooks = [blk.register_forward_hook(lambda mod, i, o, k=k: calls.append(k)) for k, blk in enumerate(bb.vit.blocks)]
    m(torch.randn(1, 3, 28, 28))
    for h in hooks:
        h.remove()
    assert calls == [0, 1]


def _seg_batch(b=2, h=50, w=62, k=3):
    return {
        "image": torch.randn(b, 3, h, w),
        "seg": torch.randint(0, k, (b, h, w)),
        "depth": torch.rand(b, h, w) * 5 + 0.5,
    }


def test_only_trainable_parts_learn_and_backbone_is_untouched():
    bb = tiny_backbone()
    m = ViTSplit(bb, 2, [0, 1, 3], "seg", 3)
    m.train()
    assert not bb.training and m.split.training
    x = torch.randn(2, 3, 42, 42)
    before_hash = state_hash(bb)
    with torch.no_grad():
        ref = bb(x).clone()
    batch = _seg_batch(h=42, w=42)
    opt = torch.optim.AdamW(m.param_groups(1e-3), betas=(0.9, 0.999))
    loss = m.loss(batch)["loss"]
    loss.backward()
    assert all(p.grad is None for p in bb.parameters())
    no_grad = [n for n, p in m.split.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == ["fusion.unused_norm.weight", "fusion.unused_norm.bias"]
    head_w = m.split.task_head.blocks[0].attn.qkv.weight.detach().clone()
    opt.step()
    assert state_hash(bb) == before_hash
    with torch.no_grad():
        torch.testing.assert_close(bb(x), ref, rtol=0, atol=0)
    assert (m.split.task_head.blocks[0].attn.qkv.weight - head_w).abs().max() > 0
    assert m.loss(batch)["loss"].item() != pytest.approx(loss.item(), abs=1e-7)


def test_param_groups_scale_task_head_lr():
    m = ViTSplit(tiny_backbone(), 2, [0, 1], "seg", 3)
    groups = m.param_groups(3e-4, weight_decay=1e-2)
    assert [g["lr"] for g in groups] == [pytest.approx(3e-5), 3e-4]
    assert sum(p.numel() for g in groups for p in g["params"]) == count_trainable(m)
    assert sum(p.numel() for p in groups[0]["params"]) == count_trainable(m.split.task_head)
    # --pretrained-lr-scale: the task head at lr x scale, the rest unchanged; the config's default is the release's
    assert [g["lr"] for g in m.param_groups(3e-4, 1e-2, pretrained_lr_scale=1.0)] == [pytest.approx(3e-4), 3e-4]
    from vitsplit.engine import TrainConfig
    from vitsplit.engine.config import resolve_config

    assert resolve_config(TrainConfig(k_t=2, prior_layers=[0, 1])).pretrained_lr_scale == 0.1
    assert resolve_config(TrainConfig(method="vit-adapter")).pretrained_lr_scale is None
    with pytest.raises(UserError, match="does not apply to vit-adapter"):
        resolve_config(TrainConfig(method="vit-adapter", pretrained_lr_scale=1.0))
    from vitsplit.model import Baseline

    full = Baseline(tiny_backbone(), "full", "seg", 3)
    assert sorted(g["lr"] for g in full.param_groups(1e-3, pretrained_lr_scale=0.5)) == [pytest.approx(5e-4), 1e-3]


def test_seg_and_depth_shapes_and_losses():
    bb = tiny_backbone()
    batch = _seg_batch()
    seg = ViTSplit(bb, 2, [0, 1], "seg", 5).eval()
    logits = seg(batch["image"])
    assert logits.shape == (2, 5, 50, 62)
    label = batch["seg"].clone()
    label[:, :25] = 255  # top half unlabelled
    ce = seg.loss({**batch, "seg": label})["loss"]
    # mmseg 0.20's reduction: CE summed over labelled pixels / all pixels (ignored count as 0)
    ref = torch.nn.functional.cross_entropy(logits, label, ignore_index=255)  # mean over labelled
    assert ce.item() == pytest.approx(ref.item() * 0.5, rel=1e-5)
    assert seg.split.head.loss(logits, label, avg_non_ignore=True).item() == pytest.approx(ref.item(), rel=1e-5)
    ignored = seg.loss({**batch, "seg": torch.full((2, 50, 62), 255)})["loss"]
    assert ignored.item() == 0.0

    dep = ViTSplit(bb, 2, [0, 1], "depth").eval()
    d = dep(batch["image"])
    assert d.shape == (2, 1, 50, 62) and bool((d > 0).all())
    # scale-invariant log loss: with lambda -> 1 it is blind to a global scale of the prediction
    from vitsplit.model.heads import DepthHead

    gt = batch["depth"]
    log_pred = torch.log(gt * 3.0).unsqueeze(1)
    assert DepthHead.loss(log_pred, gt, variance_focus=1.0).item() < 1e-3
    assert DepthHead.loss(log_pred, gt).item() == pytest.approx(
        (1 - 0.85) ** 0.5 * abs(torch.log(torch.tensor(3.0)).item()), rel=1e-4
    )
    masked = gt.clone()
    masked[:, :10] = 0  # invalid pixels are ignored
    silog = DepthHead.loss(torch.log(masked.clamp_min(1e-3) * 3).unsqueeze(1), masked).item()
    assert silog == pytest.approx(0.15**0.5 * torch.log(torch.tensor(3.0)).item(), rel=1e-4)


def _det_batch():
    masks = torch.zeros(2, 56, 70, dtype=torch.uint8)
    masks[0, 5:40, 6:30] = 1
    masks[1, 20:50, 10:60] = 1
    return {
        "image": torch.randn(2, 3, 56, 70),
        "boxes": [torch.tensor([[6.0, 5.0, 30.0, 40.0]]), torch.tensor([[10.0, 20.0, 60.0, 50.0]])],
        "labels": [torch.tensor([1]), torch.tensor([2])],
        "masks": [masks[:1], masks[1:]],
    }


@pytest.mark.parametrize("masks", [True, False])
def test_det_train_step_and_prediction(masks):
    bb = tiny_backbone()
    m = ViTSplit(bb, 2, [0, 1], "det", 2, masks=masks)
    m.train()
    parts = m.loss(_det_batch())
    expected = {"loss", "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"} | (
        {"loss_mask"} if masks else set()
    )
    assert set(parts) == expected
    total = sum(v for k, v in parts.items() if k != "loss")
    assert parts["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    parts["loss"].backward()
    assert m.split.head.rpn.head.conv[0][0].weight.grad.abs().sum() > 0
    assert m.split.task_head.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        dets = m(torch.randn(2, 3, 56, 70))
    assert len(dets) == 2
    for d in dets:
        n = d["boxes"].shape[0]
        assert n > 0 and d["labels"].shape == (n,) and d["scores"].shape == (n,)
        assert bool((d["boxes"][:, 2] <= 70).all() and (d["boxes"][:, 3] <= 56).all() and (d["boxes"] >= 0).all())
        assert set(d["labels"].tolist()) <= {1, 2}
        assert ("masks" in d) == masks
        if masks:
            assert d["masks"].shape == (n, 1, 56, 70)


def test_fixed_stride_anchors_match_torchvision_when_strides_are_integers():
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    sizes, ratios = ((32,), (64,)), ((0.5, 1.0, 2.0),) * 2
    feats = [torch.zeros(1, 1, 16, 12), torch.zeros(1, 1, 8, 6)]
    images = ImageList(torch.zeros(1, 3, 64, 48), [(64, 48)])
    ours = FixedStrideAnchorGenerator(sizes, ratios, (4, 8))(images, feats)
    torch.testing.assert_close(ours[0], AnchorGenerator(sizes, ratios)(images, feats)[0])
    # patch 14: the 4x level has stride 3.5 (torchvision would infer 3 from 518 // 148)
    head = DetHead(64, 2, patch_size=14)
    assert head.strides == (3.5, 7.0, 14.0, 28.0, 56.0)
    assert head.roi_heads.box_roi_pool.scales == [1 / 3.5, 1 / 7, 1 / 14, 1 / 28]


def test_det_targets_and_detections_move_through_the_padding():
    head = DetHead(64, 2, patch_size=14).eval()
    fused = torch.randn(1, 64, 4, 5)
    padded, top, left = head._geometry(fused, (50, 62))  # 56 x 70 padded: 3 above, 4 left
    assert (padded, top, left) == ((56, 70), 3, 4)
    with pytest.raises(ValueError):
        head._geometry(fused, (40, 62))
    seen = {}

    def fake_roi_heads(feats, proposals, sizes, targets=None):
        seen.update(sizes=sizes, targets=targets)
        if targets is not None:
            return [], {"loss_classifier": torch.tensor(0.0)}
        boxes = torch.tensor([[14.0, 8.0, 24.0, 18.0], [0.0, 0.0, 3.0, 2.0]])  # padded frame; 2nd in padding
        return [
            {
                "boxes": boxes,
                "labels": torch.tensor([1, 2]),
                "scores": torch.tensor([0.9, 0.8]),
                "masks": torch.ones(2, 1, 28, 28),
            }
        ], {}

    head.roi_heads.forward = fake_roi_heads
    mask = torch.zeros(1, 50, 62, dtype=torch.uint8)
    mask[0, 0, 0] = 1
    head.loss(
        fused, [{"boxes": torch.tensor([[1.0, 2.0, 11.0, 12.0]]), "labels": torch.tensor([1]), "masks": mask}], (50, 62)
    )
    t = seen["targets"][0]
    assert seen["sizes"] == [(56, 70)]
    assert t["boxes"].tolist() == [[5.0, 5.0, 15.0, 15.0]]  # + (left, top)
    assert t["masks"].shape == (1, 56, 70) and t["masks"][0, 3, 4] == 1 and t["masks"].sum() == 1
    (d,) = head(fused, (50, 62))
    assert d["boxes"].tolist() == [[10.0, 5.0, 20.0, 15.0]] and d["labels"].tolist() == [1]
    assert d["masks"].shape == (1, 1, 50, 62)
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    full = paste_masks_in_image(torch.ones(1, 1, 28, 28), torch.tensor([[14.0, 8.0, 24.0, 18.0]]), (56, 70))
    torch.testing.assert_close(d["masks"], full[:, :, 3:53, 4:66])  # cropped at the padding offset
    ys, xs = torch.nonzero(d["masks"][0, 0] > 0.5, as_tuple=True)
    assert abs(ys.float().mean().item() - 10.0) < 0.6 and abs(xs.float().mean().item() - 15.0) < 0.6  # box centre


def test_deform_impls_give_the_same_model_outputs():
    bb = tiny_backbone()
    m = ViTSplit(bb, 2, [0, 1], "seg", 3).eval()
    for blk in (m.split.prior_head.deform, m.split.fusion.deform):
        torch.nn.init.normal_(blk.offset.weight, std=0.05)
    x = torch.randn(1, 3, 42, 56)
    fast = m(x)
    m.set_deform_impl("torchvision")
    torch.testing.assert_close(m(x), fast, rtol=1e-4, atol=1e-4)


def test_save_load_round_trip_and_backbone_check(tmp_path):
    bb = tiny_backbone(seed=0)
    m = ViTSplit(bb, 2, [0, 1, 1], "seg", 4).eval()
    with torch.no_grad():
        for p in m.split.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # trained-like, not the init
    x = torch.randn(1, 3, 42, 42)
    path = save_trained(m, tmp_path / "model.safetensors")
    m2 = load_trainable(path, tiny_backbone(seed=0)).eval()
    assert m2.config()["prior_layers"] == [0, 1, 1] and m2.config()["num_classes"] == 4
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)
    with pytest.raises(UserError, match="backbone weights"):
        load_trainable(path, tiny_backbone(seed=1))
    with pytest.raises(UserError, match="blocks"):
        load_trainable(path, tiny_backbone(seed=0, depth=5))
    with pytest.raises(UserError, match="does not exist"):
        load_trainable(tmp_path / "missing.safetensors", bb)


def test_fusion_inputs_are_final_normed_prior_layers_and_backbone_output_at_init():
    bb = tiny_backbone()
    m = ViTSplit(bb, 2, [3, 0], "seg", 3).eval()
    seen = {}
    m.split.prior_head.register_forward_pre_hook(lambda mod, args: seen.update(prior=args[0]))
    m.split.fusion.register_forward_pre_hook(lambda mod, args: seen.update(task=args[1]))
    x = torch.randn(2, 3, 40, 54)  # padded to 42 x 56: a 3 x 4 grid
    with torch.no_grad():
        m(x)
        feats = bb.forward_layers(x, [0, 3])
        last = bb.tokens_to_map(bb(x), (3, 4))  # the frozen model's own final output
        prior = torch.cat([bb.tokens_to_map(bb.final_norm(feats[i]), (3, 4)) for i in (3, 0)], dim=1)
    assert seen["prior"].shape == (2, 128, 3, 4)
    torch.testing.assert_close(seen["prior"], prior, rtol=0, atol=0)  # in the listed order, normed
    torch.testing.assert_close(seen["task"], last, rtol=1e-5, atol=1e-5)  # task head == blocks 2-3 at init


def test_one_prior_layer_is_b_and_the_recommendation_uses_the_same_rule():
    """K_p = 1 divides by zero in the release's formula; every sample starts at b (its i = 0 term),
    so one layer is [b], for any depth and b. recommend_split imports this one rule."""
    import cka_split.decision.recommend as rec

    for L, b in ((12, 2), (24, 0), (40, 27), (4, 3)):
        assert prior_layers_uniform(L, 1, b) == [b] and prior_layers_uniform(L, 3, b)[0] == b
    assert rec.prior_layers_uniform is prior_layers_uniform
    with pytest.raises(UserError, match="cannot place 0 prior layers"):
        prior_layers_uniform(12, 0, 2)


def test_trained_run_refuses_a_different_backbone(tmp_path):
    """load_trained rebuilds the backbone from the run's model and weights and checks the recorded
    hash: weights that changed since training are refused, not silently used."""
    from safetensors.torch import save_file

    from vitsplit.engine import TrainConfig, train
    from vitsplit.model import load_trained

    weights = tmp_path / "backbone.safetensors"
    save_file(build_backbone("demo-vit", "random", seed=0).vit.state_dict(), str(weights))
    out = tmp_path / "run"
    train(
        TrainConfig(
            model="demo-vit",
            weights=str(weights),
            data="synthetic:size=28,classes=2",
            crop=28,
            iters=1,
            batch_size=1,
            k_t=1,
            prior_layers=[11],
            lr=1e-3,
            evaluate=False,
            out=str(out),
            device="cpu",
        )
    )
    model, cfg = load_trained(out)
    assert cfg["weights"] == str(weights) and model.k_t == 1
    save_file(build_backbone("demo-vit", "random", seed=1).vit.state_dict(), str(weights))  # replaced since
    with pytest.raises(UserError, match="backbone weights"):
        load_trained(out)
