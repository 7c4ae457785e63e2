"""cka-split sweep: K_t lists, one training run per point, resume of a stopped sweep, sweep.json."""

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from cka_split.cli.app import main as cli_main
from safetensors.torch import load_file
from tiny_vits import plain_tiny_backbone as tiny_backbone

from vitsplit.engine import TrainConfig, train
from vitsplit.errors import UserError
from vitsplit.sweep.grid import (
    SweepConfig,
    SweepPoint,
    parse_k_t,
    pooled_sd,
    resolve_sweep,
    run_sweep,
    stats,
    summarize,
)

MEASURED_POINT = ("step_time_s", "peak_memory_mb")


pytestmark = pytest.mark.usefixtures("one_thread")  # float reductions split the same way in every run


def base(**kw) -> TrainConfig:
    # 7 steps with a checkpoint every 3: a point stopped at step 5 resumes from step 3
    cfg = dict(
        task="seg",
        data="synthetic:size=32,classes=3",
        iters=7,
        batch_size=2,
        crop=32,
        lr=1e-3,
        seed=0,
        checkpoint_every=3,
        log_every=1,
        train_length=6,
        val_length=2,
        warmup_iters=2,
    )
    cfg.update(kw)
    return TrainConfig(**cfg)


def sweep(out, k_t=(1, 2), methods=("vitsplit", "linear"), **kw) -> SweepConfig:
    return SweepConfig(base=base(**kw), k_t=list(k_t), seeds=1, methods=list(methods), out=str(out))


