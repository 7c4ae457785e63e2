"""The pretext pretraining of ``demo-vit``: the small DINOv2-architecture ViT that ``cka-split demo``
pretrains itself, so that the demo asks "which layers do segmentation and detection reshape?" of a
model that was pretrained on something else.

Pretext: MAE-style masked patch reconstruction (He et al., "Masked Autoencoders Are Scalable Vision
Learners", CVPR 2022; reference code facebookresearch/mae ``models_mae.py``). 75% of the patches of
each image are dropped at random; the encoder (the demo-vit itself, with its final norm) sees only
the cls token and the visible patches; a light transformer decoder puts mask tokens back in place
and predicts the pixels of every patch; the loss is the mean squared error on the masked patches
only, against targets normalised per patch (``norm_pix_loss``). Why this pretext:

- it is neither segmentation nor detection: no labels are used, only pixels;
- it is dense, so every layer and every token position gets gradient, and MAE encoders are known to
  form a layer hierarchy (local texture early, context late) whose last blocks are specialised to
  the pretext, which is what task fine-tuning then reshapes;
- the encoder runs on 17 of 65 tokens, so a step at batch 32 / 112 px costs a fraction of a full
  forward pass, and the loss falls clearly within a few hundred steps on a 2-core CPU (a
  self-distillation objective such as DINOv2/iBOT needs far longer to leave its trivial solution).

The loss is also reported against ``baseline``: the loss of predicting zero for every masked patch,
the best guess that knows nothing about the patch (the normalised targets have zero mean and unit
variance per patch), so ``loss / baseline < 1`` is learning beyond the trivial answer.

Weights are cached as ``demo-vit-<recipe_id>.safetensors`` (plain timm state-dict keys, the recipe
and the loss curve in the metadata) in :func:`cache_dir`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbones import DEMO_VIT_KWARGS, Backbone, create_vit, resolve_name, sha256_file
from .errors import UserError
from .fileio import atomic_write
from .progress import NULL_PROGRESS, Progress

PRETEXTS = {"mae": "MAE-style masked patch reconstruction"}
FILE_FORMAT = "cka-split demo-vit"


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that determines the pretrained demo-vit weights.

    ``layer_scale_init`` is the starting value of every layer-scale gamma. DINOv2 starts at 1e-5 for
    runs of hundreds of thousands of steps; in a few hundred CPU steps the blocks would then stay near
    identity. At 0.1 (CaiT's value for 12 blocks, Touvron et al. 2021, sec. 3.1) the patch embedding
    still dominates every block's output: the pretrained blocks' CKA with block 0 stayed >= 0.99 and
    fine-tuned copies diverged by <= 0.005 at every block (measured), so the demo had nothing to find.
    At 1.0 the blocks act at full strength: block 0 vs 11 CKA 0.94 after 600 steps, and seg/det copies
    diverge by 0.08-0.16 / 0.01-0.21, growing with depth (measured, 300/40 fine-tuning steps). ``arch`` overrides entries of ``DEMO_VIT_KWARGS`` (a tuple of (key, value) pairs; tests use a
    smaller ViT, the demo uses none). ``version`` changes when this module's training changes in a
    way that changes the weights, so that an old cache is not reused.
    """

    steps: int = 600
    batch_size: int = 32
    image_size: int = 112
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    grad_clip: float = 1.0
    layer_scale_init: float = 1.0
    seed: int = 0
    pretext: str = "mae"
    mask_ratio: float = 0.75
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    data: str = "synthetic"
    dataset_length: int = 2048
    arch: tuple[tuple[str, Any], ...] = field(default_factory=tuple)
    version: int = 1

    def __post_init__(self) -> None:
        if self.pretext not in PRETEXTS:
            raise UserError(f"unknown pretext '{self.pretext}': use one of {', '.join(PRETEXTS)}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise UserError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.steps < 1 or self.batch_size < 1 or self.dataset_length < self.batch_size:
            raise UserError("a demo recipe needs steps >= 1 and dataset_length >= batch_size >= 1")
        unknown = [k for k, _ in self.arch if k not in DEMO_VIT_KWARGS]
        if unknown:
            raise UserError(f"arch overrides {unknown} are not demo-vit architecture keys: use {sorted(DEMO_VIT_KWARGS)}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["arch"] = [[k, v] for k, v in self.arch]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "DemoRecipe":
        d = dict(d)
        d["arch"] = tuple((str(k), v) for k, v in d.get("arch", []))
        return cls(**d)

    @property
    def recipe_id(self) -> str:
        """First 12 hex digits of the sha256 of the recipe's fields (canonical JSON)."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def vit_kwargs(self) -> dict[str, Any]:
        """timm kwargs of the ViT this recipe pretrains: ``DEMO_VIT_KWARGS`` with ``arch`` applied."""
        kw = dict(DEMO_VIT_KWARGS)
        kw.update(dict(self.arch))
        kw["img_size"] = self.image_size
        return kw

    def describe(self) -> str:
        data = "synthetic scenes" if self.data == "synthetic" else self.data
        return f"recipe {self.recipe_id}: {PRETEXTS[self.pretext]}, {self.steps} steps on {data}"


# The demo's recipes. A step at batch 32 / 112 px took 0.14-0.15 s on the idle 2-core CPU (0.3 s
# of CPU time single-threaded), rendering a 112 px scene about 11 ms; the loss (relative to the
# zero prediction) fell from 0.99 to 0.60 within about 100 steps and then slowly.
FULL_RECIPE = DemoRecipe()
QUICK_RECIPE = DemoRecipe(steps=150, warmup_steps=10, dataset_length=512)


def demo_recipe(quick: bool = False) -> DemoRecipe:
    return QUICK_RECIPE if quick else FULL_RECIPE


# ------------------------------------------------------------------------------------- the cache
def cache_dir() -> Path:
    """Where demo-vit weights are cached: ``$CKA_SPLIT_CACHE`` if set, else
    ``$XDG_CACHE_HOME/cka-split``, else ``~/.cache/cka-split``."""
    if os.environ.get("CKA_SPLIT_CACHE"):
        return Path(os.environ["CKA_SPLIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cka-split"


def cache_path(recipe: DemoRecipe, directory: str | os.PathLike | None = None) -> Path:
    return Path(directory if directory is not None else cache_dir()) / f"demo-vit-{recipe.recipe_id}.safetensors"


def find_cached_demo_vit(directory: str | os.PathLike | None = None) -> Path | None:
    """The cached weights of the demo's own recipes (full first, then quick), or None."""
    for recipe in (FULL_RECIPE, QUICK_RECIPE):
        path = cache_path(recipe, directory)
        if path.is_file():
            return path
    return None


def load_cached_demo_vit_into(vit: nn.Module, directory: str | os.PathLike | None = None) -> str:
    """``build_backbone("demo-vit", "auto")``: load the cached demo weights into ``vit`` (a fresh
    ``DEMO_VIT_KWARGS`` ViT, strict) and return the weights_source string. Raises ``UserError``
    saying how to make them when there are none."""
    path = find_cached_demo_vit(directory)
    if path is None:
        where = Path(directory) if directory is not None else cache_dir()
        raise UserError(f"no pretrained demo-vit in {where}: run `cka-split demo` to pretrain it "
                        "(cached for later runs), or pass --weights random")
    state, recipe, _ = read_demo_vit_file(path)
    try:
        vit.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit the demo-vit architecture ({e}): delete it and run `cka-split demo`") from e
    return weights_source(recipe, path, sha256_file(path))


def weights_source(recipe: DemoRecipe, path: Path | None = None, sha256: str | None = None) -> str:
    where = f"file {path} sha256:{sha256}" if path is not None else "in memory, not saved"
    return f"demo-vit pretrained by cka-split ({recipe.describe()}), {where}"


def save_demo_vit(vit: nn.Module, recipe: DemoRecipe, path: str | os.PathLike, losses: list[float],
                  baselines: list[float]) -> Path:
    """Write the ViT's state dict (timm keys) atomically as safetensors; the recipe, its id and the
    loss curve go into the metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in vit.state_dict().items()}
    meta = {
        "format": FILE_FORMAT,
        "recipe_id": recipe.recipe_id,
        "recipe": json.dumps(recipe.to_json(), sort_keys=True),
        "description": recipe.describe(),
        "losses": json.dumps([round(x, 6) for x in losses]),
        "baselines": json.dumps([round(x, 6) for x in baselines]),
    }
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def read_demo_vit_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], DemoRecipe, dict[str, str]]:
    """(state dict, recipe, metadata) of a demo-vit file. Raises ``UserError`` if it is not one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read demo-vit weights {path} ({e}): delete it and run `cka-split demo` again") from e
    if meta.get("format") != FILE_FORMAT or "recipe" not in meta:
        raise UserError(f"{path} is not a demo-vit file written by cka-split: delete it and run `cka-split demo` again")
    recipe = DemoRecipe.from_json(json.loads(meta["recipe"]))
    if recipe.recipe_id != meta.get("recipe_id"):
        raise UserError(f"{path}: its recipe does not hash to its recorded id (written by another version?): "
                        "delete it and run `cka-split demo` again")
    return state, recipe, meta


def load_demo_vit(path: str | os.PathLike) -> Backbone:
    """A ``demo-vit`` Backbone from a file written by :func:`save_demo_vit` (strict load)."""
    path = Path(path)
    state, recipe, _ = read_demo_vit_file(path)
    vit = _create_demo_vit(recipe)
    vit.load_state_dict(state, strict=True)
    bb = Backbone(vit, name="demo-vit", weights_source=weights_source(recipe, path, sha256_file(path)))
    bb.eval()
    return bb


def load_or_pretrain_demo_vit(recipe: DemoRecipe = FULL_RECIPE, cache_dir: str | os.PathLike | None = None,
                              progress: Progress = NULL_PROGRESS) -> Backbone:
    """The demo-vit of ``recipe``: loaded from the cache if present, else pretrained and cached."""
    path = cache_path(recipe, cache_dir)
    if path.is_file():
        progress.log(f"using cached demo-vit {path}")
        return load_demo_vit(path)
    result = pretrain(recipe, progress)
    save_demo_vit(result.vit, recipe, path, result.losses, result.baselines)
    progress.log(f"saved demo-vit to {path}")
    return load_demo_vit(path)


# ------------------------------------------------------------------------------------ the model
def _create_demo_vit(recipe: DemoRecipe) -> nn.Module:
    spec = resolve_name("demo-vit")
    spec = type(spec)(name=spec.name, timm_name=spec.timm_name, timm_kwargs=recipe.vit_kwargs())
    return create_vit(spec)


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (as MAE's decoder): (h*w, dim); half the channels
    encode the row, half the column, each as sin/cos of geometric frequencies (Vaswani et al. 2017)."""
    if dim % 4:
        raise UserError(f"decoder_dim must be a multiple of 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    parts = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        ang = pos[:, None] * omega[None, :]
        parts += [ang.sin(), ang.cos()]
    return torch.cat(parts, dim=1).float()


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) with H, W multiples of p -> (B, N, p*p*3), patches in row-major order (the order
    of the ViT's patch tokens), pixels within a patch as (row, col, channel)."""
    b, c, hh, ww = images.shape
    x = images.reshape(b, c, hh // p, p, ww // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (hh // p) * (ww // p), p * p * c)


class MaskedAutoencoder(nn.Module):
    """MAE around a :class:`Backbone` (the encoder) with a light decoder (He et al. 2022).

    ``forward(images, generator)`` takes normalised images (B, 3, H, W) and returns
    ``(loss, baseline)``: the per-patch-normalised pixel MSE on the masked patches, and the same
    MSE for a prediction of zero.
    """

    def __init__(self, backbone: Backbone, grid: tuple[int, int], *, mask_ratio: float, decoder_dim: int,
                 decoder_depth: int, decoder_heads: int):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.backbone = backbone
        self.grid = grid
        self.mask_ratio = mask_ratio
        p = backbone.patch_size
        self.decoder_embed = nn.Linear(backbone.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        pos = torch.cat([torch.zeros(1, decoder_dim), sincos_pos_embed_2d(decoder_dim, *grid)])
        self.register_buffer("decoder_pos", pos[None], persistent=False)  # (1, 1 + N, D_dec)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, p * p * 3)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        bb = self.backbone
        tokens = bb.embed(images)  # (B, 1 + N, C), position embeddings added
        npre = bb.num_prefix_tokens
        prefix, patches = tokens[:, :npre], tokens[:, npre:]
        b, n, c = patches.shape
        if n != self.grid[0] * self.grid[1]:
            raise UserError(f"images give {n} patches, the pretraining grid has {self.grid[0] * self.grid[1]}")
        keep = max(1, int(round(n * (1 - self.mask_ratio))))
        noise = torch.rand(b, n, generator=generator, device=images.device)
        ids_keep = noise.argsort(dim=1)[:, :keep]  # (B, keep)
        visible = torch.gather(patches, 1, ids_keep[..., None].expand(-1, -1, c))
        h = bb.final_norm(bb.run_blocks(torch.cat([prefix, visible], 1), 0, bb.num_layers))

        z = self.decoder_embed(h)  # (B, npre + keep, D)
        d = z.shape[-1]
        full = self.mask_token.expand(b, n, d).clone()
        full = full.scatter(1, ids_keep[..., None].expand(-1, -1, d), z[:, npre:])
        z = torch.cat([z[:, :1], full], 1) + self.decoder_pos  # cls + N patches (registers dropped)
        for blk in self.decoder_blocks:
            z = blk(z)
        pred = self.decoder_pred(self.decoder_norm(z))[:, 1:]  # (B, N, p*p*3)

        target = patchify(bb.pad(images), bb.patch_size)
        mean = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
        masked = torch.ones(b, n, device=images.device).scatter(1, ids_keep, 0.0)  # 1 = masked
        per_patch = (pred - target).pow(2).mean(-1)
        loss = (per_patch * masked).sum() / masked.sum()
        baseline = (target.pow(2).mean(-1) * masked).sum() / masked.sum()
        return loss, baseline.detach()


# --------------------------------------------------------------------------------- the training
@dataclass
class PretrainResult:
    """The pretrained ViT and its loss curve (one value per step), with the zero-prediction
    baseline of each step's batch."""

    vit: nn.Module
    recipe: DemoRecipe
    losses: list[float]
    baselines: list[float]


def _lr_at(step: int, recipe: DemoRecipe) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then half-cosine decay to 0 (as MAE)."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    t = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * t))


def render_images(recipe: DemoRecipe, progress: Progress = NULL_PROGRESS) -> torch.Tensor:
    """The recipe's training images, rendered once: (N, 3, S, S) uint8 RGB, N = ``dataset_length``.

    Scenes come from ``build_dataset(recipe.data, "train", augment=False)`` (already ImageNet-
    normalised; undone here, exactly for 8-bit sources). They are kept in memory as 8-bit because
    rendering a synthetic scene costs about as much as a pretraining step on its whole batch; the
    per-step variety comes from the random masks and a random horizontal flip.
    """
    from .backbones import IMAGENET_MEAN, IMAGENET_STD
    from .data import build_dataset

    s = recipe.image_size
    ds = build_dataset(recipe.data, "train", task="seg", crop=s, augment=False,
                       length=recipe.dataset_length, seed=recipe.seed)
    n = min(len(ds), recipe.dataset_length)
    if n < recipe.batch_size:
        raise UserError(f"{recipe.data} has {n} training images; demo pretraining needs at least {recipe.batch_size}")
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = torch.empty(n, 3, s, s, dtype=torch.uint8)
    task = progress.task(f"rendering {n} pretraining images", n)
    try:
        for i in range(n):
            img = ds[i]["image"]
            if tuple(img.shape) != (3, s, s):
                raise UserError(f"{recipe.data} gives {tuple(img.shape)} images; demo pretraining needs (3, {s}, {s})")
            out[i] = ((img * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)
            task.advance(1)
    finally:
        task.close()
    return out


def _batch(images: torch.Tensor, idx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, S, S) rows ``idx`` -> normalised float (B, 3, S, S), rows with ``flip`` mirrored."""
    from .backbones import IMAGENET_MEAN, IMAGENET_STD

    x = images[idx].float() / 255.0
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def pretrain(recipe: DemoRecipe, progress: Progress = NULL_PROGRESS) -> PretrainResult:
    """Pretrain a fresh demo-vit with the recipe's pretext on CPU; deterministic for a recipe
    (global RNG state is restored afterwards)."""
    # Layer scale starts at 1e-5 and AdamW's second moments are tiny: flush denormal floats to
    # zero so that CPU arithmetic on them cannot slow down (restored to the default afterwards).
    flush = torch.set_flush_denormal(True)
    try:
        return _pretrain(recipe, progress)
    finally:
        if flush:
            torch.set_flush_denormal(False)


def _pretrain(recipe: DemoRecipe, progress: Progress) -> PretrainResult:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        vit = _create_demo_vit(recipe)
        with torch.no_grad():
            for name, param in vit.named_parameters():
                if name.endswith(("ls1.gamma", "ls2.gamma")):
                    param.fill_(recipe.layer_scale_init)
        bb = Backbone(vit, name="demo-vit", weights_source="being pretrained")
        grid = bb.grid_size(recipe.image_size, recipe.image_size)
        mae = MaskedAutoencoder(bb, grid, mask_ratio=recipe.mask_ratio, decoder_dim=recipe.decoder_dim,
                                decoder_depth=recipe.decoder_depth, decoder_heads=recipe.decoder_heads)
        decay = [p for n, p in mae.named_parameters() if p.ndim >= 2 and "pos_embed" not in n and "token" not in n]
        no_decay = [p for n, p in mae.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n and "token" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
        images = render_images(recipe, progress)
        gen = torch.Generator().manual_seed(recipe.seed + 1)  # masks, batch order and flips
        order = torch.randperm(len(images), generator=gen)
        pos = 0
        losses: list[float] = []
        baselines: list[float] = []
        mae.train()
        task = progress.task(f"pretraining demo-vit ({PRETEXTS[recipe.pretext]})", recipe.steps)
        try:
            for step in range(recipe.steps):
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, recipe)
                if pos + recipe.batch_size > len(order):  # a new epoch, a new order
                    order, pos = torch.randperm(len(images), generator=gen), 0
                idx = order[pos:pos + recipe.batch_size]
                pos += recipe.batch_size
                flip = torch.rand(len(idx), generator=gen) < 0.5
                loss, baseline = mae(_batch(images, idx, flip), gen)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"demo-vit pretraining diverged at step {step} (loss {loss.item()})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if recipe.grad_clip > 0:
                    nn.utils.clip_grad_norm_(mae.parameters(), recipe.grad_clip)
                opt.step()
                losses.append(loss.item())
                baselines.append(baseline.item())
                task.advance(1, loss=f"{losses[-1]:.3f}", rel=f"{losses[-1] / max(baselines[-1], 1e-12):.2f}")
        finally:
            task.close()
        vit.eval()
    return PretrainResult(vit=vit, recipe=recipe, losses=losses, baselines=baselines)


def pretrain_demo_vit(recipe: DemoRecipe = FULL_RECIPE, progress: Progress = NULL_PROGRESS) -> Backbone:
    """Pretrain a demo-vit with ``recipe`` and return it as a Backbone (not saved; see
    :func:`load_or_pretrain_demo_vit` for the cached version)."""
    result = pretrain(recipe, progress)
    bb = Backbone(result.vit, name="demo-vit", weights_source=weights_source(recipe))
    bb.eval()
    return bb
