"""The published ViT-Split configurations and the rules that extend them (one home for each).

- ``TASKS``, ``METHODS`` and ``HEADS``: what can be trained (``TASKS`` is defined with the data's
  labels, :mod:`vitsplit.data.labels`, and re-exported here). ``vit-adapter`` is ViT-Adapter (Chen et
  al., ICLR 2023), whose published configurations live beside it in :mod:`.vit_adapter`; ``vit-comer``
  is ViT-CoMer (Xia et al., CVPR 2024, :mod:`.vit_comer`). Both train with layer-wise lr decay
  (``LAYER_DECAY_METHODS``).
  ``HEADS``: the segmentation head of a baseline, ``linear`` (BatchNorm + 1x1 conv) or ``upernet``
  (UperNet with its auxiliary FCN head, :mod:`.upernet`), which ``UPERNET_METHODS`` accept.
- ``PUBLISHED``: the release's split by backbone depth L (Li et al., ICCV 2025, ADE20K table;
  ``docs/configurations.md``): ViT-S/B (12 blocks) K_t 3, K_p 4 from b = 2; ViT-L (24) K_t 4,
  K_p 8 from b = 2; ViT-g (40) K_t 8, K_p 14 from b = 27.
- :func:`prior_layers_uniform`: the release's uniform prior-layer rule.
- :func:`default_k_t` and :func:`default_split`: the published split for a published depth, and
  our rule for any other depth.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.labels import TASKS
from ..errors import UserError

__all__ = [
    "BASELINES",
    "PRETRAINED_LR_SCALE",
    "DEFAULT_B",
    "HEADS",
    "LAYER_DECAY_METHODS",
    "METHODS",
    "UPERNET_METHODS",
    "PUBLISHED",
    "PUBLISHED_K_P",
    "PUBLISHED_K_T",
    "PublishedSplit",
    "TASKS",
    "default_k_t",
    "default_split",
    "prior_layers_uniform",
]

BASELINES = ("linear", "full", "lora")
METHODS = ("vitsplit", *BASELINES, "vit-adapter", "vit-comer")
HEADS = ("linear", "upernet")
UPERNET_METHODS = ("full", "lora", "vit-adapter", "vit-comer")  # the trained backbones (linear is the probe)
# The methods trained with the releases' layer-wise lr decay (ViT-Adapter's and ViT-CoMer's
# LayerDecayOptimizerConstructor), which sets the backbone's lr: they take no pretrained-lr scale.
LAYER_DECAY_METHODS = ("vit-adapter", "vit-comer")
# The learning-rate multiplier of trained weights that start from the pretrained model: ViT-Split's task
# head (copies of the last K_t blocks) and full fine-tuning's backbone; new heads train at the full lr.
# 0.1 is the release's recipe (``lr_mult`` 0.1 on the task head, tens of thousands of iterations).
PRETRAINED_LR_SCALE = 0.1


@dataclass(frozen=True)
class PublishedSplit:
    """One row of the release's table: task-head blocks K_t, prior layers K_p sampled from block b."""

    k_t: int
    k_p: int
    b: int


PUBLISHED: dict[int, PublishedSplit] = {
    12: PublishedSplit(k_t=3, k_p=4, b=2),
    24: PublishedSplit(k_t=4, k_p=8, b=2),
    40: PublishedSplit(k_t=8, k_p=14, b=27),
}
PUBLISHED_K_T = {depth: row.k_t for depth, row in PUBLISHED.items()}
PUBLISHED_K_P = {depth: row.k_p for depth, row in PUBLISHED.items()}
DEFAULT_B = PUBLISHED[12].b  # the release's first prior layer for ViT-S/B/L


def prior_layers_uniform(num_layers: int, k_p: int, b: int) -> list[int]:
    """The release's uniform prior-layer rule ``S = {b + floor(i * (L-1-b) / (K_p-1)) : i = 0..K_p-1}``.

    The release truncates (the paper rounds; both agree on the published configs); integer
    arithmetic, so there is no float round-off. Every sample starts at ``b`` (the ``i = 0`` term),
    so one prior layer (K_p = 1, where the formula divides by zero) is ``[b]``. Layers repeat when
    K_p > L - b (the ViT-g row samples layer 27 twice).
    """
    if k_p < 1 or not 0 <= b <= num_layers - 1:
        raise UserError(f"cannot place {k_p} prior layers from block {b} in a {num_layers}-block model")
    if k_p == 1:
        return [b]
    return [b + (i * (num_layers - 1 - b)) // (k_p - 1) for i in range(k_p)]


def default_k_t(num_layers: int) -> int:
    """The published K_t for this depth (3 for 12 blocks, 4 for 24, 8 for 40), else round(L/4),
    at least 1 and at most L-1."""
    return min(max(1, PUBLISHED_K_T.get(num_layers, round(num_layers / 4))), max(1, num_layers - 1))


def default_split(num_layers: int) -> tuple[int, list[int], str]:
    """(K_t, prior layers, where they come from) for a backbone of ``num_layers`` blocks.

    Published depths (12, 24, 40) take the release's row. Other depths (our rule): K_t =
    :func:`default_k_t`, 4 prior layers (fewer if the model is shorter) uniform from b = 2
    (b = 0 below 8 blocks, so that small test models keep their early layers).
    """
    if num_layers in PUBLISHED:
        row = PUBLISHED[num_layers]
        return row.k_t, prior_layers_uniform(num_layers, row.k_p, row.b), "published default"
    b = DEFAULT_B if num_layers >= 8 else 0
    return (
        default_k_t(num_layers),
        prior_layers_uniform(num_layers, min(4, num_layers - b), b),
        "default rule (K_t=round(L/4), 4 uniform prior layers)",
    )