def weights_hash(path: Path) -> str:
    h = hashlib.sha256()
    for k, v in sorted(load_file(str(path / "model.safetensors")).items()):
        h.update(k.encode() + str(v.dtype).encode() + v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def without_measured(d: dict) -> dict:
    d = dict(d)
    d["points"] = [{k: v for k, v in p.items() if k not in MEASURED_POINT} for p in d["points"]]
    return d


@pytest.mark.parametrize(
    "spec,want", [("1-3", [1, 2, 3]), ("3,1,2,2", [1, 2, 3]), ("1,3-4", [1, 3, 4]), ("all", [1, 2, 3, 4])]
)
def test_parse_k_t(spec, want):
    assert parse_k_t(spec, 5) == want


@pytest.mark.parametrize("spec", ["0", "5", "1-5", "", ",", "a", "3-1", "1.5"])
def test_parse_k_t_rejects(spec):
    with pytest.raises(UserError, match="--k-t takes K_t values from 1 to 4"):
        parse_k_t(spec, 5)


def test_cli_rejects_bad_k_t_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["sweep", "--k-t", "0,3", "--model", "dinov2_vits14", "--weights", "random"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "'0,3' includes 0" in err


def test_summary_stats_and_best():
    pts = [
        {"method": "vitsplit", "k_t": k, "prior_layers": [0, 1], "metric": m}
        for k, m in [(1, 10.0), (1, 12.0), (2, 20.0), (2, 22.0), (3, 20.0), (3, 22.0)]
    ]
    pts.append({"method": "linear", "k_t": None, "prior_layers": None, "metric": 5.0})
    s = summarize(pts)
    assert s["summary"]["2"] == {"mean": 21.0, "sd": pytest.approx(math.sqrt(2)), "n": 2}
    assert s["best_k_t"] == 2  # 2 and 3 tie: the smaller (cheaper) K_t
    assert s["pooled_sd"] == pytest.approx(math.sqrt(2))
    assert s["baselines"]["linear"] == {"mean": 5.0, "sd": None, "n": 1}
    assert summarize(pts, higher_is_better=False)["best_k_t"] == 1
    assert pooled_sd([stats([1.0, 3.0]), stats([0.0, 0.0, 6.0]), stats([7.0])]) == pytest.approx(
        math.sqrt((2 + 24) / 3)
    )


def test_head_applies_to_the_baselines_that_take_it():
    """--head upernet: full/lora/vit-adapter points get UperNet, ViT-Split and the linear probe keep
    their linear heads, and the baselines are named by method and head."""
    b = base(head="upernet")
    heads = {
        m: SweepPoint(m, 0, k_t=1 if m == "vitsplit" else None).config(b, Path("sw")).head
        for m in ("vitsplit", "linear", "full", "lora", "vit-adapter", "vit-comer")
    }
    assert heads == {
        "vitsplit": "linear",
        "linear": "linear",
        "full": "upernet",
        "lora": "upernet",
        "vit-adapter": "upernet",
        "vit-comer": "upernet",
    }
    cfg, _, _ = resolve_sweep(
        SweepConfig(base=b, k_t=[1], methods=["vitsplit", "vit-adapter", "vit-comer"], out="sw"), tiny_backbone()
    )
    assert cfg.base.head == "upernet" and cfg.base.method == "vitsplit"
    pts = [
        {"method": "full", "head": "upernet", "metric": 3.0},
        {"method": "full", "head": "upernet", "metric": 5.0},
        {"method": "linear", "head": "linear", "metric": 1.0},
    ]
    assert summarize(pts)["baselines"] == {
        "full + upernet": {"mean": 4.0, "sd": pytest.approx(math.sqrt(2)), "n": 2},
        "linear": {"mean": 1.0, "sd": None, "n": 1},
    }
    with pytest.raises(UserError, match="segmentation"):  # a head or method the task cannot take fails before training
        resolve_sweep(
            SweepConfig(base=base(task="depth", head="upernet"), k_t=[1], methods=["vitsplit", "full"], out="sw"),
            tiny_backbone(),
        )


@pytest.mark.slow
def test_stopped_sweep_resumes_skips_finished_points_and_matches_an_uninterrupted_one(tmp_path):
    bb = tiny_backbone()
    straight = run_sweep(sweep(tmp_path / "a"), backbone=bb)
    assert straight["ran"] == {"kt01-s0": "new", "kt02-s0": "new", "linear-s0": "new"} and not straight["stopped"]
    # b: the first point, then the sweep stopped inside the second point (after its checkpoint at step 3)
    run_sweep(sweep(tmp_path / "b", k_t=[1], methods=["vitsplit"]), backbone=bb)
    first = (tmp_path / "b" / "kt01-s0" / "eval.json").stat().st_mtime_ns
    stopped = run_sweep(sweep(tmp_path / "b", max_steps_this_run=5), backbone=bb)
    assert stopped["stopped"] and stopped["ran"] == {"kt01-s0": "done", "kt02-s0": "new"}
    saved = json.loads((tmp_path / "b" / "sweep.json").read_text())
    assert [p["name"] for p in saved["points"]] == ["kt01-s0"] and saved["pending"] == ["kt02-s0", "linear-s0"]
    resumed = run_sweep(sweep(tmp_path / "b"), backbone=bb)
    assert resumed["ran"] == {"kt01-s0": "done", "kt02-s0": "resume", "linear-s0": "new"}
    assert (tmp_path / "b" / "kt01-s0" / "eval.json").stat().st_mtime_ns == first  # not trained again
    a, b = (json.loads((tmp_path / d / "sweep.json").read_text()) for d in "ab")
    assert without_measured(a) == without_measured(b)
    assert len({p["metric"] for p in a["points"]}) == 3  # the points differ, so the equality says something
    assert [p["k_t"] for p in a["points"]] == [1, 2, None] and a["summary"]["1"]["n"] == 1
    assert a["points"][0]["trainable_params"] < a["points"][1]["trainable_params"]
    for p in a["points"]:
        assert p["step_time_s"] > 0 and p["peak_memory_mb"] > 0
    # a sweep point is a plain training run: `train` with the same options gives the same metric and weights
    plain = train(base(method="vitsplit", k_t=2, out=str(tmp_path / "plain")), backbone=bb)
    assert plain["mIoU"] == a["points"][1]["metric"]
    assert weights_hash(tmp_path / "plain") == weights_hash(tmp_path / "a" / "kt02-s0")
    assert weights_hash(tmp_path / "plain") != weights_hash(tmp_path / "a" / "kt01-s0")
    # the same sweep with another option refuses to reuse the finished points
    with pytest.raises(UserError, match="holds a finished run with other options"):
        run_sweep(sweep(tmp_path / "a", iters=8), backbone=bb)


@pytest.mark.slow
def test_seeds_and_prior_layer_choices_name_and_group_the_points(tmp_path):
    bb = tiny_backbone()
    cfg = SweepConfig(
        base=base(iters=2, checkpoint_every=2),
        k_t="1",
        seeds=2,
        prior_layers=[[0, 3], [1, 2]],
        methods=["vitsplit"],
        out=str(tmp_path),
    )
    res = run_sweep(cfg, backbone=bb)
    assert [p["name"] for p in res["points"]] == ["kt01-p0.3-s0", "kt01-p1.2-s0", "kt01-p0.3-s1", "kt01-p1.2-s1"]
    assert set(res["summary"]) == {"1@0,3", "1@1,2"} and all(s["n"] == 2 for s in res["summary"].values())
    assert json.loads((Path(tmp_path) / "kt01-p1.2-s1" / "config.json").read_text())["seed"] == 1


@pytest.mark.slow
def test_torchrun_sweep_trains_each_point_with_ddp_and_writes_once(tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    out = tmp_path / "sweep"
    script = shutil.which("cka-split", path=str(Path(sys.executable).parent))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        script,
        "sweep",
        "--k-t",
        "1,2",
        "--model",
        "demo-vit",
        "--weights",
        "random",
        "--data",
        "synthetic:size=28,classes=2",
        "--crop",
        "28",
        "--iters",
        "2",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "2",
        "--log-every",
        "1",
        "--val-length",
        "2",
        "--train-length",
        "8",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads((out / "sweep.json").read_text())
    assert [p["name"] for p in d["points"]] == ["kt01-s0", "kt02-s0"] and d["pending"] == []
    for p in d["points"]:
        assert json.loads((out / p["run"] / "config.json").read_text())["world_size"] == 2
        assert [json.loads(s)["iter"] for s in (out / p["run"] / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(x.name for x in out.iterdir()) == ["kt01-s0", "kt02-s0", "sweep.json"]  # no stray temporary files
    assert r.stdout.count("wrote ") == 1  # rank 0 alone prints


def test_auto_split_links_the_analysis_and_takes_its_prior_layers(tmp_path):
    from vitsplit.sweep.grid import resolve_sweep

    run = tmp_path / "runs" / "analysis"
    run.mkdir(parents=True)
    rec = {
        "model": "tiny",
        "weights": "random",
        "num_layers": 4,
        "per_task": {"seg": {"k_t": 2, "prior_layers": [1, 3], "rgn": {"k_t": 1}}},
    }
    (run / "recommendation.json").write_text(json.dumps(rec))
    cfg = SweepConfig(base=base(auto_split=str(run)), k_t="all", out=str(tmp_path / "runs" / "sweep"))
    resolved, L, link = resolve_sweep(cfg, backbone=tiny_backbone())
    assert (L, resolved.k_t, resolved.base.prior_layers) == (4, [1, 2, 3], [1, 3])
    assert link == {"analysis": str(run.resolve()), "picks": {"cka": 2, "rgn": 1}}
    assert resolved.base.auto_split is None  # the points are plain runs with explicit options
    assert [p.name for p in resolved.plan()] == ["kt01-s0", "kt02-s0", "kt03-s0"]
    assert [p.config(resolved.base, tmp_path).prior_layers for p in resolved.plan()] == [[1, 3]] * 3
    only_link = resolve_sweep(
        SweepConfig(base=base(), k_t=[1], analysis=str(run), out=str(tmp_path / "s2")), backbone=tiny_backbone()
    )
    assert only_link[0].base.prior_layers is None and only_link[2]["picks"] == {"cka": 2, "rgn": 1}
    with pytest.raises(UserError, match="K_t 4 is outside 1..3"):
        resolve_sweep(SweepConfig(base=base(), k_t=[4], out=str(tmp_path / "s3")), backbone=tiny_backbone())


def test_pretrained_lr_scale_reaches_the_points_and_vit_adapter_refuses_it():
    from vitsplit.engine.config import with_implicit_options

    base = TrainConfig(pretrained_lr_scale=0.5)
    assert SweepPoint("vitsplit", 0, 3).config(base, Path("/tmp/x")).pretrained_lr_scale == 0.5
    assert SweepPoint("full", 0).config(base, Path("/tmp/x")).pretrained_lr_scale == 0.5
    assert SweepPoint("vit-adapter", 0).config(base, Path("/tmp/x")).pretrained_lr_scale is None
    with pytest.raises(UserError, match="does not apply to vit-adapter"):
        resolve_sweep(SweepConfig(base=base, k_t=[1], methods=["vitsplit", "vit-adapter"], out="/tmp/x"))
    # a run saved before the option existed trained at the release's 0.1 (vit-adapter: no scale)
    assert with_implicit_options({"method": "full"})["pretrained_lr_scale"] == 0.1
    assert with_implicit_options({"method": "vit-adapter"})["pretrained_lr_scale"] is None
    assert with_implicit_options({"method": "full", "pretrained_lr_scale": 1.0})["pretrained_lr_scale"] == 1.0
