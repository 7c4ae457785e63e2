"""The HTML report of ``cka-split compare`` (``OUT/report.html``): how cleanly each model's layers split
into groups, with uncertainty, each model's own CKA heatmap, and a cross-model heatmap for every pair.

Read from the comparison directory alone (``compare.json``, ``compare.npz``, see
:mod:`cka_split.pipelines.compare`). Self-contained like the analysis report: figures inlined as PNG.
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, FileSystemLoader, select_autoescape
from matplotlib.figure import Figure
from scipy import stats

from cka_split.estimator.cka import MIN_SE_BATCHES
from cka_split.pipelines.compare import Comparison, ModelSplit
from vitsplit.fileio import atomic_write_text

from . import figures as F

TEMPLATE_DIR = Path(__file__).parent / "templates"
# Two-sided level at which a difference between two models' split contrasts is called distinguishable
# from probe noise (Student t on B-1 degrees of freedom for B jackknife minibatches).
DIFFERENCE_LEVEL = 0.05


def weights_kind(source: str | None, name: str) -> str | None:
    """ "random" | "demo" | None for one model's weights source."""
    src = (source or "").lower()
    if src.startswith("random"):
        return "random"
    if name == "demo-vit" or "demo" in src:
        return "demo"
    return None


def banners(cmp: Comparison) -> list[dict[str, str]]:
    kinds = {n: weights_kind((cmp.info.get(n) or {}).get("weights_source"), n) for n in cmp.models}
    random = [n for n, k in kinds.items() if k == "random"]
    demo = [n for n, k in kinds.items() if k == "demo"]
    out = []
    if random:
        out.append(
            {
                "kind": "danger",
                "title": "Random weights: not pretrained",
                "text": f"{', '.join(random)} {'was' if len(random) == 1 else 'were'} compared with randomly "
                "initialised weights. Their layer structure is that of an untrained network and says nothing about the "
                "foundation model of that name; use this report to check the pipeline.",
            }
        )
    if demo:
        out.append(
            {
                "kind": "warn",
                "title": "Demo backbone: not a real foundation model",
                "text": f"{', '.join(demo)} is the small ViT that 'cka-split demo' pretrains on synthetic scenes.",
            }
        )
    return out


def _fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def split_rows(cmp: Comparison, splits: dict[str, ModelSplit]) -> list[dict[str, str]]:
    rows = []
    for n in sorted(cmp.models, key=lambda m: -splits[m].split if math.isfinite(splits[m].split) else math.inf):
        s, info = splits[n], cmp.info.get(n) or {}
        rows.append(
            {
                "model": n,
                "split": _fmt(s.split),
                "se": _fmt(s.split_se),
                "boundary": f"{s.boundary} of {s.num_layers}" if s.boundary else "n/a",
                "depth": _fmt(s.boundary / s.num_layers, 2) if s.boundary else "n/a",
                "support": "n/a" if not math.isfinite(s.boundary_support) else f"{100 * s.boundary_support:.0f} %",
                "width": str(info.get("embed_dim", "")),
                "patch": str(info.get("patch_size", "")),
            }
        )
    return rows


def difference_rows(cmp: Comparison) -> list[dict[str, str]]:
    b = cmp.num_batches
    crit = float(stats.t.ppf(1 - DIFFERENCE_LEVEL / 2, b - 1)) if b >= 2 else math.inf
    rows = []
    for (a, c), (d, se) in cmp.split_differences().items():
        t = d / se if se and math.isfinite(se) and se > 0 else math.nan
        if not math.isfinite(t):
            verdict = "no uncertainty estimate (fewer than 2 minibatches)"
        elif abs(t) >= crit:
            verdict = f"{a if d > 0 else c} splits more cleanly"
        else:
            verdict = "not distinguishable from probe noise"
        rows.append({"a": a, "b": c, "diff": _fmt(d), "se": _fmt(se), "t": _fmt(t, 1), "verdict": verdict})
    return rows


