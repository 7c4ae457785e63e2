"""The report's figures (matplotlib, Agg backend; seaborn heatmaps), as Figure objects and PNG bytes.

Every ``*_figure`` function returns a :class:`matplotlib.figure.Figure` and does not save or show it,
so the CLI or a notebook can reuse it; :func:`png_bytes` renders one with the Agg renderer, and
:func:`data_uri` inlines PNG bytes into the page. Figures are made without pyplot (no global state,
no display, nothing to close), so building a report never opens a window or leaks figures.

The CKA heatmaps follow Kornblith et al. 2019 (Fig. 3 ff.) and Nguyen, Raghu & Kornblith 2021: block
0 at the bottom-left, CKA on a fixed [0, 1] colour scale so that figures compare. The split drawn on
them is ViT-Split's (Li et al., ICCV 2025): the task head copies the last K_t blocks (bracketed and
outlined), and the prior head reads the prior layers (triangles on both axes).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
PRIOR_COLOR = "#00a6d6"
CMAP = "magma"


@dataclass
class SplitMarks:
    """What to draw of one task's split: its task-head blocks and prior layers (0-based blocks)."""

    label: str
    task_head_layers: list[int]
    prior_layers: list[int]
    color: str = PALETTE[0]
    divergence_start: int | None = None


def task_color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    """Render ``fig`` as PNG (Agg)."""
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for an <img src>."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _tick_step(n: int) -> int:
    return 1 if n <= 16 else 2 if n <= 32 else 4


def _positions(layers: Sequence[int], blocks: Sequence[int]) -> list[int]:
    """Indices into ``layers`` of the listed ``blocks`` (those present)."""
    where = {int(b): i for i, b in enumerate(layers)}
    return [where[int(b)] for b in blocks if int(b) in where]


