"""Linear CKA and the minibatch CKA accumulator for many feature sets at once.

Linear CKA (Kornblith, Norouzi, Lee & Hinton 2019, "Similarity of Neural Network Representations
Revisited", ICML) between X (n, p) and Y (n, q) with linear Gram matrices K = X X^T, L = Y Y^T is

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).

Biased HSIC:   HSIC_0(K, L) = tr(K H L H) / (n - 1)^2, H = I - 11^T / n.
Unbiased HSIC (Song, Smola, Gretton, Bedo & Borgwardt 2012, JMLR, Eq. 5), with K~, L~ the Grams with
zeroed diagonals:

    HSIC_1(K, L) = [tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3)).

HSIC_1 equals <U(K), U(L)>_F / (n (n-3)) where U is the "U-centring" of a Gram matrix (zero the
diagonal, subtract row and column means with the (n-2), 2(n-1) corrections, zero the diagonal again);
Kornblith et al.'s reference code and Nguyen, Raghu & Kornblith 2021 ("Do Wide and Deep Networks Learn
the Same Things?", ICLR; google-research ``representation_similarity/efficient_CKA.py``) use this form.

Minibatch CKA (Nguyen et al. 2021, Sec. 3.1): for minibatches b = 1..B,
CKA = sum_b HSIC_1(K_b, L_b) / sqrt(sum_b HSIC_1(K_b, K_b) * sum_b HSIC_1(L_b, L_b)).
As in efficient_CKA.py, all F x F pairs of one minibatch come from one matrix product of the stacked,
flattened, U-centred Grams, (F, n^2) @ (n^2, F).

Uncertainty: the accumulator also keeps every minibatch's (F, F) HSIC terms, so that every CKA entry
gets a leave-one-minibatch-out jackknife standard error (Quenouille 1956; Tukey 1958; Efron & Stein
1981, "The jackknife estimate of variance", Ann. Statist.): with S = sum_b h_b and theta_(-b) the CKA of
S - h_b, SE = sqrt((B-1)/B * sum_b (theta_(-b) - mean_b theta_(-b))^2). Minibatches are independent
draws of probe images, so this is the delete-a-group jackknife with one group per minibatch (equal
groups: the probe loader drops a short last minibatch). It covers the sampling of the probe images
only, not the randomness of the fine-tuned copies. Memory: F^2 float64 per minibatch.

Numerics: every minibatch's feature set is centred per column before its Gram (on the first example,
see :func:`centered_gram`; a no-op for the centred HSIC in exact arithmetic; it removes the large
shared mean of e.g. DINOv2 activations before any product is formed), and the Grams, their H- or
U-centring and all accumulation are float64.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

from vitsplit.errors import UserError

from .jackknife import jackknife_se
from .result import CKAResult  # noqa: F401  (re-exported: callers import CKAResult from here too)


class BatchTooSmallError(UserError, ValueError):
    """Fewer than 4 examples in a minibatch for the unbiased estimator (its n(n-3) would be <= 0)."""


# float64 elements of one column block (32 MiB): a DINOv2-S/L minibatch of 32 at 224 px (d <= 262,144)
# is one block. Few large operations matter more than cache here: on a shared CPU every small parallel
# operation waits for its threads to be scheduled.
GRAM_BLOCK_ELEMENTS = 1 << 22

# Fewest minibatches from which the jackknife SE is usable, measured by benchmarks/se_coverage.py
# (README, "How the recommendation works"): from 8 minibatches (of 8 or of 32 images) +-2 SE intervals
# cover the reference value in 90-92 % of probe draws (t_7: 91 %) and an SE below half the true SD
# occurs in <= 4.4 % of draws; at 4 minibatches 86-88 % and 9-16 %. Below this the SE is marked unreliable.
MIN_SE_BATCHES = 8


def centered_gram(x: torch.Tensor, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 linear Gram of the features after centring each column on the minibatch's first example.

    x: (n, ...) features of n examples (flattened to (n, d)). Returns G (n, n) float64,
    G = Xs Xs^T with Xs = X - 1 x_0^T (each column minus its value on example 0).
    Any per-column shift is a no-op for both HSIC estimators in exact arithmetic (H K H and U(K) are
    unchanged when a 1^T + 1 b^T is added to K), so after H- or U-centring this is exactly the Gram of
    mean-centred features. Numerically the shift is what matters: it removes a large shared mean
    (DINOv2) before any product is formed, so the float64 products and sums see values of the size of
    the features' spread. Shifting by example 0 rather than by the mean costs no extra pass over the
    data (it happens in the float32 -> float64 copy the product needs anyway), changes magnitudes by
    a factor of about sqrt(2), and turns a constant column into exact zeros (a constant feature set
    gives HSIC exactly 0, reported as NaN, not rounding noise). The subtraction rounds once in the
    input's precision (float32; half types are upcast first), far below the input's own quantisation;
    products and accumulation are float64. Columns go in blocks of ``GRAM_BLOCK_ELEMENTS / n``
    (``workspace``: an optional flat float64 buffer of at least max(n, GRAM_BLOCK_ELEMENTS) elements on
    x's device, reused across calls).
    """
    n = x.shape[0]
    x = x.detach().reshape(n, -1)
    with torch.autocast(x.device.type, enabled=False):
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        d = x.shape[1]
        block = max(1, min(d, GRAM_BLOCK_ELEMENTS // n))
        if workspace is None or workspace.numel() < n * block:
            workspace = torch.empty(n * block, dtype=torch.float64, device=x.device)
        gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)
        for start in range(0, d, block):
            cols = x[:, start : start + block]
            xs = torch.sub(cols, cols[:1], out=workspace[: cols.numel()].view(cols.shape))
            gram.addmm_(xs, xs.T)
        return gram


class GramWorkspace:
    """``centered_gram`` with one reusable float64 block buffer per device: a callable
    (n, ...) -> (n, n) float64 for use inside forward hooks."""

    def __init__(self) -> None:
        self.buffers: dict[torch.device, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(x.device)
        if buf is None or buf.numel() < x.shape[0]:  # centered_gram needs n * block <= max(n, BLOCK)
            size = max(GRAM_BLOCK_ELEMENTS, x.shape[0])
            buf = self.buffers[x.device] = torch.empty(size, dtype=torch.float64, device=x.device)
        return centered_gram(x, buf)


def u_centre(gram: torch.Tensor) -> torch.Tensor:
    """U-centring of Gram matrices (Song et al. 2012; Kornblith et al. 2019 reference code).

    gram: (F, n, n) symmetric float64, n >= 4. Returns (F, n, n) with <U(K), U(L)> / (n(n-3)) the
    unbiased HSIC_1(K, L).
    """
    n = gram.shape[-1]
    g = gram.clone()
    g.diagonal(dim1=-2, dim2=-1).zero_()
    means = g.sum(dim=-1) / (n - 2)  # (F, n)
    means -= means.sum(dim=-1, keepdim=True) / (2 * (n - 1))
    g -= means[:, :, None]
    g -= means[:, None, :]
    g.diagonal(dim1=-2, dim2=-1).zero_()
    return g


def h_centre(gram: torch.Tensor) -> torch.Tensor:
    """Double centring H K H of Gram matrices (F, n, n) -> (F, n, n); <HKH, HLH> = tr(KHLH)."""
    g = gram - gram.mean(dim=-1, keepdim=True)
    return g - g.mean(dim=-2, keepdim=True)


def _cka_from_hsic(hsic: torch.Tensor) -> torch.Tensor:
    """(F, F) summed HSIC -> (F, F) CKA; NaN (with a warning) where HSIC_xx * HSIC_yy <= 0."""
    d = torch.diagonal(hsic)
    denom = d[:, None] * d[None, :]
    bad = ~(denom > 0)
    out = hsic / torch.sqrt(denom.clamp_min(0))
    if bool(bad.any()):
        dead = [i for i in range(d.numel()) if not d[i] > 0]
        warnings.warn(
            f"CKA is undefined for feature set(s) {dead}: they do not vary over the examples "
            "(HSIC(X, X) = 0); those rows and columns are NaN",
            RuntimeWarning,
            stacklevel=3,
        )
        out = torch.where(bad, torch.full_like(out, float("nan")), out)
    return out


class MinibatchCKA:
    """All-pairs minibatch CKA accumulator over F feature sets (Nguyen et al. 2021).

    ``update([f_1, ..., f_F])`` takes one minibatch, every f_i (n, ...) with the same n;
    ``compute()`` -> (F, F) float64, ``compute_se()`` -> its (F, F) jackknife SE. State: the (F, F)
    float64 sum of per-minibatch HSIC, every minibatch's (F, F) term (``batch_hsic``, for the SE), the
    number of minibatches and of examples. ``unbiased=False`` sums the biased HSIC_0 instead (a full-batch
    estimator applied per minibatch; with one minibatch it is Kornblith et al.'s biased linear CKA).
    """

    def __init__(self, unbiased: bool = True):
        self.unbiased = bool(unbiased)
        self.reset()

    def reset(self) -> None:
        self.hsic: torch.Tensor | None = None  # (F, F) float64, sum over minibatches
        # per-minibatch (F, F) terms in minibatch order; None once they are unknown (a state saved
        # without them was loaded), and the SE is then NaN
        self.batch_hsic: list[torch.Tensor] | None = []
        self.num_batches = 0
        self.num_examples = 0

    @property
    def num_sets(self) -> int:
        return 0 if self.hsic is None else int(self.hsic.shape[0])

    def update(self, features: Sequence[torch.Tensor]) -> None:
        """One minibatch: features[i] (n, ...) for each of the F feature sets (same n for all)."""
        if len(features) == 0:
            raise ValueError("update() needs at least one feature set")
        n = int(features[0].shape[0])
        for i, f in enumerate(features):
            if int(f.shape[0]) != n:
                raise ValueError(
                    f"feature set {i} has {f.shape[0]} examples, feature set 0 has {n}; "
                    "all feature sets of one minibatch must hold the same examples"
                )
        self.check_batch_size(n)
        self.update_grams(torch.stack([centered_gram(f) for f in features]))

    def check_batch_size(self, n: int) -> None:
        if self.unbiased and n < 4:
            raise BatchTooSmallError(
                f"the unbiased CKA estimator needs at least 4 examples per minibatch, got {n}; "
                "use a larger batch size (and drop a last minibatch smaller than 4)"
            )
        if n < 2:
            raise BatchTooSmallError(f"CKA needs at least 2 examples per minibatch, got {n}; use a larger batch size")

    def update_grams(self, grams: torch.Tensor) -> None:
        """One minibatch given as Grams of centred features, (F, n, n) (see :func:`centered_gram`)."""
        f, n = int(grams.shape[0]), int(grams.shape[-1])
        self.check_batch_size(n)
        if self.hsic is not None and f != self.num_sets:
            raise ValueError(f"this accumulator holds {self.num_sets} feature sets, the update has {f}")
        with torch.autocast(grams.device.type, enabled=False):
            grams = grams.to(torch.float64)
            if self.unbiased:
                flat = u_centre(grams).reshape(f, n * n)
                scale = n * (n - 3)
            else:
                flat = h_centre(grams).reshape(f, n * n)
                scale = (n - 1) ** 2
            batch = (flat @ flat.T) / scale  # (F, F): every pair in one product
        if self.hsic is None:
            self.hsic = torch.zeros(f, f, dtype=torch.float64, device=grams.device)
        batch = batch.to(self.hsic.device)
        self.hsic += batch
        if self.batch_hsic is not None:
            self.batch_hsic.append(batch)
        self.num_batches += 1
        self.num_examples += n

    def compute(self) -> torch.Tensor:
        """(F, F) float64 CKA matrix (on the CPU); NaN + RuntimeWarning where undefined."""
        if self.hsic is None:
            raise ValueError("compute() before any update(): no minibatch has been seen")
        return _cka_from_hsic(self.hsic.detach().to("cpu", torch.float64))

    def batch_terms(self) -> torch.Tensor | None:
        """(B, F, F) float64 per-minibatch HSIC terms on the CPU, or None where they are unknown."""
        if self.batch_hsic is None or self.hsic is None:
            return None
        return torch.stack(self.batch_hsic).detach().to("cpu", torch.float64)

    def compute_se(self) -> torch.Tensor:
        """(F, F) float64 leave-one-minibatch-out jackknife SE of :meth:`compute` (on the CPU); NaN
        with fewer than 2 minibatches or when the per-minibatch terms are unknown."""
        if self.hsic is None:
            raise ValueError("compute_se() before any update(): no minibatch has been seen")
        terms = self.batch_terms()
        if terms is None:
            return torch.full((self.num_sets, self.num_sets), float("nan"), dtype=torch.float64)
        return jackknife_se(terms)

    # ------------------------------------------------------------------------- resume and DDP
    def state_dict(self) -> dict[str, Any]:
        return {
            "unbiased": self.unbiased,
            "num_batches": self.num_batches,
            "num_examples": self.num_examples,
            "hsic": None if self.hsic is None else self.hsic.detach().cpu().clone(),
            "batch_hsic": self.batch_terms(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if bool(state["unbiased"]) != self.unbiased:
            raise ValueError(
                f"state was accumulated with unbiased={state['unbiased']}, "
                f"this accumulator has unbiased={self.unbiased}"
            )
        h = state["hsic"]
        self.hsic = None if h is None else torch.as_tensor(h, dtype=torch.float64).clone()
        self.num_batches = int(state["num_batches"])
        self.num_examples = int(state["num_examples"])
        terms = state.get("batch_hsic")  # absent in states saved before the SE existed
        if self.hsic is None:
            self.batch_hsic = []
        elif terms is None or int(terms.shape[0]) != self.num_batches:
            self.batch_hsic = None
        else:
            t = torch.as_tensor(terms, dtype=torch.float64).to(self.hsic.device)
            self.batch_hsic = [t[i].clone() for i in range(t.shape[0])]

    def all_reduce(self, group: Any = None) -> None:
        """Combine the ranks of ``torch.distributed`` (call once, after every rank's last update).

        Every rank's per-minibatch terms are gathered and put in the global minibatch order of
        round-robin sharding (rank r's k-th minibatch is minibatch k * W + r, as in
        :func:`cka_split.estimator.analysis.analyze`); the HSIC sum is then re-added in that order, so every rank
        holds the single-process sums, terms, CKA and SE. Each rank must have the same F; a rank with
        no minibatch contributes nothing. If any rank lost its terms (an old state was loaded) the
        HSIC sums are all-reduced and the SE is NaN."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size(group)
        home = self.hsic.device if self.hsic is not None else torch.device("cpu")
        dev = home
        if dist.get_backend(group) == "nccl":
            dev = torch.device("cuda", torch.cuda.current_device())
        has_terms = self.batch_hsic is not None
        meta = torch.tensor(
            [self.num_sets, self.num_batches, self.num_examples, int(not has_terms)], dtype=torch.int64, device=dev
        )
        metas = [torch.empty_like(meta) for _ in range(world)]
        dist.all_gather(metas, meta, group=group)
        metas = [m.cpu() for m in metas]
        sets = {int(m[0]) for m in metas if int(m[1]) > 0}
        if len(sets) > 1:
            raise ValueError(f"ranks disagree on the number of feature sets ({sorted(sets)})")
        nf = sets.pop() if sets else 0
        batches = [int(m[1]) for m in metas]
        self.num_batches, self.num_examples = sum(batches), sum(int(m[2]) for m in metas)
        if nf == 0:
            return
        if any(int(m[3]) for m in metas):  # some rank lost its terms: sums only
            hsic = (self.hsic if self.hsic is not None else torch.zeros(nf, nf, dtype=torch.float64)).to(dev).clone()
            dist.all_reduce(hsic, group=group)
            self.hsic, self.batch_hsic = hsic.to(home), None
            return
        most = max(batches)
        local = torch.zeros(most, nf, nf, dtype=torch.float64, device=dev)
        if self.batch_hsic:
            local[: len(self.batch_hsic)] = torch.stack(self.batch_hsic).to(dev)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=group)
        terms = [gathered[r][k].to(home) for k in range(most) for r in range(world) if k < batches[r]]
        hsic = torch.zeros(nf, nf, dtype=torch.float64, device=home)
        for t in terms:  # the single process's order of additions
            hsic += t
        self.hsic, self.batch_hsic = hsic, terms


def linear_cka(x: torch.Tensor, y: torch.Tensor, unbiased: bool = False) -> float:
    """Full-batch linear CKA (Kornblith et al. 2019) of x (n, ...) and y (n, ...).

    ``unbiased=True`` uses HSIC_1 of Song et al. 2012 (needs n >= 4). Returns a float; NaN with a
    RuntimeWarning when x or y is constant over the examples."""
    acc = MinibatchCKA(unbiased=unbiased)
    acc.update([x, y])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(acc.compute()[0, 1])
    if caught:
        warnings.warn(
            "linear CKA is undefined: x or y does not vary over the examples; returning NaN",
            RuntimeWarning,
            stacklevel=2,
        )
    return value
