"""The trainer: schedule, data order, config/outputs, baselines' interface, auto-split, learning."""

import json
import math
import types

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vitsplit.backbones import Backbone, state_hash
from vitsplit.data import build_dataset
from vitsplit.engine import (
    StepBatches,
    TrainConfig,
    epoch_permutation,
    finetune_backbone,
    split_from_recommendation,
    train,
)
from vitsplit.engine.config import default_lr, finish_config, resolve_config
from vitsplit.engine.schedule import PolyWarmup, default_warmup, lr_factor
from vitsplit.errors import UserError
from vitsplit.evaluation import evaluate_model
from vitsplit.model import Baseline, default_split, load_trainable

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_backbone(dim: int = 32, depth: int = 4) -> Backbone:
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=dim, depth=depth, num_heads=2, num_classes=0, dynamic_img_size=True
    )
    return Backbone(vit, name="tiny", weights_source="random (seed 0)").eval()


def test_schedule_is_mmcv_poly_with_linear_warmup():
    # step 0 starts at the warm-up ratio; at the end of warm-up the factor is the bare poly value
    assert lr_factor(0, 100, 10) == pytest.approx(1e-6)
    assert lr_factor(5, 100, 10) == pytest.approx((1 - 0.05) ** 0.9 * (1 - 0.5 * (1 - 1e-6)))
    assert lr_factor(10, 100, 10) == pytest.approx(0.9**0.9)
    assert lr_factor(99, 100, 10) == pytest.approx(0.01**0.9)
    assert lr_factor(0, 100, 0) == 1.0
    assert default_warmup(40000) == 1500 and default_warmup(300) == 30 and default_warmup(5) == 0
    opt = torch.optim.AdamW(
        [
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0},
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1},
        ]
    )
    s = PolyWarmup(iters=100, warmup=0)
    s.step_index = 50
    s.apply(opt)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5**0.9, 0.1 * 0.5**0.9])  # x0.1 kept


def test_data_order_is_a_function_of_seed_and_step():
    a = StepBatches(n=5, seed=1, batch_size=4, grad_accum=1, rank=0, world=1, start=0, iters=5)
    b = StepBatches(n=5, seed=1, batch_size=4, grad_accum=1, rank=0, world=1, start=3, iters=5)
    assert list(a)[3:] == list(b)  # starting at step 3 gives the same batches
    # every epoch (5 consecutive positions) is a permutation of the 5 items, and epochs differ
    flat = [i for batch in a for i in batch]
    for e in range(4):
        assert sorted(i for i, ep in flat[5 * e : 5 * e + 5]) == list(range(5)) and {
            ep for _, ep in flat[5 * e : 5 * e + 5]
        } == {e}
    assert not torch.equal(epoch_permutation(1, 0, 50), epoch_permutation(1, 1, 50))
    assert not torch.equal(epoch_permutation(1, 0, 50), epoch_permutation(2, 0, 50))
    # two ranks x two accumulation steps see exactly the global batch, each image once
    parts = [list(StepBatches(10, 0, 8, 2, r, 2, 0, 1)) for r in range(2)]
    assert sorted(i for p in parts for mb in p for i in mb) == sorted(
        a.__class__(10, 0, 8, 1, 0, 1, 0, 1).step_items(0)
    )


def test_default_split_matches_published_table():
    assert default_split(12)[:2] == (3, [2, 5, 8, 11])
    assert default_split(24)[:2] == (4, [2, 5, 8, 11, 14, 17, 20, 23])
    assert default_split(40)[1][:3] == [27, 27, 28] and default_split(40)[0] == 8
    assert default_split(4)[:2] == (1, [0, 1, 2, 3])


def test_split_from_recommendation_symlink_and_text_pointer(tmp_path):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    rec = {
        "model": "dinov2_vitb14",
        "num_layers": 12,
        "per_task": {"seg": {"k_t": 4, "prior_layers": [1, 4, 7], "task_head_layers": [8, 9, 10, 11]}},
    }
    (run / "recommendation.json").write_text(json.dumps(rec))
    (run / "config.json").write_text(json.dumps({"weights": "random"}))
    (tmp_path / "runs" / "latest").symlink_to(run)
    k_t, prior, model, weights, source = split_from_recommendation(tmp_path / "runs" / "latest", "seg")
    assert (k_t, prior, model, weights) == (4, [1, 4, 7], "dinov2_vitb14", "random")
    assert source == str((run / "recommendation.json").resolve())
    (tmp_path / "pointer").write_text(str(run) + "\n")
    assert split_from_recommendation(tmp_path / "pointer", "seg")[0] == 4
    with pytest.raises(UserError, match="no recommendation for task 'det'"):
        split_from_recommendation(run, "det")
    with pytest.raises(UserError, match="does not exist"):
        split_from_recommendation(tmp_path / "nowhere", "seg")


