"""--resume exactness: a run stopped (or SIGKILLed) after its checkpoint and resumed ends with
exactly the weights, and logs exactly the losses, of a run never interrupted (same seed, CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_vits import plain_tiny_backbone as tiny_backbone

from vitsplit.engine import TrainConfig, train
from vitsplit.engine.train import MEASURED
from vitsplit.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # float reductions split the same way in every run


def cfg(out, **kw) -> TrainConfig:
    # 5 training scenes and 8 steps of 2 images: the data order crosses three epoch boundaries;
    # grad_accum 2 exercises accumulation; warm-up 2 steps so the schedule changes during the run.
    base = dict(
        task="seg",
        method="vitsplit",
        data="synthetic:size=32,classes=3",
        iters=8,
        batch_size=2,
        grad_accum=2,
        crop=32,
        lr=1e-3,
        k_t=2,
        prior_layers=[0, 1, 2],
        seed=3,
        checkpoint_every=3,
        log_every=1,
        train_length=5,
        val_length=2,
        out=str(out),
        warmup_iters=2,
    )
    base.update(kw)
    return TrainConfig(**base)


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "model.safetensors"))


def losses(out) -> list[tuple[int, float]]:
    return [
        (r["iter"], r["loss"], r["lr"]) for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
    ]


def assert_same(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert losses(a) == losses(b)


@pytest.mark.parametrize(
    "method,task,head",
    [
        ("vitsplit", "seg", "linear"),
        ("vitsplit", "depth", "linear"),
        ("full", "seg", "linear"),
        ("lora", "seg", "linear"),
        ("vit-adapter", "seg", "linear"),
        ("vit-comer", "seg", "linear"),
    ],
)
def test_stop_after_checkpoint_then_resume_is_bit_identical(tmp_path, method, task, head):
    bb = tiny_backbone()
    kw = (
        dict(method=method, task=task)
        if method == "vitsplit"
        else dict(method=method, task=task, k_t=None, prior_layers=None)
    )
    kw["head"] = head
    if method in ("vit-adapter", "vit-comer"):  # at crop 32 its 1/32 level is 1x1: BatchNorm needs micro-batches of 2
        kw["grad_accum"] = 1
    straight = train(cfg(tmp_path / "a", **kw), backbone=bb)
    # stop at step 5: the checkpoint is at step 3, so steps 4-5 are lost work that resume redoes
    assert train(cfg(tmp_path / "b", max_steps_this_run=5, **kw), backbone=bb) == {"stopped_at": 5}
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=False)["step"] == 3
    assert len(losses(tmp_path / "b")) == 5  # logged past the checkpoint ...
    resumed = train(cfg(tmp_path / "b", resume=True, **kw), backbone=bb)
    assert_same(tmp_path / "a", tmp_path / "b")  # ... and trimmed back on resume
    assert {k: v for k, v in resumed.items() if k not in MEASURED} == {
        k: v for k, v in straight.items() if k not in MEASURED
    }
    assert set(MEASURED) <= set(resumed)  # step time and peak memory are recorded
    # the weights did move (so equality above is not trivial): a run with a 100x smaller lr differs
    train(cfg(tmp_path / "c", lr=1e-5, **kw), backbone=bb)
    moved = [k for k, v in weights(tmp_path / "a").items() if not torch.equal(v, weights(tmp_path / "c")[k])]
    assert len(moved) > 4


def test_resume_refuses_changed_options_and_missing_checkpoint(tmp_path):
    bb = tiny_backbone()
    train(cfg(tmp_path / "a", iters=4, max_steps_this_run=3), backbone=bb)
    with pytest.raises(UserError, match="lr"):
        train(cfg(tmp_path / "a", iters=4, lr=2e-3, resume=True), backbone=bb)
    with pytest.raises(UserError, match="does not exist"):
        train(cfg(tmp_path / "nothing", resume=True), backbone=bb)
    with pytest.raises(UserError, match="--resume"):
        train(cfg(tmp_path / "a", iters=4), backbone=bb)  # would overwrite a run


SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads({threads})
from test_resume import cfg, tiny_backbone
from vitsplit.engine import train
train(cfg({out!r}, iters=40, checkpoint_every=2, resume={resume}), backbone=tiny_backbone())
"""


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path):
    out = tmp_path / "killed"
    script = SCRIPT.format(
        tests=str(Path(__file__).parent), threads=torch.get_num_threads(), out=str(out), resume=False
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # kill once a few checkpoints exist, mid-run
            ckpt = out / "last.pt"
            if ckpt.exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 7:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    step = torch.load(out / "last.pt", weights_only=False)["step"]
    assert 2 <= step < 40
    train(cfg(out, iters=40, checkpoint_every=2, resume=True), backbone=tiny_backbone())
    train(cfg(tmp_path / "straight", iters=40, checkpoint_every=2), backbone=tiny_backbone())
    assert_same(out, tmp_path / "straight")
