"""``cka-split demo``: the whole pipeline offline on the embedded default."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .progress import RichProgress


def demo(
    out: Optional[Path] = typer.Option(None, help="Output directory (default runs/demo-<timestamp>)."),
    quick: bool = typer.Option(False, help="Fewer steps, probes and scenes (about 3 minutes)."),
) -> None:
    from cka_split.reports import build_report

    from cka_split.pipelines.demo import demo_plan, run_demo

    run = out or Path("runs") / f"demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    with RichProgress() as progress:
        summary = run_demo(run, demo_plan(quick), progress=progress)
        report = build_report(run)

    console = Console()
    rec = Table(title="Recommended split (from CKA of the pretrained demo-vit vs its fine-tuned copies)")
    for col in ("task", "K_t", "task-head blocks", "prior layers", "divergence start"):
        rec.add_column(col)
    for task, r in summary["recommendation"]["per_task"].items():
        blocks = r["task_head_layers"]
        rec.add_row(
            task,
            str(r["k_t"]),
            f"{blocks[0]}-{blocks[-1]}",
            ",".join(map(str, r["prior_layers"])),
            str(r["divergence_start"]),
        )
    res = Table(title="Semantic segmentation on synthetic validation scenes (same data, schedule and budget)")
    for col in ("method", "mIoU %", "aAcc %", "trainable params", "step time"):
        res.add_column(col, justify="right" if col != "method" else "left")
    for method, r in summary["results"].items():
        res.add_row(
            method,
            _num(r["mIoU"]),
            _num(r["aAcc"]),
            _params(r.get("trainable_params")),
            f"{r['step_time_s'] * 1000:.0f} ms" if r.get("step_time_s") else "-",
        )
    console.print(rec)
    console.print(res)
    console.print(summary["verdict"])
    console.print(f"weights: {summary['weights_source']}")
    console.print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in summary["timings_s"].items()))
    console.print(f"report: {report.resolve()}")


def register(app: typer.Typer) -> None:
    """Add ``cka-split demo`` to ``app``."""
    app.command(
        help="Run the whole pipeline offline on the synthetic scenes with the demo ViT (its pretrained "
        "weights ship in the package): fine-tune seg and det copies, CKA, recommendation, PCA "
        "maps, ViT-Split vs linear and full fine-tuning, and the report."
    )(demo)


def _params(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n / 1e3:.1f}K"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"