def cka_heatmap_figure(
    m: np.ndarray,
    row_layers: Sequence[int],
    col_layers: Sequence[int],
    *,
    title: str,
    row_label: str,
    col_label: str,
    marks: Sequence[SplitMarks] = (),
    size: float = 4.6,
) -> Figure:
    """A CKA heatmap of ``m`` (n_rows, n_cols): rows are blocks ``row_layers`` of one model (y, block
    0 at the bottom), columns blocks ``col_layers`` of another (x). NaN cells (undefined CKA) are
    left blank. For each of ``marks``: the task-head blocks outlined as a square (on both axes) and
    bracketed above/right of the plot, and the prior layers as triangles below and left of the axes.
    """
    m = np.asarray(m, dtype=np.float64)
    nr, nc = m.shape
    fig = Figure(figsize=(size + 1.1, size + 0.25 * max(0, len(marks) - 1)))
    ax = fig.subplots()
    sns.heatmap(
        m,
        ax=ax,
        vmin=0.0,
        vmax=1.0,
        cmap=CMAP,
        square=True,
        mask=~np.isfinite(m),
        cbar_kws={"label": "CKA", "shrink": 0.82},
        xticklabels=False,
        yticklabels=False,
        linewidths=0,
    )
    ax.set_facecolor("#d8d8d8")  # undefined cells
    ax.invert_yaxis()
    sx, sy = _tick_step(nc), _tick_step(nr)
    ax.set_xticks(np.arange(0, nc, sx) + 0.5, [str(col_layers[i]) for i in range(0, nc, sx)], rotation=0, fontsize=8)
    ax.set_yticks(np.arange(0, nr, sy) + 0.5, [str(row_layers[i]) for i in range(0, nr, sy)], fontsize=8)
    prior_all = {int(b) for mk in marks for b in mk.prior_layers}
    ax.tick_params(axis="both", length=0, pad=11 if prior_all else 3)  # room for the prior-layer triangles
    for lab, i in zip(ax.get_xticklabels(), range(0, nc, sx)):
        if int(col_layers[i]) in prior_all:
            lab.set_fontweight("bold")
    for lab, i in zip(ax.get_yticklabels(), range(0, nr, sy)):
        if int(row_layers[i]) in prior_all:
            lab.set_fontweight("bold")
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_title(title, fontsize=10.5, pad=12 + 20 * len(marks))
    drawn_prior: set[tuple[int, ...]] = set()
    for k, mk in enumerate(marks):
        rows = _positions(row_layers, mk.task_head_layers)
        cols = _positions(col_layers, mk.task_head_layers)
        if rows and cols:
            ax.add_patch(
                Rectangle(
                    (min(cols), min(rows)),
                    max(cols) - min(cols) + 1,
                    max(rows) - min(rows) + 1,
                    fill=False,
                    edgecolor=mk.color,
                    lw=2.0,
                    ls="--",
                    zorder=5,
                )
            )
        if cols:  # bracket above the plot: the task head's blocks on the x axis
            y = 1.015 + 0.075 * k
            ax.plot(
                [min(cols), max(cols) + 1],
                [y, y],
                color=mk.color,
                lw=3.5,
                solid_capstyle="butt",
                transform=ax.get_xaxis_transform(),
                clip_on=False,
            )
            right = min(cols) > nc * 0.6  # a late task head: label ends at its last block
            ax.text(
                max(cols) + 1 if right else min(cols),
                y + 0.008,
                f"task head {mk.label} (K_t={len(mk.task_head_layers)})",
                color=mk.color,
                fontsize=7.5,
                ha="right" if right else "left",
                va="bottom",
                transform=ax.get_xaxis_transform(),
                clip_on=False,
            )
        if rows:
            x = 1.015 + 0.03 * k
            ax.plot(
                [x, x],
                [min(rows), max(rows) + 1],
                color=mk.color,
                lw=3.5,
                solid_capstyle="butt",
                transform=ax.get_yaxis_transform(),
                clip_on=False,
            )
        key = tuple(mk.prior_layers)
        if key and key not in drawn_prior:
            drawn_prior.add(key)
            px = [c + 0.5 for c in _positions(col_layers, mk.prior_layers)]
            py = [r + 0.5 for r in _positions(row_layers, mk.prior_layers)]
            ax.plot(
                px,
                [-0.028] * len(px),
                "^",
                color=PRIOR_COLOR,
                ms=6,
                mec="black",
                mew=0.5,
                transform=ax.get_xaxis_transform(),
                clip_on=False,
                zorder=6,
            )
            ax.plot(
                [-0.028] * len(py),
                py,
                ">",
                color=PRIOR_COLOR,
                ms=6,
                mec="black",
                mew=0.5,
                transform=ax.get_yaxis_transform(),
                clip_on=False,
                zorder=6,
                label="prior layers",
            )
    if drawn_prior:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), frameon=False, fontsize=7.5, handletextpad=0.3)
    fig.tight_layout()
    return fig


