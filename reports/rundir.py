"""Reading an analysis run directory for the report, defensively (docs/run-directory.md).

Only ``RUN`` itself must exist. Every part is optional and read on its own: a part that is missing or
unreadable is left out of the report (and named in :attr:`RunData.problems`), never a crash:

- ``RUN/config.json``: the options, versions, weights source and hashes, time taken (analyze).
- ``RUN/cka.npz``: the CKA matrices, read with ``cka_split``'s ``CKAResult.load``.
- ``RUN/recommendation.json``: :meth:`cka_split.decision.recommend.SplitRecommendation.to_json`'s layout.
- ``RUN/pca/index.json``: :func:`cka_split.probes.pca.pca_maps`'s index (file names relative to ``RUN/pca``).
- Linked training runs: see :mod:`cka_split.reports.training`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class CKAView:
    """What the report draws from a :class:`cka_split.estimator.result.CKAResult`, as numpy: model names,
    layers per model, ``matrix(a, b)`` (L_a, L_b) float64, and the estimator's settings."""

    def __init__(self, result: Any):
        self.result = result
        self.models = [str(m) for m in result.models]
        self.layers = {str(m): [int(x) for x in result.layers[m]] for m in result.models}
        self.num_images = _int_or_none(getattr(result, "num_images", None))
        self.features = getattr(result, "features", None)
        self.unbiased = _bool_or_none(getattr(result, "unbiased", None))

    def matrix(self, a: str, b: str) -> np.ndarray:
        """(L_a, L_b) float64: CKA between every listed block of model ``a`` and of model ``b``."""
        if a not in self.layers or b not in self.layers:
            raise KeyError(
                f"no model '{a if a not in self.layers else b}' in the CKA result (it has {', '.join(self.models)})"
            )
        return self.result.matrix(a, b).detach().cpu().numpy().astype(np.float64)

    def se(self, a: str, b: str) -> np.ndarray:
        """(L_a, L_b) float64 jackknife SE of :meth:`matrix`; NaN where the file has none."""
        se = getattr(self.result, "se", None)
        if se is None:
            return np.full((len(self.layers[a]), len(self.layers[b])), np.nan)
        return se(a, b).detach().cpu().numpy().astype(np.float64)

    @property
    def se_batches(self) -> int:
        return int(getattr(self.result, "se_batches", 0) or 0)


def _int_or_none(v: Any) -> int | None:
    try:
        return None if v is None else int(np.asarray(v).item())
    except (TypeError, ValueError):
        return None


def _bool_or_none(v: Any) -> bool | None:
    return None if v is None else bool(np.asarray(v).item())


def load_cka(path: str | Path) -> CKAView:
    """``RUN/cka.npz`` through the CKA engine's own reader (:meth:`cka_split.estimator.result.CKAResult.load`)."""
    from cka_split.estimator.result import CKAResult

    return CKAView(CKAResult.load(path))


@dataclass
class RunData:
    """Everything the report shows, read from one run directory; ``None`` where a part is missing."""

    run_dir: Path
    config: dict[str, Any] | None = None
    cka: CKAView | None = None
    recommendation: dict[str, Any] | None = None
    pca: dict[str, Any] | None = None
    pca_photos: dict[str, Any] | None = None  # RUN/pca/photos/index.json: the same maps on photographs
    training: list = field(default_factory=list)  # cka_split.reports.training.TrainingRun
    sweeps: list = field(default_factory=list)  # cka_split.reports.sweep.Sweep
    problems: list[str] = field(default_factory=list)

    @property
    def pca_dir(self) -> Path:
        return self.run_dir / "pca"


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{path.name} could not be read ({e}); its part of the report is left out.")
        return None
    if not isinstance(d, dict):
        problems.append(f"{path.name} does not hold a JSON object; its part of the report is left out.")
        return None
    return d


def read_json_file(path: Path, problems: list[str]) -> dict[str, Any] | None:
    """A JSON object from ``path``; None (and a line in ``problems``) if missing or unreadable."""
    return _read_json(path, problems)


def read_run(run_dir: str | Path) -> RunData:
    """Read every part of ``run_dir`` that exists (training runs are added by the caller)."""
    run = Path(run_dir)
    data = RunData(run_dir=run)
    data.config = _read_json(run / "config.json", data.problems)
    if data.config is None and not (run / "config.json").exists():
        data.problems.append(
            "config.json is missing, so where the weights came from, the data and the versions are unknown."
        )
    data.recommendation = _read_json(run / "recommendation.json", data.problems)
    if data.recommendation is not None and not isinstance(data.recommendation.get("per_task"), dict):
        data.problems.append("recommendation.json has no per_task table; the recommendation is left out.")
        data.recommendation = None
    if data.recommendation is not None:
        _drop_unusable_tasks(data.recommendation, data.problems)
    if (run / "cka.npz").is_file():
        try:
            data.cka = load_cka(run / "cka.npz")
        except Exception as e:  # any unreadable npz: report it, keep going
            data.problems.append(f"cka.npz could not be read ({type(e).__name__}: {e}); the CKA figures are left out.")
    else:
        data.problems.append(
            "cka.npz is missing, so the CKA heatmaps and curves are left out; rerun 'cka-split analyze' to make it."
        )
    pca = _read_json(run / "pca" / "index.json", data.problems)
    if pca is not None and isinstance(pca.get("images"), list):
        data.pca = pca
    photos = _read_json(run / "pca" / "photos" / "index.json", data.problems)
    if photos is not None and isinstance(photos.get("images"), list):
        data.pca_photos = photos
    return data


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _drop_unusable_tasks(rec: dict[str, Any], problems: list[str]) -> None:
    """Remove from ``rec["per_task"]`` every task whose K_t is not a block count (NaN, a string, < 1,
    more than the model's blocks) or whose prior layers are not block indices, naming each in ``problems``:
    the report must not print a split that is not one."""
    num_layers = rec.get("num_layers")
    for task, s in list(rec["per_task"].items()):
        k_t = s.get("k_t") if isinstance(s, dict) else None
        prior = s.get("prior_layers") if isinstance(s, dict) else None
        if not _is_index(k_t) or k_t < 1 or (_is_index(num_layers) and k_t > num_layers):
            why = f"k_t {k_t!r}"
        elif not isinstance(prior, list) or not all(_is_index(i) and i >= 0 for i in prior):
            why = f"prior_layers {prior!r}"
        else:
            continue
        problems.append(
            f"recommendation.json gives {why} for {task}, which is not a split of "
            f"{num_layers if _is_index(num_layers) else 'the'} blocks; that recommendation is left out "
            "(rerun 'cka-split recommend')."
        )
        del rec["per_task"][task]


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def slug(text: str) -> str:
    """A string usable as an HTML id."""
    return _SAFE.sub("-", text).strip("-") or "x"
