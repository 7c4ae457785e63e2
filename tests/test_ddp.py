"""torchrun: two CPU processes (gloo) train one tiny run; only rank 0 writes, and it writes once."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    # the README's form: torchrun --nproc_per_node N "$(command -v cka-split)" train ...
    script = shutil.which("cka-split", path=str(Path(sys.executable).parent))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script]
    cmd = launch + [
        "train",
        "--model",
        "demo-vit",
        "--weights",
        "random",
        "--data",
        "synthetic:size=28,classes=2",
        "--crop",
        "28",
        "--iters",
        "4",
        "--batch-size",
        "4",
        "--k-t",
        "2",
        "--prior-layers",
        "2,6,11",
        "--checkpoint-every",
        "2",
        "--log-every",
        "1",
        "--val-length",
        "4",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)  # run from outside the checkout: only the installed package counts
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    conf = json.loads((out / "config.json").read_text())
    assert conf["world_size"] == 2 and conf["k_t"] == 2 and conf["prior_layers"] == [2, 6, 11]
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in lines] == [1, 2, 3, 4]  # one line per step: rank 1 wrote nothing
    assert (out / "model.safetensors").is_file() and (out / "last.pt").is_file()
    assert json.loads((out / "eval.json").read_text())["iters"] == 4
    # no stray temporary files from two writers racing
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "eval.json",
        "last.pt",
        "metrics.jsonl",
        "model.safetensors",
    ]
    assert "final metrics" in r.stderr and r.stderr.count("final metrics") == 1

    # Gradient averaging: rank r takes micro-batch r of each global batch, exactly as one process
    # with 2 accumulation steps does (BatchNorm sees the same 2-image micro-batches in both), so
    # the trained weights and logged losses agree up to float summation order. BN running
    # statistics differ (one update per rank vs two sequential ones) and are not compared.
    single = (
        [sys.executable, "-m", "cka_split.cli"]
        + cmd[len(launch) : -2]
        + ["--grad-accum", "2", "--out", str(tmp_path / "one")]
    )
    r1 = subprocess.run(single, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "one" / "model.safetensors"))
    compared = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    for k in compared:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    one = [json.loads(s)["loss"] for s in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in lines] == pytest.approx(one, rel=1e-4)
    assert len(compared) > 20