def same_layer_figure(
    layers: Sequence[int],
    curves: dict[str, np.ndarray],
    marks: dict[str, SplitMarks],
    *,
    thresholds: dict[str, float | None] | None = None,
    pretrained: str = "pretrained",
    se: dict[str, np.ndarray] | None = None,
) -> Figure:
    """Per task, CKA(pretrained block l, task copy block l) against l, one panel per task.

    curves: task -> (n,) values at ``layers``; se: task -> (n,) their SE, drawn as a +-2 SE band
    where finite. The divergence start is a vertical line, the task head's blocks are shaded, and
    the plateau's upper noise bound (1 - threshold) is dotted where known.
    """
    tasks = list(curves)
    fig = Figure(figsize=(max(4.6, 3.9 * len(tasks)), 3.7))
    axes = fig.subplots(1, len(tasks), sharey=True, squeeze=False)
    x = np.asarray(layers)
    for ax, t in zip(axes[0], tasks):
        mk = marks.get(t)
        color = mk.color if mk else PALETTE[0]
        y = np.asarray(curves[t], dtype=np.float64)
        if mk and mk.task_head_layers:
            ax.axvspan(
                min(mk.task_head_layers) - 0.5,
                max(mk.task_head_layers) + 0.5,
                color=color,
                alpha=0.12,
                lw=0,
                label=f"task head (K_t={len(mk.task_head_layers)})",
            )
        ax.plot(x, y, "o-", color=color, ms=4, lw=1.6, label=f"CKA({pretrained}, {t})")
        band = (se or {}).get(t)
        if band is not None and np.isfinite(band).any():
            b = np.where(np.isfinite(band), band, 0.0)
            ax.fill_between(x, y - 2 * b, np.minimum(y + 2 * b, 1.0), color=color, alpha=0.25, lw=0, label="\u00b12 SE")
        thr = (thresholds or {}).get(t)
        if thr is not None:
            ax.axhline(1.0 - thr, color="grey", ls=":", lw=1, label="top of the plateau's noise band")
        if mk and mk.divergence_start is not None:
            ax.axvline(mk.divergence_start - 0.5, color="black", ls="--", lw=1.2)
            ax.annotate(
                f"diverges from block {mk.divergence_start}",
                xy=(mk.divergence_start - 0.5, 0.5),
                xycoords=("data", "axes fraction"),
                xytext=(-3, 0),
                textcoords="offset points",
                ha="right",
                va="center",
                rotation=90,
                fontsize=7.5,
            )
        if mk and mk.prior_layers:
            ax.plot(
                mk.prior_layers,
                [0.0] * len(mk.prior_layers),
                "^",
                color=PRIOR_COLOR,
                mec="black",
                mew=0.5,
                ms=6,
                transform=ax.get_xaxis_transform(),
                clip_on=False,
                label="prior layers",
            )
        ax.set_title(f"{t}: same-layer CKA with {pretrained}", fontsize=10)
        ax.set_xlabel("block")
        ax.set_xticks(x[:: _tick_step(len(x))])
        ax.set_ylim(min(0.0, np.nanmin(y) - 0.05) if np.isfinite(y).any() else 0.0, 1.04)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    axes[0][0].set_ylabel("CKA (same block)")
    fig.tight_layout()
    return fig


def cross_task_figure(layers: Sequence[int], pairs: dict[str, np.ndarray], references: dict[str, np.ndarray]) -> Figure:
    """Same-layer CKA between task copies (solid, one line per pair ``"a vs b"``) and, for
    reference, between the pretrained model and each copy (dashed). Values at ``layers``."""
    fig = Figure(figsize=(6.4, 3.4))
    ax = fig.subplots()
    x = np.asarray(layers)
    for i, (name, y) in enumerate(pairs.items()):
        ax.plot(x, y, "o-", color=PALETTE[(i + 4) % len(PALETTE)], lw=1.8, ms=4, label=name)
    for i, (name, y) in enumerate(references.items()):
        ax.plot(x, y, "--", color=task_color(i), lw=1.1, alpha=0.8, label=name)
    ax.set_xlabel("block")
    ax.set_ylabel("CKA (same block)")
    ax.set_xticks(x[:: _tick_step(len(x))])
    lo = min(
        [0.0] + [float(np.nanmin(v)) for v in list(pairs.values()) + list(references.values()) if np.isfinite(v).any()]
    )
    ax.set_ylim(lo - 0.02 if lo < 0 else 0.0, 1.04)
    ax.grid(alpha=0.3)
    ax.set_title("Same-layer CKA between task copies", fontsize=10)
    ax.legend(fontsize=7.5, loc="lower left")
    fig.tight_layout()
    return fig


