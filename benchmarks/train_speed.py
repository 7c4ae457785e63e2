"""Training step time and peak memory of ViT-Split vs the baselines (full, lora, linear), and
(``--paper``) vs ViT-Adapter + UperNet, the paper's efficiency comparison.

Each (architecture, method) runs in its own fresh Python process: random weights, CPU, batch 2,
crop 224 (``--paper``: 512, the paper's crop), 150 classes, random images and labels (the data
pipeline is left out: it is the same for every method). Per process: one warm-up step, then
``--steps`` timed optimizer steps (forward, loss, backward, AdamW step); the median step time is
reported, split into forward, backward and optimizer. ``--paper`` also counts the FLOPs of one step
(forward by top-level part, backward as a whole) with ``torch.utils.flop_counter`` on the meta device,
after the timing, to show where the time goes.

``--paper`` rows: ViT-Split-S/B (DINOv2, its linear head) vs ViT-Adapter-S/B + UperNet with the
auxiliary FCN head (the released DeiT-S/B configs), and their ratios; the paper reports about 0.25 for
the step time at S (9 min 25 s vs 38 min for 10k iterations, on GPUs).

Memory: the process's resident-set high-water mark, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
(KiB on Linux), read at the end of the fresh process, so it covers weights, activations, gradients
and optimizer state; "train extra" is that peak minus the RSS measured after the model is built
(before the first step), i.e. what training itself adds. No tracemalloc (it misses torch's
allocator).

Targets on DINOv2-L (the issue): ViT-Split step <= 0.70x full fine-tuning's, peak <= 0.60x.
The CPU is shared with other work: times are noisy; run it on an idle machine for clean numbers.

    python benchmarks/train_speed.py [--archs s l] [--steps 3] [--threads 2] [--crop 224]
    python benchmarks/train_speed.py --paper [--archs s b] [--crop 512]
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
import json, re, resource, statistics, sys, time
import torch
torch.set_num_threads({threads})
from torch.utils.flop_counter import FlopCounterMode
from vitsplit.backbones import build_backbone
from vitsplit.engine import TrainConfig, build_model
from vitsplit.model import default_split
name, method, head, crop, steps = {name!r}, {method!r}, {head!r}, {crop}, {steps}

def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0

torch.manual_seed(0)
bb = build_backbone(name, "random", seed=0)
k_t, prior, _ = default_split(bb.num_layers)
cfg = TrainConfig(method=method, head=head, k_t=k_t, prior_layers=prior)
model = build_model(cfg, bb, 150)
model.train()
opt = torch.optim.AdamW(model.param_groups(2e-4, 1e-2), betas=(0.9, 0.999))
built = rss_kib()
g = torch.Generator().manual_seed(0)
batch = {{"image": torch.randn(2, 3, crop, crop, generator=g), "seg": torch.randint(0, 150, (2, crop, crop),
generator=g)}}
times, parts = [], []
for i in range(steps + 1):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = model.loss(batch)["loss"]
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    t3 = time.perf_counter()
    times.append(t3 - t0)
    parts.append((t1 - t0, t2 - t1, t3 - t2))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
# FLOPs (after the peak is read): forward by top-level part, and the whole backward, on the meta device
model.to("meta")
x = batch["image"].to("meta")
with FlopCounterMode(display=False) as fwd:
    loss = model.loss({{"image": x, "seg": batch["seg"].to("meta")}})["loss"]
with FlopCounterMode(display=False) as bwd:
    loss.backward()
counts = {{k: sum(v.values()) / 1e9 for k, v in fwd.get_flop_counts().items()}}
by_part = {{k: v for k, v in counts.items() if "." not in k and k != "Global"}}  # top-level parts, by class name
vit = sum(v for k, v in counts.items() if re.fullmatch(r"ViTAdapter\.backbone\.vit\.(blocks\.\d+|patch_embed)", k))
if vit:
    by_part["ViTAdapter: its ViT"] = vit
med = lambda i: statistics.median(p[i] for p in parts[1:])
print(json.dumps({{"step_s": statistics.median(times[1:]), "fwd_s": med(0), "bwd_s": med(1), "opt_s": med(2),
                  "peak_mib": peak, "built_mib": built / 1024, "trainable_m": trainable / 1e6,
                  "fwd_gflop": fwd.get_total_flops() / 1e9, "bwd_gflop": bwd.get_total_flops() / 1e9, "fwd_by_part":
                  by_part}}))
"""

# The paper's efficiency comparison (ViT-Split seed, "Training time for 10k iterations"): ViT-Split
# with its linear head on DINOv2 vs ViT-Adapter + UperNet on the released DeiT backbones.
PAPER_ROWS = {
    "s": (
        ("ViT-Split-S", "dinov2_vits14", "vitsplit", "linear"),
        ("ViT-Adapter-S", "deit_small_patch16_224", "vit-adapter", "upernet"),
    ),
    "b": (
        ("ViT-Split-B", "dinov2_vitb14", "vitsplit", "linear"),
        ("ViT-Adapter-B", "deit_base_patch16_224", "vit-adapter", "upernet"),
    ),
}
PAPER_RATIO = 9.42 / 38.0  # ViT-Split-S 9 min 25 s vs ViT-Adapter-S 38 min per 10k iterations
# forward-FLOP parts, as torch's flop counter names them (by class) -> what they are
PART_LABELS = {
    "Block": "frozen DINOv2 blocks",
    "PatchEmbed": "frozen patch embedding",
    "TaskHead": "task head",
    "PriorHead": "prior head",
    "FusionNet": "fusion net",
    "SegHead": "seg head",
    "ViTAdapter": "ViT-Adapter",
    "ViTAdapter: its ViT": "(of which the ViT)",
    "UPerHead": "UperNet",
    "FCNHead": "aux FCN",
}


