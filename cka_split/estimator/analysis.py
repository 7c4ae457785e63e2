"""One pass over a probe set: every model runs once per minibatch, the outputs of its blocks become
Gram matrices inside the forward hooks, and all (model, layer) Grams of the minibatch go into one
:class:`MinibatchCKA` update. Memory holds F Grams (n, n) per minibatch, never the images seen so far.

Under ``torch.distributed`` (torchrun) rank r takes minibatches r, r + W, r + 2W, ... and the HSIC
sums and per-minibatch terms are gathered at the end, so every rank returns the single-process result,
its jackknife SE included.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from vitsplit.errors import UserError
from vitsplit.progress import NULL_PROGRESS, Progress

from .cka import GramWorkspace, MinibatchCKA
from .features import FEATURE_MODES, BlockFeatures, vit_blocks
from .result import CKAResult


def batch_images(batch: Any) -> torch.Tensor:
    """A loader item -> images (B, 3, H, W): a tensor, a dict with "image" (vitsplit.data.collate),
    or a tuple/list whose first element is the images."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        if "image" not in batch:
            raise UserError(f"a minibatch dict has no 'image' entry (keys: {', '.join(map(str, batch))})")
        return batch["image"]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise UserError(
        f"cannot find images in a minibatch of type {type(batch).__name__}; "
        "yield tensors (B, 3, H, W) or dicts with 'image'"
    )


def resolve_layers(
    models: Mapping[str, nn.Module], layers: Sequence[int] | Mapping[str, Sequence[int]] | None
) -> dict[str, list[int]]:
    """None -> every block of each model; a list -> the same blocks of every model; a dict -> per model."""
    out = {}
    for name, model in models.items():
        if layers is None:
            out[name] = list(range(len(vit_blocks(model))))
        elif isinstance(layers, Mapping):
            if name not in layers:
                raise UserError(f"no layers given for model '{name}'")
            out[name] = [int(i) for i in layers[name]]
        else:
            out[name] = [int(i) for i in layers]
        if not out[name]:
            raise UserError(f"no layers to analyse for model '{name}'")
    return out


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def analyze(
    models: Mapping[str, nn.Module],
    loader: Iterable,
    *,
    layers: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    features: str = "tokens",
    device: str | torch.device | None = None,
    progress: Progress = NULL_PROGRESS,
    unbiased: bool = True,
    token_subsample: int | None = None,
    seed: int = 0,
) -> CKAResult:
    """CKA between every block of every model and every other, over the images of ``loader``.

    models: {name: Backbone or timm ViT}; loader yields (B, 3, H, W) normalised images (or dicts with
    "image"), B >= 4 for the unbiased estimator. ``layers``: see :func:`resolve_layers`. ``features``:
    "tokens" | "mean" | "cls" (cka_split.estimator.features). ``device``: where the models run (they are moved
    there); None keeps each model where it is. ``token_subsample``: keep k fixed patch positions
    (seeded by ``seed``). Returns a :class:`CKAResult` with F = sum of the layer counts.
    """
    if not models:
        raise UserError("analyze needs at least one model")
    if features not in FEATURE_MODES:
        raise UserError(f"unknown feature mode '{features}': use one of {', '.join(FEATURE_MODES)}")
    names = list(models)
    lay = resolve_layers(models, layers)
    if device is not None:
        device = torch.device(device)
        for m in models.values():
            m.to(device)
    devices = {n: _model_device(m) for n, m in models.items()}
    rank, world = _distributed()
    acc = MinibatchCKA(unbiased=unbiased)
    workspace = GramWorkspace()
    was_training = {n: m.training for n, m in models.items()}
    total = len(loader) if hasattr(loader, "__len__") else None
    task = progress.task("CKA over probe images", total)
    try:
        with ExitStack() as stack, torch.inference_mode():
            hooks = {
                n: stack.enter_context(
                    BlockFeatures(
                        models[n], lay[n], features, token_subsample=token_subsample, seed=seed, transform=workspace
                    )
                )
                for n in names
            }
            for m in models.values():
                m.eval()
            for b, batch in enumerate(loader):
                if b % world == rank:
                    x = batch_images(batch)
                    acc.check_batch_size(int(x.shape[0]))  # before any forward pass
                    grams = []
                    for n in names:
                        out = hooks[n](x.to(devices[n], non_blocking=True))
                        grams.extend(out[i].to(devices[names[0]]) for i in lay[n])
                    acc.update_grams(torch.stack(grams))
                task.advance(1)
    finally:
        task.close()
        for n, m in models.items():
            m.train(was_training[n])
    acc.all_reduce()
    if acc.hsic is None:
        raise UserError("the probe loader yielded no minibatch; give at least one minibatch of images")
    return CKAResult(
        models=names,
        layers=lay,
        full=acc.compute(),
        num_images=acc.num_examples,
        features=features,
        unbiased=unbiased,
        num_batches=acc.num_batches,
        token_subsample=token_subsample,
        batch_hsic=acc.batch_terms(),
    )