def pca_grid_figure(
    input_image: np.ndarray | None,
    tiles: dict[str, dict[int, np.ndarray]],
    layers: Sequence[int],
    *,
    title: str | None = None,
) -> Figure:
    """PCA maps of one probe image: rows = models, columns = layers (``tiles[model][layer]`` are
    (H, W, 3) uint8 images), the probe image itself in an extra first column (first row only).
    Laid out by hand (fixed cell size, label margins) so the tiles fill their cells."""
    models = list(tiles)
    extra = 1 if input_image is not None else 0
    ncols, nrows = len(layers) + extra, len(models)
    first = next((t for m in models for t in tiles[m].values()), None)
    aspect = first.shape[0] / first.shape[1] if first is not None else 1.0  # tile height / width
    cw = 1.0 if ncols <= 10 else max(0.55, 10.0 / ncols)  # cell width, inches
    ch, gap, left, top, sep = cw * aspect, 0.05, 1.0, 0.3 + (0.25 if title else 0.0), 0.15 if extra else 0.0
    width = left + ncols * cw + (ncols - 1) * gap + sep + 0.1
    height = top + nrows * ch + (nrows - 1) * gap + 0.1
    fig = Figure(figsize=(width, height))
    for r, name in enumerate(models):
        y = height - top - (r + 1) * ch - r * gap
        for c in range(ncols):
            j = c - extra
            if j < 0 and r > 0:
                continue
            x = left + c * (cw + gap) + (sep if j >= 0 else 0.0)
            ax = fig.add_axes((x / width, y / height, cw / width, ch / height))
            ax.set_axis_off()
            if j < 0:
                ax.imshow(input_image, aspect="auto")
                label = "image"
            else:
                tile = tiles[name].get(int(layers[j]))
                if tile is not None:
                    ax.imshow(tile, interpolation="nearest", aspect="auto")
                label = f"L{layers[j]}"
            if r == 0:
                ax.text(0.5, 1.03, label, transform=ax.transAxes, ha="center", va="bottom", fontsize=8)
        fig.text((left - 0.08) / width, (y + ch / 2) / height, name, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.12 / height)
    return fig


def _smooth(y: np.ndarray, n: int) -> np.ndarray:
    """Trailing mean over ``n`` points (shorter at the start)."""
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(0, idx - n)
    return (c[idx] - c[lo]) / (idx - lo)


def training_curves_figure(
    series: dict[str, tuple[Sequence[float], Sequence[float]]], *, ylabel: str, title: str, log_y: bool = False
) -> Figure:
    """One line per training run: ``series[label] = (iters, values)``. Noisy series (over 40 points)
    are drawn faint with a trailing mean over ~5% of the points on top."""
    fig = Figure(figsize=(6.4, 3.3))
    ax = fig.subplots()
    for i, (label, (x, y)) in enumerate(series.items()):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        color = task_color(i)
        if len(y) > 40:
            ax.plot(x, y, color=color, alpha=0.25, lw=0.8)
            ax.plot(x, _smooth(y, max(2, len(y) // 20)), color=color, lw=1.8, label=label)
        else:
            ax.plot(x, y, "o-" if len(y) < 15 else "-", color=color, lw=1.6, ms=3.5, label=label)
    allv = np.concatenate([np.asarray(v[1], dtype=np.float64) for v in series.values()]) if series else np.ones(1)
    if log_y and np.all(allv > 0) and allv.max() / allv.min() > 20:  # log only where it spans decades
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5)
    fig.tight_layout()
    return fig


def final_metric_figure(
    labels: Sequence[str], values: Sequence[float], *, metric: str, higher_is_better: bool, notes: Sequence[str] = ()
) -> Figure:
    """Horizontal bars: the final ``metric`` of each training run (``notes[i]``, e.g. its trainable
    parameters, written after the value)."""
    n = len(labels)
    fig = Figure(figsize=(6.4, 0.9 + 0.42 * n))
    ax = fig.subplots()
    v = np.asarray(values, dtype=np.float64)
    best = int(np.argmax(v) if higher_is_better else np.argmin(v))
    colors = [PALETTE[0] if i == best else "#9aa5b8" for i in range(n)]
    y = np.arange(n)[::-1]
    ax.barh(y, v, color=colors, height=0.62)
    ax.set_yticks(y, list(labels), fontsize=8.5)
    span = float(np.nanmax(np.abs(v))) if n else 1.0
    for yi, vi, note in zip(y, v, list(notes) + [""] * (n - len(notes))):
        ax.text(vi + 0.01 * span, yi, f"{vi:.2f}" + (f"  ({note})" if note else ""), va="center", fontsize=8)
    ax.set_xlim(0, span * 1.45 if span > 0 else 1.0)
    ax.set_xlabel(f"{metric} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.set_title(f"Final {metric} per run", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig
