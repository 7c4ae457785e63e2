"""``--finetune-steps auto`` against the demo's fixed copy fine-tuning: the issue's target is the same
recommendation in at most half the fixed run's fine-tuning wall time.

Runs ``analyze`` twice on the demo's seg task with the demo's options (``cka_split.pipelines.demo.FULL_PLAN``:
data, copy learning rate and batch, probes, image size), CKA only (no RGN, no PCA): once with the fixed
``finetune_steps_seg`` steps, once with ``auto`` capped at the same steps, checking every ``--every``
steps and stopping after ``--patience`` checks with the same accepted K_t (``cka_split.probes.autostop``).
Prints each run's K_t, the copy's fine-tuning seconds and steps, the auto run's K_t and accepted-K_t
trajectories, and the time ratio.

    python benchmarks/autostop_demo.py --out /tmp/autostop [--every 10 --patience 3]

Measure with nothing else running (the ratio compares two wall times).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cka_split.pipelines.analyze import AnalyzeConfig, run_analyze
from cka_split.pipelines.demo import FULL_PLAN


def run(out: Path, **steps) -> tuple[int, dict]:
    """(recommended K_t for seg, the seg copy's record in config.json) of one analyze run."""
    plan = FULL_PLAN
    cfg = AnalyzeConfig(
        model="demo-vit",
        weights="auto",
        tasks=["seg"],
        finetune_lr=plan.finetune_lr,
        finetune_batch_size=plan.finetune_batch_size,
        probe_images=plan.probe_images,
        batch_size=plan.cka_batch_size,
        image_size=plan.image_size,
        device="cpu",
        seed=plan.seed,
        out=str(out),
        pca_images=0,
        selector="cka",
        data={"*": plan.data},
        **steps,
    )
    run_dir, rec = run_analyze(cfg)
    return rec.per_task["seg"].k_t, json.loads((run_dir / "config.json").read_text())["models"]["seg"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--patience", type=int, default=3)
    args = ap.parse_args()
    steps = FULL_PLAN.finetune_steps_seg
    k_fixed, fixed = run(args.out / "fixed", finetune_steps=steps)
    k_auto, auto = run(
        args.out / "auto",
        finetune_steps="auto",
        finetune_max_steps=steps,
        finetune_check_every=args.every,
        finetune_patience=args.patience,
    )
    print(f"fixed: K_t {k_fixed}, {fixed['steps']} steps, {fixed['seconds']:.1f} s")
    a = auto["auto"]
    print(
        f"auto:  K_t {k_auto}, {a['steps_used']} of {a['max_steps']} steps (stopped early: {a['stopped_early']}), "
        f"{auto['seconds']:.1f} s with the checks; K_t at the checks: "
        + ", ".join(f"{s}:{k}" for s, k in a["k_t_trajectory"])
        + "; accepted K_t at the checks: "
        + ", ".join("/".join(map(str, acc)) for acc in a.get("accepted_k_t", []))
    )
    print(
        f"same recommendation: {k_fixed == k_auto}; time ratio auto / fixed = {auto['seconds'] / fixed['seconds']:.2f} "
        "(target <= 0.5)"
    )


if __name__ == "__main__":
    main()
