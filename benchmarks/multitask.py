"""Multi-task inference: seg + det heads on one shared frozen pass vs two separate ViT-Split models.

Both set-ups hold the same weights and give identical outputs (checked here); the difference is
that two separate models each run the frozen backbone. Backbone: DINOv2-S architecture with random
weights (timing does not depend on the values). Prints images/s of both and the ratio.

    python benchmarks/multitask.py [--crop 224] [--batch 2] [--iters 5] [--det-config seg|published]

Seg uses the spec's published ADE20K split for the model size (S/B: K_t=3, prior 2,5,8,11; L: K_t=4,
prior 2,5,...,23; g: K_t=8, prior 27,27,28..39). ``--det-config seg`` gives det the same split;
``published`` uses the release's COCO det config for S (K_t=11, prior 2,4,6,8,11).

The shared pass saves exactly one frozen backbone pass, so the ratio is bounded by
(2F + S + D) / (F + S + D) with F the frozen pass, S and D each task's trainable parts and head;
Mask R-CNN's RoI heads (1000 proposals per image at test time) are a large D on a small backbone.
"""

from __future__ import annotations

import argparse
import time

import torch

from vitsplit import build_backbone
from vitsplit.model import MultiTaskViTSplit, ViTSplit, prior_layers_uniform


def _time_pair(fa, fb, iters: int) -> tuple[float, float]:
    """Fastest seconds per call of ``fa`` and ``fb``, measured alternately (so that load changes on
    a shared CPU hit both alike) after one warm-up each; the minimum is the least disturbed run."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(iters):
        for f, ts in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
    return min(ta), min(tb)


def _flops(fn) -> int:
    """FLOPs that ``torch.utils.flop_counter`` attributes to one call (matmuls, convs, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dinov2_vits14")
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--det-config", choices=["seg", "published"], default="seg")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-masks", action="store_true", help="Faster R-CNN instead of Mask R-CNN")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bb = build_backbone(args.model, "random", seed=0)
    L = bb.num_layers
    seg_kt, seg_prior = {
        12: (3, [2, 5, 8, 11]),
        24: (4, prior_layers_uniform(24, 8, 2)),
        40: (8, prior_layers_uniform(40, 14, 27)),
    }.get(L, (3, prior_layers_uniform(L, 4, 2)))
    seg = ViTSplit(bb, seg_kt, seg_prior, "seg", 150).eval()
    det_kt, det_prior = (seg_kt, seg_prior) if args.det_config == "seg" else (11, [2, 4, 6, 8, 11])
    det = ViTSplit(bb, det_kt, det_prior, "det", 80, masks=not args.no_masks).eval()
    multi = MultiTaskViTSplit.from_models({"seg": seg, "det": det}).eval()
    x = torch.randn(args.batch, 3, args.crop, args.crop)

    with torch.no_grad():
        shared = multi(x)
        sep = {"seg": seg(x), "det": det(x)}
        same = torch.equal(shared["seg"], sep["seg"]) and all(
            torch.equal(a[k], b[k]) for a, b in zip(shared["det"], sep["det"]) for k in a
        )
        t_multi, t_sep = _time_pair(lambda: multi(x), lambda: (seg(x), det(x)), args.iters)
        flops = {
            name: _flops(f)
            for name, f in (
                ("frozen", lambda: multi.backbone.forward_layers(x, multi.needed_layers)),
                ("shared", lambda: multi(x)),
                ("separate", lambda: (seg(x), det(x))),
            )
        }
    n = args.batch
    print(
        f"{args.model} random, crop {args.crop}, batch {n}, threads {torch.get_num_threads()}, "
        f"seg split K_t={seg_kt}, det split K_t={det_kt} prior {det_prior}; frozen blocks run: shared "
        f"{max(multi.needed_layers) + 1}, "
        f"separate {max(seg.split.needed_layers) + 1 + max(det.split.needed_layers) + 1}"
    )
    print(f"outputs identical: {same}")
    print(f"one shared pass : {n / t_multi:7.2f} img/s ({t_multi * 1e3:.0f} ms/batch)")
    print(f"two models      : {n / t_sep:7.2f} img/s ({t_sep * 1e3:.0f} ms/batch)")
    print(f"throughput ratio: {t_sep / t_multi:.2f}x (wall clock, shared CPU: noisy)")
    g = {k: v / 1e9 / n for k, v in flops.items()}
    print(
        f"GFLOP per image (matmul/conv/attention, load-independent): frozen pass {g['frozen']:.1f}, "
        f"shared {g['shared']:.1f}, separate {g['separate']:.1f}; ratio {g['separate'] / g['shared']:.2f}x"
    )


if __name__ == "__main__":
    main()
