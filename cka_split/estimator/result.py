"""CKAResult: the CKA matrix of every (model, layer) feature set against every other, and its ``.npz``
file (``RUN/cka.npz`` in ARCHITECTURE.md)."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vitsplit.errors import UserError
from vitsplit.fileio import atomic_write

from .jackknife import jackknife_se

FORMAT_VERSION = 2  # 2 adds the per-minibatch HSIC terms and the jackknife SE; version 1 files still load
READABLE_VERSIONS = (1, 2)


@dataclass
class CKAResult:
    """CKA of all feature sets of one analysis.

    ``models``: names in order; ``layers[name]``: 0-based block indices of that model's feature sets;
    ``full``: (F, F) float64 with F = sum of len(layers[m]), ordered model-major then layer;
    ``num_images``: images seen; ``features``: "tokens" | "mean" | "cls"; ``unbiased``: HSIC_1 or HSIC_0;
    ``batch_hsic``: (B, F, F) float64 per-minibatch HSIC terms (None: unknown, e.g. a version-1 file),
    from which ``full_se`` (F, F), the leave-one-minibatch-out jackknife SE of ``full``, is computed
    (:func:`cka_split.estimator.jackknife.jackknife_se`; NaN where unknown or with fewer than 2 minibatches).
    """

    models: list[str]
    layers: dict[str, list[int]]
    full: torch.Tensor
    num_images: int
    features: str = "tokens"
    unbiased: bool = True
    num_batches: int = 0
    token_subsample: int | None = None
    extra: dict[str, str] = field(default_factory=dict)
    batch_hsic: torch.Tensor | None = None
    full_se: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.full = torch.as_tensor(self.full, dtype=torch.float64)
        f = sum(len(self.layers[m]) for m in self.models)
        if tuple(self.full.shape) != (f, f):
            raise ValueError(f"full has shape {tuple(self.full.shape)}, the layers give {f} feature sets")
        if self.batch_hsic is not None:
            self.batch_hsic = torch.as_tensor(self.batch_hsic, dtype=torch.float64)
            if tuple(self.batch_hsic.shape[1:]) != (f, f):
                raise ValueError(f"batch_hsic has shape {tuple(self.batch_hsic.shape)}, expected (B, {f}, {f})")
            self.full_se = jackknife_se(self.batch_hsic)
        else:
            self.full_se = torch.full((f, f), float("nan"), dtype=torch.float64)

    @property
    def se_batches(self) -> int:
        """Minibatches behind the SE (0 where the per-minibatch terms are unknown)."""
        return 0 if self.batch_hsic is None else int(self.batch_hsic.shape[0])

    def offset(self, model: str) -> int:
        """Row of ``model``'s first feature set in ``full``."""
        if model not in self.layers:
            raise UserError(f"no model '{model}' in this CKA result; it holds {', '.join(self.models)}")
        off = 0
        for m in self.models:
            if m == model:
                return off
            off += len(self.layers[m])
        raise AssertionError("unreachable: model listed in layers but not in models")

    def matrix(self, a: str, b: str) -> torch.Tensor:
        """(L_a, L_b) float64: CKA of model a's layer i (rows) with model b's layer j (columns)."""
        ia, ib = self.offset(a), self.offset(b)
        return self.full[ia : ia + len(self.layers[a]), ib : ib + len(self.layers[b])].clone()

    def se(self, a: str, b: str) -> torch.Tensor:
        """(L_a, L_b) float64 jackknife SE of :meth:`matrix` (a, b); NaN where unknown."""
        ia, ib = self.offset(a), self.offset(b)
        return self.full_se[ia : ia + len(self.layers[a]), ib : ib + len(self.layers[b])].clone()

    def labels(self) -> list[str]:
        """One label per feature set, "model/layer", in the order of ``full``."""
        return [f"{m}/{i}" for m in self.models for i in self.layers[m]]

    # ------------------------------------------------------------------------------------- files
    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` (no pickles): ``full``, ``models``, ``layers_<k>`` for the k-th model,
        ``num_images``, ``num_batches``, ``features``, ``unbiased``, ``token_subsample`` (-1 = all),
        ``format_version``; where known, ``batch_hsic`` (B, F, F) and ``full_se`` (F, F) (for readers
        without this code; loading recomputes it from ``batch_hsic``)."""
        arrays = {
            "full": self.full.numpy(),
            "models": np.array(self.models, dtype=np.str_),
            "num_images": np.array(self.num_images, dtype=np.int64),
            "num_batches": np.array(self.num_batches, dtype=np.int64),
            "features": np.array(self.features, dtype=np.str_),
            "unbiased": np.array(self.unbiased, dtype=np.bool_),
            "token_subsample": np.array(-1 if self.token_subsample is None else self.token_subsample, dtype=np.int64),
            "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
            "extra_keys": np.array(list(self.extra), dtype=np.str_),
            "extra_values": np.array(list(self.extra.values()), dtype=np.str_),
        }
        if self.batch_hsic is not None:
            arrays["batch_hsic"] = self.batch_hsic.numpy()
            arrays["full_se"] = self.full_se.numpy()
        for k, m in enumerate(self.models):
            arrays[f"layers_{k}"] = np.array(self.layers[m], dtype=np.int64)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | Path) -> "CKAResult":
        """Read a file written by :meth:`save` (format 1 or 2; format 1 has no SE: ``full_se`` is NaN)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path} does not exist; run 'cka-split analyze' to write it")
        try:
            with np.load(path, allow_pickle=False) as z:
                version = int(z["format_version"])
                if version not in READABLE_VERSIONS:
                    raise UserError(
                        f"{path} has CKA file format {version}, this version reads "
                        f"{', '.join(map(str, READABLE_VERSIONS))}; rerun 'cka-split analyze'"
                    )
                models = [str(m) for m in z["models"]]
                ts = int(z["token_subsample"])
                return cls(
                    models=models,
                    layers={m: [int(i) for i in z[f"layers_{k}"]] for k, m in enumerate(models)},
                    full=torch.from_numpy(np.array(z["full"], dtype=np.float64)),
                    num_images=int(z["num_images"]),
                    num_batches=int(z["num_batches"]),
                    features=str(z["features"]),
                    unbiased=bool(z["unbiased"]),
                    token_subsample=None if ts < 0 else ts,
                    extra=dict(zip((str(k) for k in z["extra_keys"]), (str(v) for v in z["extra_values"]))),
                    batch_hsic=torch.from_numpy(np.array(z["batch_hsic"], dtype=np.float64))
                    if "batch_hsic" in z.files
                    else None,
                )
        except UserError:
            raise
        except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
            raise UserError(
                f"{path} is not a CKA result file written by cka-split ({e}); rerun 'cka-split analyze'"
            ) from e
