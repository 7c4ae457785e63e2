"""Training step time and peak memory of ViT-Split vs the baselines (full, lora, linear).

Each (architecture, method) runs in its own fresh Python process: random weights, CPU, batch 2,
crop 224, 150 classes, random images and labels (the data pipeline is left out: it is the same for
every method). Per process: one warm-up step, then ``--steps`` timed optimizer steps (forward,
loss, backward, AdamW step); the median step time is reported.

Memory: the process's resident-set high-water mark, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
(KiB on Linux), read at the end of the fresh process, so it covers weights, activations, gradients
and optimizer state; "train extra" is that peak minus the RSS measured after the model is built
(before the first step), i.e. what training itself adds. No tracemalloc (it misses torch's
allocator).

Targets on DINOv2-L (the issue): ViT-Split step <= 0.70x full fine-tuning's, peak <= 0.60x.
The CPU is shared with other work: times are noisy; run it on an idle machine for clean numbers.

    python benchmarks/train_speed.py [--archs s l] [--steps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("vitsplit", "full", "lora", "linear")

CHILD = r"""
import json, resource, statistics, sys, time
import torch
torch.set_num_threads({threads})
from vitsplit.backbones import build_backbone
from vitsplit.engine import TrainConfig, build_model
from vitsplit.model import default_split
arch, method, steps = {arch!r}, {method!r}, {steps}

def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0

torch.manual_seed(0)
bb = build_backbone(f"dinov2_vit{{arch}}14", "random", seed=0)
k_t, prior, _ = default_split(bb.num_layers)
cfg = TrainConfig(method=method, k_t=k_t, prior_layers=prior)
model = build_model(cfg, bb, 150)
model.train()
opt = torch.optim.AdamW(model.param_groups(2e-4, 1e-2), betas=(0.9, 0.999))
built = rss_kib()
g = torch.Generator().manual_seed(0)
batch = {{"image": torch.randn(2, 3, 224, 224, generator=g), "seg": torch.randint(0, 150, (2, 224, 224), generator=g)}}
times = []
for i in range(steps + 1):
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    model.loss(batch)["loss"].backward()
    opt.step()
    times.append(time.perf_counter() - t)
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
print(json.dumps({{"step_s": statistics.median(times[1:]), "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "built_mib": built / 1024, "trainable_m": trainable / 1e6}}))
"""


def run_one(arch: str, method: str, steps: int, threads: int) -> dict:
    code = CHILD.format(arch=arch, method=method, steps=steps, threads=threads)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{arch}/{method} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["s", "l"], choices=["s", "b", "l", "g"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"CPU, batch 2, crop 224, 150 classes, random weights; median of {args.steps} steps after 1 warm-up; "
          f"{args.threads} threads; one fresh process per row")
    print(f"{'arch':5}{'method':10}{'trainable M':>12}{'step s':>9}{'x full':>8}{'peak MiB':>10}{'x full':>8}{'train extra MiB':>17}{'x full':>8}")
    for arch in args.archs:
        rows = {m: run_one(arch, m, args.steps, args.threads) for m in args.methods}
        full = rows.get("full")
        for m, r in rows.items():
            extra = r["peak_mib"] - r["built_mib"]
            ratio = (lambda a, b: f"{a / b:8.2f}") if full else (lambda a, b: f"{'':>8}")
            print(f"{'dinov2_vit' + arch + '14':5} {m:10}{r['trainable_m']:11.2f}{r['step_s']:9.2f}"
                  f"{ratio(r['step_s'], full['step_s']) if full else '':>8}{r['peak_mib']:10.0f}"
                  f"{ratio(r['peak_mib'], full['peak_mib']) if full else '':>8}{extra:17.0f}"
                  f"{ratio(extra, full['peak_mib'] - full['built_mib']) if full else '':>8}", flush=True)


if __name__ == "__main__":
    main()
