"""The figure sections of the report: CKA heatmaps, same-layer curves, PCA grids, training runs.

Each function takes the :class:`cka_split.reports.rundir.RunData` of a run and returns the figures of its
section as template-ready dicts (PNG data URI, title, caption, id), or nothing where the run
directory lacks that part.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import Any

import numpy as np

from . import figures as F
from .rundir import CKAView, RunData, slug
from .text import dig, fmt_params
from .training import TrainingRun

MAX_PCA_IMAGES = 4
MAX_PCA_LAYERS = 12


def _figure(png: bytes, title: str, caption: str, fig_id: str) -> dict[str, str]:
    return {"uri": F.data_uri(png), "title": title, "caption": caption, "id": fig_id}


def split_marks(data: RunData) -> dict[str, F.SplitMarks]:
    per = (data.recommendation or {}).get("per_task") or {}
    out = {}
    for i, (t, s) in enumerate(per.items()):
        if not isinstance(s, dict):
            continue
        out[t] = F.SplitMarks(
            label=t,
            task_head_layers=[int(x) for x in s.get("task_head_layers") or []],
            prior_layers=[int(x) for x in s.get("prior_layers") or []],
            color=F.task_color(i),
            divergence_start=s.get("divergence_start"),
        )
    return out


def pretrained_name(data: RunData) -> str | None:
    cka = data.cka
    if cka is None:
        return None
    name = (data.recommendation or {}).get("pretrained") or "pretrained"
    return name if name in cka.models else cka.models[0]


def _diag(cka: CKAView, a: str, b: str, se: bool = False) -> tuple[list[int], np.ndarray]:
    """Same-block CKA of models a and b (or its SE) over the blocks both list."""
    la, lb = cka.layers[a], cka.layers[b]
    common = [l for l in la if l in set(lb)]
    m = cka.se(a, b) if se else cka.matrix(a, b)
    ia, ib = {l: i for i, l in enumerate(la)}, {l: i for i, l in enumerate(lb)}
    return common, np.array([m[ia[l], ib[l]] for l in common], dtype=np.float64)


def heatmap_figures(data: RunData) -> list[dict[str, str]]:
    cka, pre = data.cka, pretrained_name(data)
    if cka is None or pre is None:
        return []
    marks = split_marks(data)
    tasks = [m for m in cka.models if m != pre]
    all_marks = [marks[t] for t in tasks if t in marks]
    figs = []
    png = F.png_bytes(
        F.cka_heatmap_figure(
            cka.matrix(pre, pre),
            cka.layers[pre],
            cka.layers[pre],
            title=f"{pre} vs itself",
            row_label=f"{pre} block",
            col_label=f"{pre} block",
            marks=all_marks,
        )
    )
    figs.append(
        _figure(
            png,
            f"{pre}: its own blocks",
            "CKA between every pair of the pretrained model's blocks. Bright squares on the diagonal are "
            "groups of blocks that compute similar features. Dashed squares and bars: each task's "
            "recommended task-head blocks; triangles: the prior layers the prior head reads.",
            "hm-self",
        )
    )
    for t in tasks:
        mk = [marks[t]] if t in marks else []
        png = F.png_bytes(
            F.cka_heatmap_figure(
                cka.matrix(pre, t),
                cka.layers[pre],
                cka.layers[t],
                title=f"{pre} vs {t} copy",
                row_label=f"{pre} block",
                col_label=f"{t} copy block",
                marks=mk,
            )
        )
        figs.append(
            _figure(
                png,
                f"{pre} vs the {t} copy",
                f"CKA between the pretrained model's blocks (rows) and those of its copy fine-tuned for {t} "
                "(columns). Where fine-tuning left a block alone its diagonal cell is near 1; blocks the "
                "task rewrote fade. The task head (dashed) should cover the faded part.",
                f"hm-{slug(t)}",
            )
        )
    for a, b in itertools.combinations(tasks, 2):
        mk = [marks[x] for x in (a, b) if x in marks]
        png = F.png_bytes(
            F.cka_heatmap_figure(
                cka.matrix(a, b),
                cka.layers[a],
                cka.layers[b],
                title=f"{a} copy vs {b} copy",
                row_label=f"{a} copy block",
                col_label=f"{b} copy block",
                marks=mk,
            )
        )
        figs.append(
            _figure(
                png,
                f"The {a} copy vs the {b} copy",
                "CKA between the two task copies. Early blocks they share stay similar; where the two "
                "tasks pulled the model apart the diagonal fades.",
                f"hm-{slug(a)}-{slug(b)}",
            )
        )
    return figs


def se_table(data: RunData) -> dict[str, Any] | None:
    """Same-block CKA +- jackknife SE of the pretrained model against each copy (the diagonals of the
    heatmaps), and the pretrained model's adjacent-block CKA, as a table: {"layers", "rows", "note"}."""
    cka, pre = data.cka, pretrained_name(data)
    if cka is None or pre is None:
        return None

    def cell(v: float, e: float) -> str:
        return f"{v:.4f}" if not np.isfinite(e) else f"{v:.4f} \u00b1 {e:.1g}"

    layers = cka.layers[pre]
    rows = []
    m, e = cka.matrix(pre, pre), cka.se(pre, pre)
    rows.append(
        {
            "label": f"{pre}: block l-1 vs l",
            "cells": ["-"] + [cell(m[i - 1, i], e[i - 1, i]) for i in range(1, len(layers))],
        }
    )
    for t in cka.models:
        if t == pre:
            continue
        common, y = _diag(cka, pre, t)
        if common != layers:
            continue
        ys = _diag(cka, pre, t, se=True)[1]
        rows.append({"label": f"{pre} vs {t}", "cells": [cell(v, s) for v, s in zip(y, ys)]})
    n = cka.se_batches
    note = (
        f"Value \u00b1 leave-one-minibatch-out jackknife SE over {n} minibatches (probe sampling only)."
        if n
        else "This CKA file holds no SE (written before the SE existed); values only."
    )
    return {"layers": layers, "rows": rows, "note": note}