def contrast_figure(splits: dict[str, ModelSplit]) -> Figure:
    """Boundary contrast against relative depth s/L for every model, with +-1 SE bands."""
    fig = Figure(figsize=(7.2, 3.6))
    ax = fig.subplots()
    for i, (n, s) in enumerate(splits.items()):
        c = np.asarray(s.contrast, dtype=np.float64)
        se = np.asarray(s.contrast_se, dtype=np.float64)
        x = np.arange(1, s.num_layers) / s.num_layers
        color = F.task_color(i)
        ax.plot(x, c, "-o", ms=3, color=color, label=n)
        if np.isfinite(se).any():
            ax.fill_between(x, c - se, c + se, color=color, alpha=0.2, lw=0)
        if s.boundary:
            ax.plot([s.boundary / s.num_layers], [s.split], "*", ms=11, color=color, mec="black", mew=0.5)
    ax.axhline(0, color="#888", lw=0.8)
    ax.set_xlabel("boundary position s / L (blocks before s | from s)")
    ax.set_ylabel("boundary contrast")
    ax.set_xlim(0, 1)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def _own_heatmap(cmp: Comparison, name: str, split: ModelSplit) -> bytes:
    layers = cmp.result.layers[name]
    fig = F.cka_heatmap_figure(
        cmp.matrix(name, name).numpy(),
        layers,
        layers,
        title=f"{name}: block-by-block CKA",
        row_label=f"{name} block",
        col_label=f"{name} block",
    )
    if split.boundary:
        ax = fig.axes[0]
        for line in (ax.axhline, ax.axvline):
            line(split.boundary, color="#00e0ff", lw=1.6, ls="--")
    return F.png_bytes(fig)


def _figure(png: bytes, title: str, caption: str, fig_id: str) -> dict[str, str]:
    return {"uri": F.data_uri(png), "title": title, "caption": caption, "id": fig_id}


def report_context(cmp: Comparison) -> dict[str, Any]:
    splits = cmp.splits()
    r = cmp.result
    if r.features == "tokens":
        matching = (
            f"patch tokens of every model area-resampled to the coarsest grid, {cmp.common_grid[0]}x"
            f"{cmp.common_grid[1]} (adaptive average pooling; prefix tokens dropped)"
        )
    else:
        matching = {"mean": "the mean patch token of each image", "cls": "the class token"}[r.features]
    facts = [
        ("models", ", ".join(cmp.models)),
        ("probe images", f"{r.num_images} in {cmp.num_batches} minibatches"),
        ("image size", f"{cmp.image_size[0]}x{cmp.image_size[1]} px"),
        ("features", matching),
        ("estimator", "unbiased minibatch CKA (HSIC_1)" if r.unbiased else "biased minibatch CKA (HSIC_0)"),
    ]
    models = [
        {
            "name": n,
            "source": (cmp.info.get(n) or {}).get("weights_source", ""),
            "blocks": len(r.layers[n]),
            "grid": "x".join(map(str, cmp.grids.get(n, ()))),
            **{k: (cmp.info.get(n) or {}).get(k, "") for k in ("embed_dim", "patch_size", "num_prefix_tokens")},
        }
        for n in cmp.models
    ]
    heatmaps = [
        _figure(_own_heatmap(cmp, n, splits[n]), n, "Dashed lines: the boundary with the largest contrast.", f"own-{i}")
        for i, n in enumerate(cmp.models)
    ]
    cross = []
    for i, a in enumerate(cmp.models):
        for b in cmp.models[i + 1 :]:
            fig = F.cka_heatmap_figure(
                cmp.matrix(a, b).numpy(),
                r.layers[a],
                r.layers[b],
                title=f"{a} vs {b}",
                row_label=f"{a} block",
                col_label=f"{b} block",
            )
            cross.append(
                _figure(
                    F.png_bytes(fig),
                    f"{a} vs {b}",
                    "CKA of every block of one model with every block of the other, on the same images.",
                    f"cross-{len(cross)}",
                )
            )
    return {
        "title": "Layer structure compared",
        "banners": banners(cmp),
        "facts": facts,
        "models": models,
        "splits": split_rows(cmp, splits),
        "differences": difference_rows(cmp),
        "few_batches": cmp.num_batches < MIN_SE_BATCHES,
        "min_batches": MIN_SE_BATCHES,
        "level": DIFFERENCE_LEVEL,
        "contrast": _figure(
            F.png_bytes(contrast_figure(splits)),
            "Boundary contrast",
            "Contrast at every boundary, +-1 jackknife SE; stars: the largest.",
            "contrast",
        ),
        "heatmaps": heatmaps,
        "cross": cross,
        "generated": datetime.now().strftime("%Y-%m-%d %H:%M"),
    }


def render_compare_report(cmp: Comparison) -> str:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATE_DIR)),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("compare.html").render(**report_context(cmp))


def build_compare_report(out_dir: str | Path) -> Path:
    """Write ``OUT/report.html`` from a comparison directory. Returns its path."""
    cmp = Comparison.load(out_dir)
    return atomic_write_text(Path(out_dir) / "report.html", render_compare_report(cmp))