def run_one(name: str, method: str, steps: int, threads: int, *, head: str = "linear", crop: int = 224) -> dict:
    code = CHILD.format(name=name, method=method, head=head, crop=crop, steps=steps, threads=threads)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{name}/{method} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def paper_comparison(archs: list[str], steps: int, threads: int, crop: int) -> None:
    """ViT-Split vs ViT-Adapter + UperNet, side by side per size, and their ratios."""
    print(
        f"CPU, batch 2, crop {crop}, 150 classes, random weights; median of {steps} steps after 1 warm-up; "
        f"{threads} threads; one fresh process per row. GFLOP: torch.utils.flop_counter (grid_sample, i.e. the "
        "deformable sampling, is not counted)"
    )
    print(
        f"{'model':15}{'backbone':24}{'head':9}{'trainable M':>12}{'step s':>8}{'fwd s':>7}{'bwd s':>7}{'opt s':>7}"
        f"{'peak MiB':>10}{'extra MiB':>10}{'fwd GF':>8}{'bwd GF':>8}  forward GFLOP by part"
    )
    for arch in archs:
        rows = [
            (label, name, head, run_one(name, method, steps, threads, head=head, crop=crop))
            for label, name, method, head in PAPER_ROWS[arch]
        ]
        for label, name, head, r in rows:
            parts = ", ".join(
                f"{PART_LABELS.get(k, k)} {v:.1f}"
                for k, v in sorted(r["fwd_by_part"].items(), key=lambda kv: -kv[1])
                if v >= 0.05
            )
            print(
                f"{label:15}{name:24}{head:9}{r['trainable_m']:12.2f}{r['step_s']:8.2f}{r['fwd_s']:7.2f}{r['bwd_s']:7.2f}"
                f"{r['opt_s']:7.2f}{r['peak_mib']:10.0f}{r['peak_mib'] - r['built_mib']:10.0f}{r['fwd_gflop']:8.1f}"
                f"{r['bwd_gflop']:8.1f}  {parts}",
                flush=True,
            )
        split, adapter = rows[0][3], rows[1][3]
        print(
            f"  {rows[0][0]} / {rows[1][0]}: step time {split['step_s'] / adapter['step_s']:.2f}, "
            f"peak memory {split['peak_mib'] / adapter['peak_mib']:.2f}, training extra "
            f"{(split['peak_mib'] - split['built_mib']) / (adapter['peak_mib'] - adapter['built_mib']):.2f}, FLOPs "
            f"{(split['fwd_gflop'] + split['bwd_gflop']) / (adapter['fwd_gflop'] + adapter['bwd_gflop']):.2f} "
            f"(paper, step time at S: {PAPER_RATIO:.2f})",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["s", "l"], choices=["s", "b", "l", "g"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--paper",
        action="store_true",
        help="the paper's rows instead: ViT-Split vs ViT-Adapter + UperNet (--archs s b)",
    )
    ap.add_argument("--crop", type=int, default=None, help="crop size (default 224; --paper: 512, the paper's)")
    args = ap.parse_args()
    if args.paper:
        archs = [a for a in args.archs if a in PAPER_ROWS] or ["s", "b"]
        paper_comparison(archs, args.steps, args.threads, args.crop or 512)
        return
    crop = args.crop or 224
    print(
        f"CPU, batch 2, crop {crop}, 150 classes, random weights; median of {args.steps} steps after 1 warm-up; "
        f"{args.threads} threads; one fresh process per row"
    )
    print(
        f"{'arch':5}{'method':10}{'trainable M':>12}{'step s':>9}{'x full':>8}{'peak MiB':>10}{'x full':>8}"
        f"{'train extra MiB':>17}{'x full':>8}"
    )
    for arch in args.archs:
        rows = {m: run_one(f"dinov2_vit{arch}14", m, args.steps, args.threads, crop=crop) for m in args.methods}
        full = rows.get("full")
        for m, r in rows.items():
            extra = r["peak_mib"] - r["built_mib"]
            ratio = (lambda a, b: f"{a / b:8.2f}") if full else (lambda a, b: f"{'':>8}")
            print(
                f"{'dinov2_vit' + arch + '14':5} {m:10}{r['trainable_m']:11.2f}{r['step_s']:9.2f}"
                f"{ratio(r['step_s'], full['step_s']) if full else '':>8}{r['peak_mib']:10.0f}"
                f"{ratio(r['peak_mib'], full['peak_mib']) if full else '':>8}{extra:17.0f}"
                f"{ratio(extra, full['peak_mib'] - full['built_mib']) if full else '':>8}",
                flush=True,
            )


if __name__ == "__main__":
    main()
