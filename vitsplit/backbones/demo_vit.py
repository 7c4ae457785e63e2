"""demo-vit's weights: the recipe that makes them (and its id), where they are cached, and their file.

The pretraining itself is :mod:`vitsplit.pretrain`; this module is all that ``--weights auto`` for
``demo-vit`` needs. Weights are cached as ``demo-vit-<recipe_id>.safetensors`` (plain timm
state-dict keys, the recipe and the loss curve in the metadata) in :func:`cache_dir`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import UserError
from ..fileio import atomic_write, sha256_file
from .backbone import Backbone
from .names import DEMO_VIT_KWARGS, create_vit, resolve_name

PRETEXTS = {"mae": "MAE-style masked patch reconstruction"}
FILE_FORMAT = "cka-split demo-vit"


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that determines the pretrained demo-vit weights.

    ``layer_scale_init`` is the starting value of every layer-scale gamma (pretraining overwrites
    timm's ``init_values`` with it). DINOv2 starts at 1e-5 for runs of hundreds of thousands of
    steps; in a few hundred CPU steps the blocks would then stay near identity, and at 0.1 (CaiT's
    value for 12 blocks, Touvron et al. 2021, sec. 3.1) the patch embedding still dominated every
    block's output, so that fine-tuned copies hardly diverged and the demo had nothing to find. At
    1.0 the blocks act at full strength (the demo's measured CKA values are in the README).
    ``arch`` overrides entries of ``DEMO_VIT_KWARGS`` (a tuple of (key, value) pairs; tests use a
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


# The demo's recipes: the full one (`cka-split demo`) and the quick one (`cka-split demo --quick`,
# the tests); their cost and results on this project's machine are in the README.
FULL_RECIPE = DemoRecipe()
QUICK_RECIPE = DemoRecipe(steps=150, warmup_steps=10, dataset_length=512)


def demo_recipe(quick: bool = False) -> DemoRecipe:
    return QUICK_RECIPE if quick else FULL_RECIPE


CACHE_FOLDER = "demo-vit cache folder ($CKA_SPLIT_CACHE)"  # how errors name cache_dir()


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
    vit = create_demo_vit(recipe)
    vit.load_state_dict(state, strict=True)
    bb = Backbone(vit, name="demo-vit", weights_source=weights_source(recipe, path, sha256_file(path)))
    bb.eval()
    return bb


def create_demo_vit(recipe: DemoRecipe) -> nn.Module:
    """A fresh (random) ViT of the recipe's architecture."""
    spec = resolve_name("demo-vit")
    spec = type(spec)(name=spec.name, timm_name=spec.timm_name, timm_kwargs=recipe.vit_kwargs())
    return create_vit(spec)


def demo_vit_cache_path() -> Path:
    """Where ``cka-split demo`` keeps the pretrained demo-vit: the cached file if there is one,
    else where the full recipe's weights will be written (``demo-vit-<recipe id>.safetensors``
    under ``$CKA_SPLIT_CACHE``, ``$XDG_CACHE_HOME/cka-split`` or ``~/.cache/cka-split``)."""
    return find_cached_demo_vit() or cache_path(FULL_RECIPE)


def source_of_file(path: Path) -> str | None:
    """The weights_source of a demo-vit file that cka-split pretrained itself (its recipe is in the
    safetensors metadata), so that a run that loads it by path still says how the weights were
    made; None for any other file (another suffix, or safetensors without the demo-vit format)."""
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read the metadata of {path} ({e}): pass a valid weights file") from e
    if meta.get("format") != FILE_FORMAT:
        return None
    _, recipe, _ = read_demo_vit_file(path)
    return weights_source(recipe, path, sha256_file(path))
