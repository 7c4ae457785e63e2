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
from torch import nn

from ..errors import UserError
from ..fileio import atomic_write_safetensors, safetensors_bytes, sha256_file
from .backbone import Backbone
from .names import DEMO_VIT_KWARGS, create_vit, resolve_name

PRETEXTS = {
    "simclr": "SimCLR contrastive learning between cropped, recoloured views",
    "mae": "MAE-style masked patch reconstruction",
}
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

    Pretext fields: ``mask_ratio`` and ``decoder_*`` for ``mae``; ``view_size`` (px of each view),
    ``crop_min`` (smallest crop, as a fraction of the image's area), ``temperature``, ``proj_hidden``
    and ``proj_dim`` (projection MLP) for ``simclr``. ``threads``: the intra-op thread count the
    loop runs with, part of the recipe because the rounding of a matrix product depends on it.
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
    view_size: int = 56
    crop_min: float = 0.25
    temperature: float = 0.2
    proj_hidden: int = 512
    proj_dim: int = 128
    data: str = "synthetic"
    dataset_length: int = 2048
    arch: tuple[tuple[str, Any], ...] = field(default_factory=tuple)
    threads: int = 1
    version: int = 2

    def __post_init__(self) -> None:
        if self.pretext not in PRETEXTS:
            raise UserError(f"unknown pretext '{self.pretext}': use one of {', '.join(PRETEXTS)}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise UserError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0.0 < self.crop_min <= 1.0 or self.temperature <= 0.0 or self.view_size < 14:
            raise UserError("a simclr recipe needs 0 < crop_min <= 1, temperature > 0 and view_size >= 14 px")
        if self.threads < 1:
            raise UserError(f"threads must be >= 1, got {self.threads}")
        if self.steps < 1 or self.batch_size < 1 or self.dataset_length < self.batch_size:
            raise UserError("a demo recipe needs steps >= 1 and dataset_length >= batch_size >= 1")
        unknown = [k for k, _ in self.arch if k not in DEMO_VIT_KWARGS]
        if unknown:
            raise UserError(
                f"arch overrides {unknown} are not demo-vit architecture keys: use {sorted(DEMO_VIT_KWARGS)}"
            )

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


# The demo's recipe: the weights shipped in the package (``SHIPPED_WEIGHTS``) were made with it by
# `cka-split pretrain-demo`; what it measures (CKA hierarchy, cost) is in the README.
DEMO_RECIPE = DemoRecipe(pretext="simclr", steps=500, grad_clip=3.0, data="synthetic", dataset_length=2048, threads=1)

# The pretrained weights ship inside the package, next to this module, with their sha256: the demo
# never pretrains, and a damaged or replaced file is refused rather than silently used.
SHIPPED_WEIGHTS = Path(__file__).with_name("demo-vit.safetensors")
SHIPPED_SHA256 = "7eaaca8a53ee718b62e643a7ccd96cc9d64dcd992b32ce8d672e343d2f94cbde"
PRETRAIN_COMMAND = "cka-split pretrain-demo"


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


def shipped_demo_vit() -> Path | None:
    """The weights shipped in the package, after checking their sha256; None if the package has none
    (a checkout before they were made). Raises ``UserError`` if the file is not the one recorded."""
    if not SHIPPED_WEIGHTS.is_file():
        return None
    digest = sha256_file(SHIPPED_WEIGHTS)
    if digest != SHIPPED_SHA256:
        raise UserError(
            f"{SHIPPED_WEIGHTS} has sha256 {digest}, not the recorded {SHIPPED_SHA256}: "
            f"reinstall cka-split, or make the file again with `{PRETRAIN_COMMAND} --out {SHIPPED_WEIGHTS}`"
        )
    return SHIPPED_WEIGHTS


def find_demo_vit(directory: str | os.PathLike | None = None) -> Path | None:
    """The demo's weights: the shipped file, else the demo recipe's file in the cache, else None."""
    shipped = shipped_demo_vit()
    if shipped is not None:
        return shipped
    path = cache_path(DEMO_RECIPE, directory)
    return path if path.is_file() else None


def load_demo_vit_into(vit: nn.Module, directory: str | os.PathLike | None = None) -> str:
    """``build_backbone("demo-vit", "auto")``: load the demo's weights (:func:`find_demo_vit`) into
    ``vit`` (a fresh ``DEMO_VIT_KWARGS`` ViT, strict) and return the weights_source string. Raises
    ``UserError`` saying how to make them when there are none."""
    path = find_demo_vit(directory)
    if path is None:
        where = Path(directory) if directory is not None else cache_dir()
        raise UserError(
            f"no pretrained demo-vit shipped or in {where}: run `{PRETRAIN_COMMAND}` (or `cka-split demo`) "
            "to make it, or pass --weights random"
        )
    state, recipe, _ = read_demo_vit_file(path)
    try:
        vit.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(
            f"{path} does not fit the demo-vit architecture ({e}): delete it and run `{PRETRAIN_COMMAND}`"
        ) from e
    return weights_source(recipe, path, sha256_file(path))


def weights_source(recipe: DemoRecipe, path: Path | None = None, sha256: str | None = None) -> str:
    where = f"file {path} sha256:{sha256}" if path is not None else "in memory, not saved"
    return f"demo-vit pretrained by cka-split ({recipe.describe()}), {where}"


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensors alone (their canonical safetensors encoding without metadata): the same
    for the same weights whatever else the file records."""
    return hashlib.sha256(safetensors_bytes(state)).hexdigest()


def save_demo_vit(
    vit: nn.Module, recipe: DemoRecipe, path: str | os.PathLike, losses: list[float], baselines: list[float]
) -> Path:
    """Write the ViT's state dict (timm keys) atomically as safetensors, byte for byte the same for
    the same weights and recipe; the metadata holds the recipe, its id, the command that makes it,
    the weights' own sha256 (:func:`weights_sha256`), the PyTorch version and the loss curve."""
    state = {k: v.detach().cpu().contiguous() for k, v in vit.state_dict().items()}
    meta = {
        "format": FILE_FORMAT,
        "recipe_id": recipe.recipe_id,
        "recipe": json.dumps(recipe.to_json(), sort_keys=True),
        "description": recipe.describe(),
        "command": PRETRAIN_COMMAND,
        "weights_sha256": weights_sha256(state),
        "torch": torch.__version__,
        "losses": json.dumps([round(x, 6) for x in losses]),
        "baselines": json.dumps([round(x, 6) for x in baselines]),
    }
    return atomic_write_safetensors(path, state, meta)


def read_demo_vit_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], DemoRecipe, dict[str, str]]:
    """(state dict, recipe, metadata) of a demo-vit file. Raises ``UserError`` if it is not one."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read demo-vit weights {path} ({e}): delete it and run `{PRETRAIN_COMMAND}`") from e
    if meta.get("format") != FILE_FORMAT or "recipe" not in meta:
        raise UserError(f"{path} is not a demo-vit file written by cka-split: delete it and run `{PRETRAIN_COMMAND}`")
    try:
        recipe = DemoRecipe.from_json(json.loads(meta["recipe"]))
    except (TypeError, ValueError) as e:
        raise UserError(
            f"{path}: its recipe was written by another version of cka-split ({e}): "
            f"delete it and run `{PRETRAIN_COMMAND}`"
        ) from e
    if recipe.recipe_id != meta.get("recipe_id"):
        raise UserError(
            f"{path}: its recipe does not hash to its recorded id (written by another version?): "
            f"delete it and run `{PRETRAIN_COMMAND}`"
        )
    if "weights_sha256" in meta and weights_sha256(state) != meta["weights_sha256"]:
        raise UserError(
            f"{path}: its weights do not hash to the recorded weights_sha256 (a damaged file): "
            f"delete it and run `{PRETRAIN_COMMAND}`"
        )
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