@pytest.mark.parametrize("method", ["linear", "full", "lora"])
def test_baselines_train_what_they_should(method):
    bb = tiny_backbone()
    before = state_hash(bb)
    m = Baseline(bb, method, "seg", 3)
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 3, 32, 32)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    head = {n for n in trainable if n.startswith("head.")}
    assert head == {"head.bn.weight", "head.bn.bias", "head.cls.weight", "head.cls.bias"}
    rest = trainable - head
    if method == "linear":
        assert rest == set()
    elif method == "full":
        assert rest == {n for n, _ in m.named_parameters() if n.startswith("backbone.")}
    else:  # LoRA A/B on qkv, proj, fc1, fc2 of each of the 4 blocks, nothing else
        assert rest and all("lora_" in n for n in rest) and len(rest) == 4 * 4 * 2
        assert not any("patch_embed" in n for n in rest)
    loss = m.loss({"image": x, "seg": torch.randint(0, 3, (2, 32, 32))})["loss"]
    loss.backward()
    groups = m.param_groups(1e-3, 1e-2)
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    assert set(m.trainable_state_dict()) >= {"head.bn.running_mean", "head.cls.weight"}
    if method == "linear":
        assert all(p.grad is None for p in bb.parameters()) and state_hash(bb) == before


def test_finetune_backbone_returns_a_changed_copy_and_leaves_the_input():
    bb = tiny_backbone()
    before = state_hash(bb)
    tuned = finetune_backbone(bb, "seg", "synthetic:size=32,classes=2", 3, batch_size=2, crop=32, lr=1e-3, device="cpu")
    assert state_hash(bb) == before and tuned is not bb
    assert state_hash(tuned) != before
    assert isinstance(tuned, Backbone) and not any(p.requires_grad for p in tuned.parameters())
    assert "fine-tune on seg" in tuned.weights_source and not tuned.training


def test_finetune_backbone_on_step_sees_the_copy_and_can_stop_early():
    from cka_split.probes.autostop import StabilityStop, stability_callback

    bb = tiny_backbone()
    seen = []

    def on_step(step, copy):
        seen.append((step, copy.training, state_hash(copy)))
        return step == 2

    tuned = finetune_backbone(
        bb, "seg", "synthetic:size=32,classes=2", 5, batch_size=2, crop=32, lr=1e-3, device="cpu", on_step=on_step
    )
    assert [s for s, _, _ in seen] == [1, 2] and all(training for _, training, _ in seen)
    assert seen[0][2] != seen[1][2] and state_hash(tuned) == seen[1][2]  # stopped after step 2's update
    assert "2 of 5 steps" in tuned.weights_source
    # the auto callback through the CKA engine: every 2 steps, stops once K_t is unchanged for 1 check
    stop = StabilityStop(every=2, patience=1)
    probes = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    auto = stability_callback(bb, "seg", probes, stop, num_layers=len(bb.vit.blocks))
    finetune_backbone(
        bb, "seg", "synthetic:size=32,classes=2", 12, batch_size=2, crop=32, lr=1e-3, device="cpu", on_step=auto
    )
    steps = [s for s, _ in stop.trajectory]
    assert steps == list(range(2, 2 * len(steps) + 1, 2)) and len(steps) >= 2
    assert stop.stopped_at is None or (
        stop.stopped_at == steps[-1] and stop.trajectory[-1][1] == stop.trajectory[-2][1]
    )


