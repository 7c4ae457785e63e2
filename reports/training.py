"""Training runs linked to an analysis run, and what the report shows of them.

A training run is a directory that ``cka-split train`` wrote (docs/run-directory.md): ``OUT/config.json``
(every resolved option), ``OUT/metrics.jsonl`` (one JSON object per logged step, with ``"iter"``) and
``OUT/eval.json`` (final metrics). Which training runs belong to an analysis run ``RUN``:

1. the directories given explicitly (``build_report(RUN, training_runs=[...])``, ``cka-split report
   RUN --training DIR``), always shown;
2. every sub-directory of ``RUN/training/`` that holds a ``config.json``, always shown;
3. every sibling of ``RUN`` (a directory beside it, e.g. ``runs/train`` beside ``runs/<time>``) whose
   ``config.json`` names ``RUN``: ``vitsplit.train`` records ``"split_source": "recommendation
   RUN/recommendation.json"`` (the resolved path, so a later ``runs/latest`` cannot mislead) for
   ``--auto-split``; without it, a path under one of :data:`LINK_KEYS` (``"auto_split"``, the option
   as given) at the top level or under ``"options"``, resolved as written, then relative to the
   training run and to its parent, following ``latest`` symlinks and text files;
4. the baselines of those runs: a non-ViT-Split run (``--auto-split`` is for ViT-Split only) beside a
   run found by 3, with the same task, model, data, iterations, crop and batch size; a ViT-Adapter
   run (:data:`OWN_BACKBONE_METHODS`) may use another model, as the paper's comparison puts ViT-Adapter
   on its released DeiT/AugReg backbones, and its label names that model.

Numbers are read by name, first match wins, so that a renamed key shows as "-" rather than a wrong
value: see :data:`PARAM_KEYS`, :data:`STEP_TIME_KEYS`, :data:`MEMORY_KEYS` and :data:`METRIC_KEYS`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .rundir import read_json_file

LINK_KEYS = ("auto_split_run", "analysis_run", "auto_split", "split_run")
PARAM_KEYS = ("trainable_params", "num_trainable_params", "trainable_parameters", "params_trainable")
STEP_TIME_KEYS = (
    "step_time_s",
    "step_time",
    "sec_per_iter",
    "time_per_iter",
    "seconds_per_step",
    "step_seconds",
    "iter_time",
)
RATE_KEYS = ("it_s", "it_per_sec", "iters_per_sec", "its")  # iterations per second (metrics.jsonl rows)
SAME_SETUP = ("task", "model", "data", "iters", "crop", "batch_size")  # what a baseline must share
OWN_BACKBONE_METHODS = ("vit-adapter", "vit-comer")  # baselines compared on their own backbones (any "model")
MEMORY_KEYS = (
    "peak_memory_mb",
    "peak_mem_mb",
    "peak_memory",
    "max_memory_mb",
    "peak_rss_mb",
    "peak_memory_bytes",
    "peak_mem_bytes",
)
# Final metric per task, in order of preference, with whether larger is better.
METRIC_KEYS = {
    "seg": (("mIoU", True), ("aAcc", True)),
    "det": (("bbox_mAP", True), ("mAP", True), ("bbox", True), ("segm_mAP", True)),
    "depth": (("AbsRel", False), ("abs_rel", False), ("RMSE", False), ("rmse", False), ("delta1", True)),
}
_NOT_CURVES = {"iter", "step", "epoch", "lr", "time", "elapsed", "eta", "rank", "world_size", *RATE_KEYS}


@dataclass
class TrainingRun:
    """One training run as the report shows it."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, Any] | None = None

    def option(self, key: str) -> Any:
        """A config value at the top level or under ``options``."""
        if key in self.config:
            return self.config[key]
        opts = self.config.get("options")
        return opts.get(key) if isinstance(opts, dict) else None

    @property
    def method(self) -> str:
        return str(self.option("method") or "?")

    @property
    def task(self) -> str:
        return str(self.option("task") or "?")

    @property
    def label(self) -> str:
        """``method (task)`` plus K_t for ViT-Split, `` + head`` for a non-linear head (UperNet), the
        backbone for ViT-Adapter (compared on its own), and the directory name if two would read alike."""
        head = self.option("head")
        name = self.method + (f" + {head}" if head not in (None, "linear") else "")
        if self.method in OWN_BACKBONE_METHODS and self.option("model"):
            name += f" on {self.option('model')}"
        text = f"{name} ({self.task})"
        if self.method == "vitsplit" and self.option("k_t") is not None:
            text = f"vitsplit K_t={self.option('k_t')} ({self.task})"
        return text

    def _first(self, keys: Iterable[str]) -> tuple[str, Any] | None:
        for source in (
            self.eval or {},
            self.config,
            self.config.get("options") or {},
            self.config.get("resolved") or {},
        ):
            if not isinstance(source, dict):
                continue
            for k in keys:
                if _number(source.get(k)) is not None:
                    return k, source[k]
        return None

    @property
    def trainable_params(self) -> int | None:
        hit = self._first(PARAM_KEYS)
        if hit is not None:
            return int(hit[1])
        vals = [_number(r.get(k)) for r in self.metrics for k in PARAM_KEYS if k in r]
        return int(vals[-1]) if vals and vals[-1] is not None else None

    @property
    def step_time(self) -> float | None:
        """Seconds per optimisation step: a recorded value, else the median over metrics.jsonl rows
        (their ``step_time``-like keys, or 1 / ``it_s``, the rate over each logging window; the
        median is robust to the slow first window), else eval.json's ``train_seconds / iters``."""
        hit = self._first(STEP_TIME_KEYS)
        if hit is not None:
            return float(hit[1])
        vals = []
        for r in self.metrics:
            v = next((_number(r.get(k)) for k in STEP_TIME_KEYS if _number(r.get(k)) is not None), None)
            if v is None:
                ips = next((_number(r.get(k)) for k in RATE_KEYS if _number(r.get(k))), None)
                v = 1.0 / ips if ips else None
            if v is not None:
                vals.append(v)
        if vals:
            vals.sort()
            return vals[len(vals) // 2]
        secs, iters = _number((self.eval or {}).get("train_seconds")), _number((self.eval or {}).get("iters"))
        return secs / iters if secs is not None and iters else None

    @property
    def peak_memory_mb(self) -> float | None:
        hit = self._first(MEMORY_KEYS)
        if hit is None:
            vals = [(k, _number(r.get(k))) for r in self.metrics for k in MEMORY_KEYS if _number(r.get(k)) is not None]
            if not vals:
                return None
            hit = max(vals, key=lambda kv: kv[1])
        key, v = hit
        return float(v) / 2**20 if key.endswith("bytes") else float(v)

    @property
    def final_metric(self) -> tuple[str, float, bool] | None:
        """(name, value, larger_is_better) from eval.json (nested "metrics" too), else the last logged."""
        sources = [self.eval or {}, (self.eval or {}).get("metrics") or {}]
        sources += [r for r in reversed(self.metrics)]
        keys = METRIC_KEYS.get(self.task, ()) + tuple(
            kv for t, kvs in METRIC_KEYS.items() if t != self.task for kv in kvs
        )
        for src in sources:
            if not isinstance(src, dict):
                continue
            for k, higher in keys:
                v = _number(src.get(k))
                if v is not None:
                    return k, v, higher
        return None

    def curves(self) -> dict[str, tuple[list[float], list[float]]]:
        """Numeric series of metrics.jsonl by key: {key: (iters, values)} (loss first)."""
        out: dict[str, tuple[list[float], list[float]]] = {}
        for i, r in enumerate(self.metrics):
            it = _number(r.get("iter", r.get("step", i)))
            for k, v in r.items():
                x = _number(v)
                if k in _NOT_CURVES or x is None or k in STEP_TIME_KEYS or k in MEMORY_KEYS or k in PARAM_KEYS:
                    continue
                out.setdefault(k, ([], []))
                out[k][0].append(it)
                out[k][1].append(x)
        return dict(sorted(out.items(), key=lambda kv: (not kv[0].startswith("loss"), kv[0] != "loss", kv[0])))


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a torn last line (a run still writing) is skipped."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict):
            rows.append(r)
    return rows


def read_training_run(path: str | Path, problems: list[str] | None = None) -> TrainingRun | None:
    """A training run directory, or None if it has no readable config.json."""
    p = Path(path)
    probs = [] if problems is None else problems
    cfg = read_json_file(p / "config.json", probs)
    if cfg is None:
        probs.append(f"training run {p} has no readable config.json; it is left out.")
        return None
    return TrainingRun(
        path=p, config=cfg, metrics=read_metrics(p / "metrics.jsonl"), eval=read_json_file(p / "eval.json", probs)
    )


def _resolve(text: str, base: Path) -> list[Path]:
    """Where a recorded link may point: as written, relative to the training run and its parent."""
    p = Path(text).expanduser()
    cands = [p] if p.is_absolute() else [p, base / p, base.parent / p]
    out = []
    for c in cands:
        if c.is_file():  # a `latest` text file holding a path
            try:
                c = Path(c.read_text(encoding="utf-8").strip())
            except OSError:
                continue
        if c.is_dir():
            out.append(c.resolve())
    return out


_SPLIT_SOURCE = re.compile(r"^recommendation (.+?recommendation\.json)")


def links_to(cfg: dict[str, Any], run_dir: Path, train_dir: Path) -> bool:
    """Whether a training config names ``run_dir``: its ``split_source`` (the resolved recommendation
    file), else a path under one of :data:`LINK_KEYS`."""
    target = run_dir.resolve()
    m = _SPLIT_SOURCE.match(str(cfg.get("split_source") or ""))
    if m:
        return Path(m.group(1)).parent.resolve() == target
    for src in (cfg, cfg.get("options") if isinstance(cfg.get("options"), dict) else {}):
        for k in LINK_KEYS:
            v = src.get(k)
            if isinstance(v, str) and v and target in _resolve(v, train_dir):
                return True
    return False


def find_training_runs(
    run_dir: str | Path, extra: Iterable[str | Path] | None = None, problems: list[str] | None = None
) -> list[TrainingRun]:
    """The training runs linked to ``run_dir`` (module docstring), each once, in a stable order."""
    run = Path(run_dir)
    seen: set[Path] = set()
    found: list[TrainingRun] = []

    def add(p: Path) -> None:
        key = p.resolve()
        if key in seen or key == run.resolve():
            return
        seen.add(key)
        tr = read_training_run(p, problems)
        if tr is not None:
            found.append(tr)

    for p in extra or []:
        add(Path(p))
    sub = run / "training"
    if sub.is_dir():
        for p in sorted(sub.iterdir()):
            if (p / "config.json").is_file():
                add(p)
    parent = run.resolve().parent
    siblings = _run_dirs(parent)
    linked = [p for p, cfg in siblings if p not in seen and links_to(cfg, run, p)]
    for p in linked:
        add(p)
    for lp in linked:  # the baselines beside each linked run
        lcfg = dict(siblings)[lp]
        for p, cfg in siblings if lp.parent == parent else _run_dirs(lp.parent):
            shared = [k for k in SAME_SETUP if not (k == "model" and cfg.get("method") in OWN_BACKBONE_METHODS)]
            if (
                p not in seen
                and cfg.get("method") not in (None, "vitsplit")
                and all(cfg.get(k) == lcfg.get(k) for k in shared)
            ):
                add(p)
    return found


def _run_dirs(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(resolved directory, config) of the directories in ``folder`` that hold a readable config.json."""
    out = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if p.is_dir() and not p.is_symlink() and (p / "config.json").is_file():
            cfg = read_json_file(p / "config.json", [])
            if cfg is not None:
                out.append((p.resolve(), cfg))
    return out