def curve_figures(data: RunData) -> list[dict[str, str]]:
    cka, pre = data.cka, pretrained_name(data)
    per = (data.recommendation or {}).get("per_task") or {}
    marks = split_marks(data)
    curves: dict[str, np.ndarray] = {}
    bands: dict[str, np.ndarray] = {}
    layers: list[int] | None = None
    if cka is not None and pre is not None:
        for t in cka.models:
            if t == pre:
                continue
            common, y = _diag(cka, pre, t)
            if layers is None or common == layers:
                layers = common
                curves[t] = y
                bands[t] = _diag(cka, pre, t, se=True)[1]
    elif per:  # no cka.npz: the recommendation's own divergence curves (d = 1 - CKA)
        for t, s in per.items():
            d = s.get("divergence") if isinstance(s, dict) else None
            if d and all(v is not None for v in d):
                curves[t] = 1.0 - np.asarray(d, dtype=np.float64)
                layers = list(range(len(d)))
                se = s.get("divergence_se") or []
                bands[t] = np.array(
                    [np.nan if v is None else float(v) for v in se] if len(se) == len(d) else [np.nan] * len(d)
                )
        pre = (data.recommendation or {}).get("pretrained") or "pretrained"
    if not curves or layers is None:
        return []
    thresholds = {t: s.get("divergence_threshold") for t, s in per.items() if isinstance(s, dict)}
    has_se = any(np.isfinite(b).any() for b in bands.values())
    se_note = (
        "The band is \u00b12 jackknife SE (probe sampling only, not the fine-tuning's randomness)"
        + (f", from {cka.se_batches} minibatches" if cka is not None and cka.se_batches else "")
        + ". "
        if has_se
        else "No SE is known for this run, so no band is drawn. "
    )
    figs = [
        _figure(
            F.png_bytes(F.same_layer_figure(layers, curves, marks, thresholds=thresholds, pretrained=pre, se=bands)),
            "Same-layer CKA per task",
            "For each task, the CKA of every block with the same block of the pretrained model. "
            + se_note
            + (
                "The dashed line is where the recommendation says the divergence starts (the dotted line: the "
                "highest block before it, at the top of its noise band); "
                if any(m.divergence_start is not None for m in marks.values())
                else "No curve is distinguishable from noise, so no divergence start is marked; "
            )
            + "the shaded blocks are the task head that ViT-Split copies and trains.",
            "curve-same",
        )
    ]
    if cka is not None and pre is not None and len(curves) >= 2:
        pairs = {}
        for a, b in itertools.combinations(list(curves), 2):
            common, y = _diag(cka, a, b)
            if common == layers:
                pairs[f"{a} vs {b}"] = y
        if pairs:
            refs = {f"{pre} vs {t}": y for t, y in curves.items()}
            figs.append(
                _figure(
                    F.png_bytes(F.cross_task_figure(layers, pairs, refs)),
                    "Same-layer CKA between tasks",
                    "Solid: CKA between the task copies at the same block; dashed: each copy against the "
                    "pretrained model. Where the solid line drops, the tasks need different features.",
                    "curve-cross",
                )
            )
    return figs


