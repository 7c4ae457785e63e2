"""How much the CKA engine costs on top of the forward passes, and how it compares with pytorch-cka.

Three models: the DINOv2-S architecture (``dinov2_vits14``, random weights) and two deep copies
perturbed from block 4 and from block 8 on. 64 random images at 224 px, minibatches of 32, all twelve
blocks, "tokens" features (patch tokens flattened, 256 x 384 per image). The six matrices are the
three self-similarities and the three cross-similarities; ``analyze`` gets all of them from one pass
(a 36 x 36 matrix), pytorch-cka 1.1.3 (``cka.compute_cka``) needs one call per pair.

Prints: our time (with the jackknife SE: per-minibatch HSIC terms kept and the SE computed) / the bare
forward passes of the three models (target <= 1.05) and pytorch-cka's time / ours (target >= 2.5).

Two measures of the first ratio, because this machine's throughput drifts by more than the target
(the same bare forwards took 22-31 s here within minutes, 2-core VM, nothing else running):

- **in-run** (the target's measure): inside each ``analyze`` call the time spent in the CKA work itself
  (the Gram of every block's features inside the forward hooks, the accumulator's update, the final CKA
  and jackknife SE) is clocked apart from the rest; ratio = call time / (call time - CKA time). Both parts
  come from the same seconds of the same call, so drift cancels. Median over the repeats.
- **paired wall**: bare forwards and ``analyze`` alternate in ABBA order (bare, ours, ours, bare, ...,
  so neither always runs first), ratio of each adjacent pair's times, median over pairs; with the spread of
  the bare runs themselves (max / min), the noise floor this ratio cannot see below.

    OMP_NUM_THREADS=2 python benchmarks/cka_speed.py [--repeats 4] [--skip-pytorch-cka]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time

import torch

import cka_split.estimator.analysis as analysis_module
import cka_split.estimator.result as result_module
from cka_split import analyze
from cka_split.estimator.cka import GramWorkspace, MinibatchCKA
from vitsplit.backbones import build_backbone


class CKAClock:
    """Seconds spent in the CKA work of ``analyze``: the Gram transform in the hooks, every
    :class:`MinibatchCKA` method that computes (update, compute, SE) and the jackknife SE that
    :class:`~cka_split.estimator.result.CKAResult` computes, clocked by wrapping them."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn):
        def timed_call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t

        return timed_call

    def install(self) -> None:
        clock = self

        class ClockedWorkspace(GramWorkspace):
            def __call__(self, x):
                return clock.wrap(super().__call__)(x)

        analysis_module.GramWorkspace = ClockedWorkspace
        for name in ("update_grams", "compute", "compute_se", "batch_terms"):
            setattr(MinibatchCKA, name, self.wrap(getattr(MinibatchCKA, name)))
        result_module.jackknife_se = self.wrap(result_module.jackknife_se)  # the SE, computed by CKAResult


def perturbed_from(bb, k: int, seed: int, scale: float = 1.0):
    out = copy.deepcopy(bb)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in out.vit.blocks[k:]:
            for p in block.parameters():
                p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    return out


class Loader:
    """A list of minibatches with ``len`` (pytorch-cka reads a bare list as several loaders)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of one call."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--skip-pytorch-cka", action="store_true")
    args = ap.parse_args()

    base = build_backbone("dinov2_vits14", weights="random", seed=0).eval()
    with torch.no_grad():  # trained DINOv2 layer scales are O(0.1), not the 1e-5 of a fresh init
        for name, p in base.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(0.1)
    models = {"pretrained": base, "from4": perturbed_from(base, 4, seed=1), "from8": perturbed_from(base, 8, seed=2)}
    for m in models.values():
        m.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randn(args.batch_size, 3, args.size, args.size, generator=g)
        for _ in range(args.images // args.batch_size)
    ]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; 3 x {base.name} ({base.num_layers} blocks, "
        f"C={base.embed_dim}), {len(batches)} x {args.batch_size} images at {args.size} px"
    )

    def bare():
        with torch.inference_mode():
            for x in batches:
                for m in models.values():
                    m(x)

    def ours():
        return analyze(models, batches, features="tokens", unbiased=True)

    clock = CKAClock()
    clock.install()
    with torch.inference_mode():  # warm-up (allocator, kernels, dgemm)
        for m in models.values():
            m(batches[0][:4])
    analyze(models, [batches[0][:4]])
    walls = {"bare": [], "ours": []}
    cpus = {"bare": [], "ours": []}
    in_run = []
    order = [("bare", "ours") if i % 2 == 0 else ("ours", "bare") for i in range(args.repeats)]  # ABBA
    for pair in order:
        for name in pair:
            clock.seconds = 0.0
            w, c, out = timed(bare if name == "bare" else ours)
            walls[name].append(w)
            cpus[name].append(c)
            if name == "ours":
                res = out
                in_run.append(w / (w - clock.seconds))
    paired = [o / b for o, b in zip(walls["ours"], walls["bare"])]
    print(
        "wall s, bare forward of the three models:",
        " ".join(f"{v:.2f}" for v in walls["bare"]),
        f"(spread max/min {max(walls['bare']) / min(walls['bare']):.3f})",
    )
    print("wall s, cka_split.analyze (all six matrices):", " ".join(f"{v:.2f}" for v in walls["ours"]))
    print("in-run ratios (analyze call / its forward part):", " ".join(f"{v:.4f}" for v in in_run))
    print(
        f"ours / bare forward, in-run = {statistics.median(in_run):.3f} (median of {len(in_run)}; target <= 1.05, SE "
        f"included)"
    )
    print(
        f"ours / bare forward, paired wall = {statistics.median(paired):.3f} (median of {len(paired)} ABBA pairs: "
        + " ".join(f"{v:.3f}" for v in paired)
        + f"); best wall / best wall {min(walls['ours']) / min(walls['bare']):.3f}; "
        f"by process CPU time {min(cpus['ours']) / min(cpus['bare']):.3f}"
    )
    t_ours = min(walls["ours"])
    diag = torch.diagonal(res.matrix("pretrained", "from8"))
    print("same-layer CKA pretrained vs from8:", " ".join(f"{v:.4f}" for v in diag.tolist()))
    print(
        f"its jackknife SE ({res.se_batches} minibatches):",
        " ".join(f"{v:.1g}" for v in torch.diagonal(res.se("pretrained", "from8")).tolist()),
    )

    if args.skip_pytorch_cka:
        return
    from cka import compute_cka

    layers = [f"vit.blocks.{i}" for i in range(base.num_layers)]
    names = list(models)
    pairs = [(a, a) for a in names] + list(itertools.combinations(names, 2))

    def theirs():
        return {
            (a, b): compute_cka(models[a], models[b], Loader(batches), layers=layers, device="cpu", progress=False)[0]
            for a, b in pairs
        }

    t_theirs, c_theirs, mats = timed(theirs)
    print(f"pytorch-cka 1.1.3, six compute_cka calls: {t_theirs:.2f} s wall, {c_theirs:.2f} s CPU")
    print(
        f"speed-up over pytorch-cka = {t_theirs / t_ours:.2f}x by wall time (target >= 2.5), "
        f"{c_theirs / min(cpus['ours']):.2f}x by CPU time"
    )
    worst = max(float((mats[(a, b)].double() - res.matrix(a, b)).abs().max()) for a, b in pairs)
    print(
        f"largest |ours - pytorch-cka| over the six matrices: {worst:.3g} (theirs: float32 Grams of the"
        " uncentred features incl. the class token, clamped to [0, 1]; ours: patch tokens, float64)"
    )


if __name__ == "__main__":
    main()
