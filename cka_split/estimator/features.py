"""Per-block features of a ViT through forward hooks.

Works on a vitsplit ``Backbone`` (hooks on ``bb.vit.blocks``) and on any model with a ``.blocks``
sequence of transformer blocks whose outputs are token sequences (B, T, C), prefix tokens (class,
registers) first, e.g. a timm ``VisionTransformer``, or 2D token grids (B, h, w, C) without prefix
tokens (SAM's encoder blocks), which are read as row-major sequences (B, h*w, C). Modes (``FEATURE_MODES``):

- ``tokens``: the patch tokens of each image flattened, (B, P * C) (the choice of Kornblith et al.
  2019 and Raghu et al. 2021 for spatial representations); optionally a fixed subset of k patch
  positions, (B, k * C), the same positions for every model (seeded);
- ``mean``: the mean of the patch tokens, (B, C);
- ``cls``: the class token, (B, C). Before block 0 it is the same learned vector for every image, so
  it only becomes informative after the first block.

Features computed under bf16/fp16 autocast are upcast to float32 before anyone sees them.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from vitsplit.errors import UserError

FEATURE_MODES = ("tokens", "mean", "cls")


def vit_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a Backbone (``.vit.blocks``) or a timm-style ViT (``.blocks``)."""
    vit = getattr(model, "vit", None)
    blocks = getattr(vit, "blocks", None) if vit is not None else getattr(model, "blocks", None)
    if blocks is None or not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise UserError(
            f"{type(model).__name__} has no transformer blocks (.blocks or .vit.blocks); "
            "give a vitsplit Backbone or a timm VisionTransformer"
        )
    return blocks


def num_prefix_tokens(model: nn.Module) -> int:
    """Class + register tokens in front of the patch tokens (0 when the model does not say)."""
    for m in (model, getattr(model, "vit", None)):
        if m is not None and hasattr(m, "num_prefix_tokens"):
            return int(m.num_prefix_tokens)
    return 0


def has_cls_token(model: nn.Module) -> bool:
    vit = getattr(model, "vit", model)
    return getattr(vit, "cls_token", None) is not None


def token_positions(num_patches: int, k: int | None, seed: int = 0) -> torch.Tensor | None:
    """A fixed, sorted subset of k of ``num_patches`` patch positions (None: keep all). Depends only
    on (num_patches, k, seed), so every model sees the same positions."""
    if k is None or k >= num_patches:
        return None
    if k < 1:
        raise UserError(f"token subsample must be at least 1 position, got {k}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(num_patches, generator=g)[:k].sort().values


def select_features(
    tokens: torch.Tensor, mode: str, prefix: int, positions: torch.Tensor | None = None, flatten: bool = True
) -> torch.Tensor:
    """One block's output (B, T, C) -> features (B, D), float32 or float64.

    tokens: (B, P*C) patch tokens (at ``positions`` if given; (B, P, C) with ``flatten=False``, which
    saves a copy when the next step copies anyway); mean: (B, C); cls: (B, C) token 0.
    """
    if tokens.dtype in (torch.bfloat16, torch.float16):
        tokens = tokens.float()
    if mode == "cls":
        return tokens[:, 0]
    patches = tokens[:, prefix:]
    if mode == "mean":
        return patches.mean(dim=1)
    if mode == "tokens":
        if positions is not None:
            patches = patches.index_select(1, positions.to(patches.device))
        return patches.reshape(patches.shape[0], -1) if flatten else patches
    raise UserError(f"unknown feature mode '{mode}': use one of {', '.join(FEATURE_MODES)}")


class _StopForward(Exception):
    """Raised by the hook of the deepest wanted block: the blocks after it are not needed."""


class BlockFeatures:
    """Forward hooks that capture chosen blocks' outputs as features.

    ``with BlockFeatures(model, layers, mode) as bf: feats = bf(x)`` gives {layer: transform((B, D))}.
    ``transform`` (default identity) is applied inside the hook, so e.g. a Gram (B, B) can replace the
    (B, D) features at once and only it is kept. The forward pass stops after the deepest listed
    block.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[int],
        mode: str = "tokens",
        *,
        token_subsample: int | None = None,
        seed: int = 0,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        if mode not in FEATURE_MODES:
            raise UserError(f"unknown feature mode '{mode}': use one of {', '.join(FEATURE_MODES)}")
        self.model = model
        self.blocks = vit_blocks(model)
        self.layers = [int(i) for i in layers]
        n = len(self.blocks)
        for i in self.layers:
            if not 0 <= i < n:
                raise UserError(f"layer {i} is outside [0, {n - 1}] for a model with {n} blocks")
        if len(set(self.layers)) != len(self.layers):
            raise UserError(f"layers {self.layers} list a block twice")
        if mode == "cls" and not has_cls_token(model):
            raise UserError("feature mode 'cls' needs a model with a class token; use 'tokens' or 'mean'")
        self.mode = mode
        self.prefix = num_prefix_tokens(model)
        self.token_subsample = token_subsample
        self.seed = seed
        self.transform = transform
        self.outputs: dict[int, torch.Tensor] = {}
        self._handles: list = []
        self._positions: dict[int, torch.Tensor | None] = {}

    def _hook(self, layer: int, last: bool):
        def hook(module: nn.Module, args, output) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            if out.dim() == 4:  # a 2D token grid (B, h, w, C) (SAM's blocks): row-major tokens (B, h*w, C)
                out = out.flatten(1, 2)
            if out.dim() != 3:
                raise UserError(f"block {layer} returned shape {tuple(out.shape)}, not a token sequence (B, T, C)")
            positions = None
            if self.mode == "tokens" and self.token_subsample is not None:
                p = out.shape[1] - self.prefix
                if p not in self._positions:
                    self._positions[p] = token_positions(p, self.token_subsample, self.seed)
                positions = self._positions[p]
            f = select_features(out.detach(), self.mode, self.prefix, positions, flatten=self.transform is None)
            self.outputs[layer] = self.transform(f) if self.transform is not None else f
            if last:
                raise _StopForward

        return hook

    def __enter__(self) -> "BlockFeatures":
        deepest = max(self.layers) if self.layers else -1
        for i in self.layers:
            self._handles.append(self.blocks[i].register_forward_hook(self._hook(i, i == deepest)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __call__(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Run the model on x (B, 3, H, W) (normalised images) -> {layer: features} in ``layers`` order."""
        if not self._handles:
            raise RuntimeError("BlockFeatures must be entered (``with``) before it is called")
        self.outputs = {}
        forward = getattr(self.model, "forward_features", None) or self.model
        try:
            forward(x)
        except _StopForward:
            pass
        missing = [i for i in self.layers if i not in self.outputs]
        if missing:
            raise UserError(f"blocks {missing} did not run in the model's forward pass; check the layer indices")
        out, self.outputs = {i: self.outputs[i] for i in self.layers}, {}
        return out