def test_train_writes_outputs_and_records_the_split(tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(
        task="seg",
        method="vitsplit",
        data="synthetic:size=32,classes=2",
        iters=4,
        batch_size=2,
        crop=32,
        k_t=1,
        prior_layers=[0, 2],
        lr=1e-3,
        checkpoint_every=2,
        log_every=2,
        val_length=2,
        out=str(out),
    )
    result = train(cfg, backbone=tiny_backbone())
    for name in ("config.json", "metrics.jsonl", "last.pt", "model.safetensors", "eval.json"):
        assert (out / name).is_file(), name
    conf = json.loads((out / "config.json").read_text())
    assert (conf["k_t"], conf["prior_layers"], conf["split_source"]) == (1, [0, 2], "explicit (--k-t/--prior-layers)")
    assert conf["weights_source"] == "random (seed 0)" and conf["seed"] == 0 and "torch" in conf["versions"]
    assert conf["warmup_iters"] == 0 and conf["weight_decay"] == 1e-2
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines] == [2, 4]
    assert all({"loss", "lr", "it_s", "time"} <= r.keys() for r in lines)
    # lr logged is the base group's lr at that step: poly, no warm-up: 1e-3 * (1 - 1/4) ** 0.9 at step index 1
    assert lines[0]["lr"] == pytest.approx(1e-3 * (1 - 1 / 4) ** 0.9)
    assert json.loads((out / "eval.json").read_text())["mIoU"] == pytest.approx(result["mIoU"])
    # eval.json is the saved model's score: rebuilt from model.safetensors on the same backbone and
    # evaluated again, it gives the same per-class IoUs, and mIoU is their mean over present classes
    again = evaluate_model(
        load_trainable(out / "model.safetensors", tiny_backbone()),
        build_dataset(cfg.data, "val", task="seg", crop=32, augment=False, length=2, seed=0),
        "seg",
        crop=32,
    )
    assert again["IoU"] == result["IoU"] and len(result["IoU"]) == 3
    present = [v for v in result["IoU"] if v is not None]
    assert result["mIoU"] == pytest.approx(sum(present) / len(present))


def test_train_rejects_bad_options(tmp_path):
    with pytest.raises(UserError, match="unknown method"):
        train(TrainConfig(method="adapter", out=str(tmp_path)))
    with pytest.raises(UserError, match="not divisible"):
        train(TrainConfig(batch_size=3, grad_accum=2, out=str(tmp_path)))
    with pytest.raises(UserError, match="impossible"):
        train(
            TrainConfig(
                k_t=9,
                prior_layers=[0],
                data="synthetic:size=32",
                crop=32,
                iters=1,
                batch_size=1,
                out=str(tmp_path / "x"),
            ),
            backbone=tiny_backbone(),
        )


def learn_backbone() -> Backbone:
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=48, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=0, dynamic_img_size=True
    )
    return Backbone(vit, name="tiny-p4", weights_source="random (seed 0)").eval()


@pytest.mark.slow
def test_vitsplit_learns_synthetic_segmentation(tmp_path):
    """ViT-Split (K_t 2, prior layers 0-3) on a 4-block, width-32, patch-4 random-weight ViT, 48 px
    synthetic scenes with 2 object classes (3 seg classes), 300 steps of batch 4 (~35 s on one
    shared core).

    Chance, computed below from the validation labels: the best constant predictor labels every
    pixel background, giving IoU_bg = background fraction (~0.82 here) and 0 for both objects, so
    mIoU ~ 27; a uniform random guess scores lower still (every IoU <= 1/3). Measured with this
    seed: mIoU ~ 47 (background ~ 93, objects ~ 43 and ~ 6: the random-weight backbone separates
    objects from background far better than it separates the two object classes). The test asks
    for 10 points above chance, background IoU above 85 and a mean object IoU above 15.
    """
    data = "synthetic:size=48,classes=2,objects=6"
    val = build_dataset(data, "val", task="seg", crop=48, length=32)
    bg = float(torch.stack([val[i]["seg"] for i in range(len(val))]).eq(0).double().mean())
    chance = 100 * bg / 3
    cfg = TrainConfig(
        task="seg",
        method="vitsplit",
        data=data,
        iters=300,
        batch_size=4,
        crop=48,
        lr=3e-3,
        k_t=2,
        prior_layers=[0, 1, 2, 3],
        seed=0,
        log_every=50,
        checkpoint_every=1000,
        val_length=32,
        out=str(tmp_path / "run"),
    )
    result = train(cfg, backbone=learn_backbone())
    assert 20.0 < chance < 35.0
    assert result["mIoU"] > chance + 10.0, (result, chance)
    assert result["IoU"][0] > 85.0 and (result["IoU"][1] + result["IoU"][2]) / 2 > 15.0, result["IoU"]
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["loss"] < lines[0]["loss"]  # step 300 vs step 50
    assert not math.isnan(result["aAcc"])


