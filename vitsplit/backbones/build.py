"""``build_backbone(name, weights)``: a named architecture with random, cached or given weights."""

from __future__ import annotations

import torch

from .backbone import Backbone
from .names import create_vit, resolve_name
from .spec import BackboneSpec
from .weights import load_weights


def build_backbone(name: str | BackboneSpec, weights: str = "auto", *, seed: int | None = None) -> Backbone:
    """Build a named backbone with weights from ``weights``: "random", "auto", or a file path.

    ``name`` is a model name (see :func:`resolve_name`) or an already resolved
    :class:`BackboneSpec` (for architectures without a name, such as tests' tiny ViTs).
    "random" gives freshly initialised weights (``seed`` makes them reproducible without touching
    the global random state) and records ``weights_source="random"``. "auto" and paths are resolved by
    :mod:`vitsplit.backbones.weights`;
    loading is strict (a checkpoint for another architecture fails naming the mismatched keys).
    """
    spec = name if isinstance(name, BackboneSpec) else resolve_name(name)
    name = spec.name
    if seed is None:
        vit = create_vit(spec)
    else:  # timm initialises from the global CPU generator: seed a fork of it, leave the caller's state alone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vit = create_vit(spec)
    if weights == "random":
        source = "random" if seed is None else f"random (seed {seed})"
    else:
        source = load_weights(vit, spec, weights)
    bb = Backbone(vit, name=name, weights_source=source)
    bb.eval()
    return bb
