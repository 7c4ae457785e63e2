"""How many minibatches the jackknife SE of CKA needs to be usable.

A tiny ViT (``--depth`` blocks, random weights, layer scale off) is the pretrained model; two copies are
perturbed from block 2 on (a clear and a small change) and one is perturbed everywhere slightly and
from block 2 on clearly more (a noisy plateau). For ``--draws`` independent probe draws of
``--max-batches`` minibatches of ``--batch-size`` random images, :func:`cka_split.analyze` gives the
per-minibatch HSIC terms; for every B in ``--batches`` the CKA and its leave-one-minibatch-out
jackknife SE are computed from the first B minibatches of each draw. The reference value of each entry
is the minibatch CKA over ``--reference-batches`` further minibatches (the B -> infinity limit of the
same estimator). Printed per B, over all same-block entries CKA(pretrained l, copy l) that are not
exactly 1 (identical blocks have SE 0 and are trivially covered):

- coverage: the share of draws whose interval CKA +- 2 SE holds the reference value (nominal 0.95 for
  a normal estimate with a known SD; a jackknife SE from B groups behaves like a t with B - 1 degrees
  of freedom: 0.86 at B = 4, 0.91 at 8, 0.94 at 16);
- SE / SD: the mean SE over draws divided by the SD of the CKA over draws (1 = calibrated);
- the share of SEs below half the SD (the SE badly understates the noise).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/se_coverage.py [--draws 200]
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from cka_split import analyze
from cka_split.estimator.cka import jackknife_se


def tiny_vit(depth: int, seed: int = 0):
    from timm.models.vision_transformer import VisionTransformer

    from vitsplit.backbones import Backbone

    torch.manual_seed(seed)
    vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=0, dynamic_img_size=True
    )
    return Backbone(vit, name=f"tiny{depth}", weights_source="random").eval()


def perturbed(bb, start: int, big: float, small: float = 0.0, seed: int = 1):
    """Blocks < start moved by N(0, small) per parameter, blocks >= start by N(0, big)."""
    out = copy.deepcopy(bb)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, blk in enumerate(out.vit.blocks):
            scale = big if i >= start else small
            for p in blk.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return out


def cka_from_sum(h: torch.Tensor) -> torch.Tensor:
    d = torch.diagonal(h)
    return h / torch.sqrt(d[:, None] * d[None, :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 3, 4, 6, 8, 12, 16, 24, 32])
    ap.add_argument("--reference-batches", type=int, default=1000)
    args = ap.parse_args()
    t0 = time.time()
    pre = tiny_vit(args.depth)
    models = {
        "pretrained": pre,
        "clear": perturbed(pre, 2, 0.05, seed=1),
        "small": perturbed(pre, 2, 0.01, seed=2),
        "plateau": perturbed(pre, 2, 0.05, 0.005, seed=3),
    }
    copies = [m for m in models if m != "pretrained"]
    L = args.depth
    rows = [l for _ in copies for l in range(L)]  # pretrained block l ...
    cols = [(k + 1) * L + l for k in range(len(copies)) for l in range(L)]  # ... against copy block l
    print(
        f"tiny ViT, {L} blocks; copies {copies}; {args.draws} draws; reference from {args.reference_batches} "
        f"minibatches"
    )
    gen = torch.Generator().manual_seed(12345)
    for n in args.batch_size:
        ref_batches = [torch.randn(n, 3, 32, 32, generator=gen) for _ in range(args.reference_batches)]
        ref = analyze(models, ref_batches).full[rows, cols].numpy()
        most = max(args.batches)
        est = {b: [] for b in args.batches}
        ses = {b: [] for b in args.batches}
        for _ in range(args.draws):
            res = analyze(models, [torch.randn(n, 3, 32, 32, generator=gen) for _ in range(most)])
            terms = res.batch_hsic
            for b in args.batches:
                est[b].append(cka_from_sum(terms[:b].sum(0))[rows, cols].numpy())
                ses[b].append(jackknife_se(terms[:b])[rows, cols].numpy())
        moving = ref < 1 - 1e-9
        print(
            f"\nminibatch size {n}: {int(moving.sum())} same-block entries with CKA < 1 "
            f"(reference 1 - CKA from {float((1 - ref[moving]).min()):.2e} to {float((1 - ref[moving]).max()):.2e})"
        )
        print("  B   coverage(+-2SE)  worst entry  mean SE/SD  SE<SD/2")
        for b in args.batches:
            e, s = np.array(est[b])[:, moving], np.array(ses[b])[:, moving]
            cover = (np.abs(e - ref[moving]) <= 2 * s).mean(0)
            sd = e.std(0, ddof=1)
            print(
                f"{b:3d}   {cover.mean():.3f}            {cover.min():.3f}        {np.mean(s.mean(0) / sd):.3f}"
                f"       {np.mean(s < sd / 2):.3f}"
            )
    print(f"\n{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