def test_cli_train_auto_split_then_evaluate(tmp_path, capsys):
    """`cka-split train --auto-split RUN` takes model, weights, K_t and prior layers from the
    recommendation (an explicit option overrides and is recorded); `cka-split evaluate` rebuilds
    the model from OUT and reproduces eval.json."""
    from cka_split.cli.app import main

    run = tmp_path / "analysis"
    run.mkdir()
    rec = {
        "model": "demo-vit",
        "weights": "random",
        "num_layers": 12,
        "per_task": {"seg": {"k_t": 2, "prior_layers": [3, 7, 11]}},
    }
    (run / "recommendation.json").write_text(json.dumps(rec))
    out = tmp_path / "train"
    args = [
        "train",
        "--auto-split",
        str(run),
        "--prior-layers",
        "4,8",
        "--data",
        "synthetic:size=28,classes=2",
        "--crop",
        "28",
        "--iters",
        "2",
        "--batch-size",
        "2",
        "--val-length",
        "3",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0, capsys.readouterr().err
    conf = json.loads((out / "config.json").read_text())
    assert (conf["model"], conf["weights"], conf["k_t"], conf["prior_layers"]) == ("demo-vit", "random", 2, [4, 8])
    assert conf["split_source"].startswith(f"recommendation {(run / 'recommendation.json').resolve()}")
    assert "overridden: prior_layers" in conf["split_source"]
    saved = json.loads((out / "eval.json").read_text())
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(out), "--device", "cpu"])
    assert e.value.code == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shown["mIoU"] == pytest.approx(saved["mIoU"]) and shown["num_images"] == 3
    with pytest.raises(SystemExit) as e:  # a user error: one line, exit 2
        main(["evaluate", str(tmp_path / "missing")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_auto_split_latest_is_found_in_the_runs_folder_not_the_working_directory(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    run = runs / "20250101-000000"
    run.mkdir(parents=True)
    (run / "recommendation.json").write_text(
        json.dumps({"model": "demo-vit", "weights": "random", "per_task": {"seg": {"k_t": 5, "prior_layers": [1, 6]}}})
    )
    (runs / "latest").symlink_to(run.name)
    monkeypatch.chdir(tmp_path / "runs" / "20250101-000000")  # anywhere but the folder holding runs/
    cfg = resolve_config(TrainConfig(auto_split="latest", out=str(runs / "train")))
    assert (cfg.k_t, cfg.prior_layers, cfg.model) == (5, [1, 6], "demo-vit")


@pytest.mark.parametrize(
    "dim,task,lr", [(32, "seg", 3e-4), (384, "seg", 3e-4), (768, "depth", 2e-4), (32, "det", 1e-4)]
)
def test_default_learning_rate_follows_the_backbone_width_not_its_name(dim, task, lr):
    """A ViT-S-width (or narrower) backbone takes ViT-S's published 3e-4 whatever it is called."""
    bb = types.SimpleNamespace(embed_dim=dim, num_layers=4, name="my-own-vit")
    cfg = resolve_config(TrainConfig(task=task, method="linear", model="my-own-vit"))
    assert cfg.lr is None
    finish_config(cfg, bb)
    assert cfg.lr == lr == default_lr(task, bb)


def test_depth_head_starts_at_the_training_data_mean_log_depth(tmp_path):
    """A fresh depth run sets the head's output bias to the mean log-depth of the first training scenes
    (a bias of 0 would start every prediction at 1 m); a resumed run keeps its checkpoint's."""
    import numpy as np
    from safetensors.torch import load_file

    from vitsplit.data.dataset import DEPTH_PRIOR_ITEMS
    from vitsplit.model.heads import DepthHead

    data = "synthetic:size=32,classes=2"
    ds = build_dataset(data, "train", task="depth", crop=32, length=100, seed=0)
    direct = [np.log(np.asarray(ds.source.load(i)["depth"], dtype=np.float64)) for i in range(DEPTH_PRIOR_ITEMS)]
    expected = float(np.concatenate([v.ravel() for v in direct]).mean())
    assert ds.mean_log_depth() == pytest.approx(expected, rel=1e-12) and 1.0 < expected < np.log(14.5)
    head = DepthHead(32)
    head.start_at(expected)
    assert torch.all(head.out.bias == torch.tensor(expected, dtype=torch.float32))
    # through train(): with a vanishing lr the saved bias is still the data's mean log-depth
    cfg = TrainConfig(
        task="depth",
        method="vitsplit",
        data=data,
        iters=2,
        batch_size=2,
        crop=32,
        k_t=1,
        prior_layers=[0, 2],
        lr=1e-12,
        checkpoint_every=2,
        log_every=1,
        val_length=2,
        train_length=100,
        out=str(tmp_path / "run"),
    )
    train(cfg, backbone=tiny_backbone())
    state = load_file(str(tmp_path / "run" / "model.safetensors"))
    bias = [v for k, v in state.items() if k.endswith("head.out.bias")]
    assert len(bias) == 1 and float(bias[0]) == pytest.approx(expected, abs=1e-6)
