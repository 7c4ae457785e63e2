"""False-positive rates of the noise-aware divergence rule (cka_split.decision.divergence) and its planted-grid
results, tuning and held-out configurations reported separately.

Measured on tiny ViTs (random weights, embed 32, 32 px images, patch 8) through the CKA engine, with
``--batches`` minibatches of ``--batch-size`` random images per probe draw:

1. Copies equal to the pretrained model (L in {4, 12, 24}, ``--draws`` probe draws each): the rate at
   which the rule reports anything but "flat", and the largest |d| seen (numerical precision).
2. Two probe draws of the same (pretrained, copy) pair, copies planted as in tests/planted.py: the
   rate at which the noise bands call the two estimates of the same block different,
   |log d_A - log d_B| > NOISE_Z * sqrt((se_A/d_A)^2 + (se_B/d_B)^2) (the rule's bands are on log d;
   nominal two-sided normal rate 0.27 % at 3 SE), over blocks with d > 0; and the rate at which the
   recommended K_t differs between the two draws.
3. Copies moved alike at every block (no step planted): the rate at which the rule reports a step at
   block 2 or later (K_t < L - 1), the step rule's false positive.
4. The planted grid on constructed curves (tests/planted.py): wrong K_t per kind, tuning, held out and
   fresh held out (other depths).
5. What the SE does not cover: two copies of a 6-block tiny ViT fine-tuned for seg on synthetic data
   with two seeds (``--finetune-steps`` steps each): the divergence curves of both, the largest
   |d_seed0 - d_seed1| against the SE, and both recommendations.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/recommend_error_rates.py [--draws 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from planted import (
    FRESH_AMPLITUDES,
    FRESH_L,
    FRESH_PLATEAU_FRACTION,
    FRESH_RELATIVE_SE,
    FRESH_SEED,  # noqa: E402
    GRID_L,
    HELD_OUT_AMPLITUDES,
    HELD_OUT_PLATEAU_FRACTION,
    HELD_OUT_RELATIVE_SE,
    KINDS,
    TUNING_AMPLITUDES,
    constructed_curve,
    fake_result,
    planted_copy,
    probe_batches,
    tiny_vit,
)

from cka_split import analyze  # noqa: E402
from cka_split.decision.divergence import NOISE_Z  # noqa: E402
from cka_split.decision.recommend import recommend_split  # noqa: E402


def curves(res, tasks):
    out = {}
    for t in tasks:
        d = 1 - np.diag(res.matrix("pretrained", t).numpy())
        se = np.diag(res.se("pretrained", t).numpy())
        out[t] = (d, se)
    return out


def equal_copies(args) -> None:
    non_flat, total, worst = 0, 0, 0.0
    for L in GRID_L:
        pre = tiny_vit(L, seed=L)
        for draw in range(args.draws):
            res = analyze(
                {"pretrained": pre, "copy": planted_copy(pre, 0, 0.0)},
                probe_batches(args.batches, args.batch_size, seed=1000 + draw),
            )
            tr = recommend_split(res).per_task["copy"]
            non_flat += tr.divergence_kind != "flat"
            total += 1
            worst = max(worst, float(np.abs(1 - np.diag(res.matrix("pretrained", "copy").numpy())).max()))
    print(
        f"1. copies equal to the pretrained model: {non_flat}/{total} not flat ({non_flat / total:.1%}); "
        f"largest |1 - CKA| {worst:.2e}"
    )


def two_draws(args) -> None:
    diff, pairs, kt_diff, kt_total = 0, 0, 0, 0
    for L in GRID_L:
        pre = tiny_vit(L, seed=L + 1)
        starts = sorted({1, L // 2, L - 1})
        models = {"pretrained": pre}
        for s in starts:
            for big in (0.006, 0.06, 0.4):
                models[f"id_s{s}_{big}"] = planted_copy(pre, s, big, 0.0, seed=s)
                models[f"pl_s{s}_{big}"] = planted_copy(pre, s, big, big / 10, seed=s + 50)
        tasks = [m for m in models if m != "pretrained"]
        for draw in range(args.draws):
            a = analyze(models, probe_batches(args.batches, args.batch_size, seed=2000 + 2 * draw))
            b = analyze(models, probe_batches(args.batches, args.batch_size, seed=2001 + 2 * draw))
            ca, cb = curves(a, tasks), curves(b, tasks)
            ra, rb = recommend_split(a), recommend_split(b)
            for t in tasks:
                (da, sa), (db, sb) = ca[t], cb[t]
                live = (da > 0) & (db > 0) & (sa > 0) & (sb > 0)
                la, lb = np.log(da[live]), np.log(db[live])  # the rule's bands are on log d
                qa, qb = sa[live] / da[live], sb[live] / db[live]
                diff += int((np.abs(la - lb) > NOISE_Z * np.sqrt(qa**2 + qb**2)).sum())
                pairs += int(live.sum())
                kt_diff += ra.per_task[t].k_t != rb.per_task[t].k_t
                kt_total += 1
    print(
        f"2. two probe draws of the same copy: noise test calls {diff}/{pairs} equal blocks different "
        f"({diff / max(1, pairs):.2%}, nominal 0.27%); recommended K_t differs in {kt_diff}/{kt_total} pairs of draws "
        f"({kt_diff / max(1, kt_total):.1%})"
    )


def uniform_copies(args) -> None:
    steps, total = 0, 0
    for L in GRID_L:
        pre = tiny_vit(L, seed=L + 2)
        models = {"pretrained": pre}
        for k, scale in enumerate((0.003, 0.01, 0.03, 0.1)):
            for rep in range(3):
                models[f"u{k}_{rep}"] = planted_copy(pre, 0, scale, seed=100 * k + rep)
        for draw in range(max(1, args.draws // 4)):
            rec = recommend_split(analyze(models, probe_batches(args.batches, args.batch_size, seed=3000 + draw)))
            for tr in rec.per_task.values():
                steps += tr.k_t < L - 1
                total += 1
    print(
        f"3. copies moved alike at every block: step at block >= 2 (K_t < L - 1) in {steps}/{total} "
        f"({steps / total:.1%})"
    )


def constructed(args) -> None:
    print("4. planted grid on constructed curves (every s in 1..L-1), wrong K_t / cases:")
    sets = (
        ("tuning", GRID_L, TUNING_AMPLITUDES, {}, 0),
        (
            "held out",
            GRID_L,
            HELD_OUT_AMPLITUDES,
            dict(plateau=HELD_OUT_PLATEAU_FRACTION, rel_se=HELD_OUT_RELATIVE_SE),
            555,
        ),
        (
            "fresh held out",
            FRESH_L,
            FRESH_AMPLITUDES,
            dict(plateau=FRESH_PLATEAU_FRACTION, rel_se=FRESH_RELATIVE_SE),
            FRESH_SEED,
        ),
    )
    for label, depths, amps, kw, offset in sets:
        for kind in KINDS:
            wrong, larger, total = 0, 0, 0
            for L in depths:
                for seed in range(args.seeds):
                    rng = np.random.default_rng(seed * 7919 + L + offset)
                    cs, truth = {}, {}
                    for s in range(1, L):
                        for a in amps:
                            cs[f"s{s}_{a:g}"], truth[f"s{s}_{a:g}"] = constructed_curve(L, s, a, kind, rng, **kw), s
                    rec = recommend_split(fake_result(cs, L))
                    for t, s in truth.items():
                        k = rec.per_task[t].k_t
                        wrong += k != L - s
                        larger += k > L - s
                        total += 1
            print(
                f"   {label:14s} {kind:9s} (L {', '.join(map(str, depths))}): {wrong}/{total} wrong "
                f"({wrong / total:.1%}); of those, K_t too large: {larger}"
            )


def seed_effect(args) -> None:
    from vitsplit.engine import finetune_backbone

    pre = tiny_vit(6, seed=7)
    with __import__("torch").no_grad():  # layer scale 1 so fine-tuning moves the blocks measurably
        for blk in pre.vit.blocks:
            for ls in (getattr(blk, "ls1", None), getattr(blk, "ls2", None)):
                if ls is not None and hasattr(ls, "gamma"):
                    ls.gamma.fill_(1.0)
    copies = {
        f"seed{s}": finetune_backbone(
            pre,
            "seg",
            "synthetic:size=32,classes=3",
            args.finetune_steps,
            batch_size=4,
            crop=32,
            lr=1e-3,
            seed=s,
            device="cpu",
        )
        for s in (0, 1)
    }
    res = analyze({"pretrained": pre} | copies, probe_batches(args.batches, args.batch_size, seed=4000))
    (d0, s0), (d1, s1) = curves(res, ["seed0", "seed1"]).values()
    rec = recommend_split(res)
    gap = np.abs(d0 - d1)
    se = np.sqrt(s0**2 + s1**2)
    print(
        f"5. fine-tuning seed ({args.finetune_steps} steps, tiny ViT, 6 blocks): d seed 0 = "
        + " ".join(f"{v:.3g}" for v in d0)
        + "; seed 1 = "
        + " ".join(f"{v:.3g}" for v in d1)
    )
    print(
        f"   largest |d0 - d1| = {gap.max():.3g} ({(gap / np.maximum(se, 1e-300)).max():.1f} x the combined SE; "
        f"{(gap / np.maximum((d0 + d1) / 2, 1e-300)).max():.0%} of the mean d); K_t {rec.per_task['seed0'].k_t} vs "
        f"{rec.per_task['seed1'].k_t}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=10, help="noise draws per constructed grid")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--finetune-steps", type=int, default=40)
    ap.add_argument("--parts", default="1,2,3,4,5", help="which of the five measurements to run (4 alone: seconds)")
    args = ap.parse_args()
    t0 = time.time()
    print(f"{args.batches} minibatches x {args.batch_size} images per probe draw, {args.draws} draws")
    parts = {int(p) for p in args.parts.split(",")}
    for i, part in enumerate((equal_copies, two_draws, uniform_copies, constructed, seed_effect), start=1):
        if i in parts:
            part(args)
    print(f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