def _load_png(path: Path, root: Path) -> np.ndarray | None:
    from PIL import Image

    try:
        p = path.resolve()
        if root.resolve() not in p.parents or not p.is_file():
            return None
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError):
        return None


def _pick_layers(layers: list[int], k: int) -> list[int]:
    if len(layers) <= k:
        return layers
    idx = sorted({int(round(i * (len(layers) - 1) / (k - 1))) for i in range(k)})
    return [layers[i] for i in idx]


def pca_figures(data: RunData) -> list[dict[str, str]]:
    """Probe-image PCA grids, then (when the run has them) the same maps on photographs."""
    figs = _pca_set(data.pca, data.pca_dir, "Probe image", "pca")
    if data.pca_photos is not None:
        names = data.pca_photos.get("photo_names") or []
        figs += _pca_set(data.pca_photos, data.pca_dir / "photos", "Photograph", "pca-photo", names, max_images=8)
    return figs


def _pca_set(
    idx: dict[str, Any] | None,
    root: Path,
    title: str,
    anchor: str,
    names: list[str] | None = None,
    max_images: int = MAX_PCA_IMAGES,
) -> list[dict[str, str]]:
    if idx is None:
        return []
    models = [str(m) for m in idx.get("grid_rows") or idx.get("models") or []]
    layers = [int(x) for x in idx.get("grid_cols") or idx.get("layers") or []]
    shown = _pick_layers(layers, MAX_PCA_LAYERS)
    figs = []
    for i, im in enumerate(idx.get("images", [])[:max_images]):
        if not isinstance(im, dict):
            continue
        maps = im.get("maps") or {}
        tiles = {
            m: {l: t for l in shown if (t := _load_png(root / str(dig(maps, m, str(l)) or "-"), root)) is not None}
            for m in models
        }
        tiles = {m: v for m, v in tiles.items() if v}
        inp = _load_png(root / str(im.get("input") or "-"), root)
        cap = (
            "Rows: models; columns: blocks"
            + (f" (every layer of {len(layers)} is in RUN/pca; {len(shown)} shown)" if len(shown) < len(layers) else "")
            + ". One PCA per block, fitted on all models' patch tokens together, first three components as RGB: "
            "within a column, equal colours mean equal features."
        )
        if tiles:
            png = F.png_bytes(F.pca_grid_figure(inp, tiles, shown), dpi=100)
        else:  # only the ready-made grid image: inline it as it is
            grid = _load_png(root / str(im.get("grid") or "-"), root)
            if grid is None:
                continue
            png = _array_png(grid)
            cap = f"Rows: {', '.join(models)}; columns: blocks {', '.join(map(str, layers))}."
        label = f"{title} {i}" + (
            f" ({names[i]}, from scikit-image's bundled data)" if names and i < len(names) else ""
        )
        figs.append(_figure(png, label, cap, f"{anchor}-{i}"))
    return figs


def _array_png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------- training
def training_section(runs: list[TrainingRun]) -> dict[str, Any] | None:
    if not runs:
        return None
    labels = [r.label for r in runs]
    dup = {x for x in labels if labels.count(x) > 1}
    labels = [f"{x} [{r.path.name}]" if x in dup else x for x, r in zip(labels, runs)]
    table = []
    for label, r in zip(labels, runs):
        fm = r.final_metric
        st = r.step_time
        mem = r.peak_memory_mb
        table.append(
            {
                "label": label,
                "method": r.method,
                "task": r.task,
                "params": fmt_params(r.trainable_params),
                "step": "-" if st is None else (f"{st * 1000:.0f} ms" if st < 1 else f"{st:.2f} s"),
                "memory": "-" if mem is None else (f"{mem:,.0f} MB" if mem < 10_000 else f"{mem / 1024:.1f} GB"),
                "metric": "-" if fm is None else f"{fm[0]} {fm[1]:.2f}",
                "iters": _last_iter(r),
                "path": str(r.path),
                "_fm": fm,
            }
        )
    findings = []
    for task in sorted({r.task for r in runs}):
        scored = [row for row, r in zip(table, runs) if r.task == task and row["_fm"] is not None]
        if len(scored) >= 2:
            name, _, higher = scored[0]["_fm"]
            same = [row for row in scored if row["_fm"][0] == name]
            best = (max if higher else min)(same, key=lambda row: row["_fm"][1])
            findings.append(
                f"{task}: the best final {name} is {best['_fm'][1]:.2f}, from {best['label']} "
                f"({'higher' if higher else 'lower'} is better; {len(same)} runs compared)."
            )
    for row in table:
        row.pop("_fm")
    figs = []
    loss = {lab: r.curves()["loss"] for lab, r in zip(labels, runs) if "loss" in r.curves()}
    if loss:
        figs.append(
            _figure(
                F.png_bytes(F.training_curves_figure(loss, ylabel="loss", title="Training loss", log_y=True)),
                "Training loss",
                "Total training loss per logged step"
                + (
                    " (faint: raw; solid: trailing mean over about 5% of the points)."
                    if any(len(v[1]) > 40 for v in loss.values())
                    else "."
                ),
                "train-loss",
            )
        )
    scored = [(lab, r.final_metric, r) for lab, r in zip(labels, runs) if r.final_metric is not None]
    names = {fm[0] for _, fm, _ in scored}
    for name in sorted(names):  # one bar chart per metric name (per task, in practice)
        group = [(lab, fm, r) for lab, fm, r in scored if fm[0] == name]
        notes = [
            f"{fmt_params(r.trainable_params).split(' (')[0]} trainable" if r.trainable_params is not None else ""
            for _, _, r in group
        ]
        fig = F.final_metric_figure(
            [g[0] for g in group], [g[1][1] for g in group], metric=name, higher_is_better=group[0][1][2], notes=notes
        )
        figs.append(
            _figure(
                F.png_bytes(fig),
                f"Final {name}",
                f"{name} of each run's final evaluation (eval.json), "
                "with its trainable parameters; the best run is coloured.",
                f"train-final-{slug(name)}",
            )
        )
    metric_keys: list[str] = []
    for r in runs:
        for k, (_, ys) in r.curves().items():
            if not k.startswith("loss") and len(ys) >= 2 and k not in metric_keys and _is_metric(k):
                metric_keys.append(k)
    for k in metric_keys[:4]:
        series = {lab: r.curves()[k] for lab, r in zip(labels, runs) if k in r.curves()}
        figs.append(
            _figure(
                F.png_bytes(F.training_curves_figure(series, ylabel=k, title=k)),
                k,
                f"{k} as logged during training.",
                f"train-{slug(k)}",
            )
        )
    return {"table": table, "figures": figs, "findings": findings}


def _is_metric(key: str) -> bool:
    k = key.lower()
    return any(s in k for s in ("iou", "acc", "map", "absrel", "abs_rel", "rmse", "delta"))


def _last_iter(r: TrainingRun) -> str:
    its = [row.get("iter") for row in r.metrics if isinstance(row.get("iter"), (int, float))]
    return str(int(max(its))) if its else (str(r.option("iters")) if r.option("iters") is not None else "-")
