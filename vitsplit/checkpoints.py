"""Pretrained weights for a backbone's timm ViT: reading files, converting layouts, finding caches.

One entry point, :func:`load_weights`, used by :func:`vitsplit.backbones.build_backbone`:

- a path (``.pth``/``.pt``/``.bin`` read with ``torch.load(weights_only=True)``, so no pickled code
  ever runs; ``.safetensors``; or a Hugging Face folder) holding one of three layouts:
  timm's own keys; the official DINOv2 release (``mask_token``, ``register_tokens``, ``ls1.gamma``,
  ``mlp.w12``/``mlp.w3`` for the SwiGLU giant, ``blocks.<chunk>.<i>`` in training checkpoints);
  or Hugging Face ``Dinov2Model``/``Dinov2WithRegistersModel`` (``embeddings.*``,
  ``encoder.layer.<i>.*``, ``layernorm.*``), converted without importing ``transformers``.
  The state dict may be nested under ``state_dict``/``model``/``teacher``/``module`` and its keys
  may carry a prefix (``backbone.``, ``module.``, ``teacher.backbone.``, ``dinov2.``, ...).
- ``"auto"``: the usual caches first (torch.hub's ``checkpoints/`` folder with the official file
  names, the Hugging Face hub cache for timm's weights), a download only when online, else a fast
  ``UserError`` naming ``--weights PATH`` and ``--weights random``.

Each format conversion lives in one function (after timm's ``checkpoint_filter_fn``):
:func:`hf_to_official` (HF -> DINOv2 release keys) and :func:`official_to_timm` (DINOv2 release ->
timm, delegating to timm's own ``_convert_dinov2``). Loading is strict: every key and shape must
match the architecture (no silent position-embedding or patch-embedding resampling); a mismatch
raises ``UserError`` naming the first missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import os
import pickle
import re
import socket
import threading
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbones import BackboneSpec, load_json, sha256_file
from .errors import UserError

# Keys that identify a ViT state dict, and the layout each one means.
TIMM_ANCHOR = "patch_embed.proj.weight"  # timm and the official DINOv2 release
HF_ANCHOR = "embeddings.patch_embeddings.projection.weight"  # Hugging Face Dinov2Model
# Wrapper keys of training checkpoints, tried in this order.
WRAPPER_KEYS = ("state_dict", "model", "teacher", "module")
# Where the online check connects, and how long it may take.
PROBE_ADDRESS: tuple[str, int] = ("huggingface.co", 443)
PROBE_TIMEOUT_S = 2.0
# Files of a Hugging Face model folder, in order of preference.
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
_WAYS_FORWARD = "pass --weights PATH (a .pth/.pt/.safetensors file) or --weights random"


# =========================================================================== entry point
def load_weights(vit: nn.Module, spec: BackboneSpec, weights: str | os.PathLike) -> str:
    """Load ``weights`` ("auto" or a path) into ``vit`` (built from ``spec``), strictly.

    Returns the weights_source string: ``"file <abs path> sha256:<hex>"`` for a path,
    ``"hub <id> (file <path> sha256:<hex>)"`` / ``"torch.hub <url> (file ...)"`` for ``auto``.
    Raises ``UserError`` for missing/unreadable files, foreign architectures and offline misses.
    """
    if str(weights) == "auto":
        return _load_auto(vit, spec)
    path = Path(weights).expanduser().resolve()
    if path.is_dir():
        files = hf_weight_files(path)
        if not files:
            raise UserError(f"{path} is a folder without {' or '.join(HF_WEIGHT_FILES[::2])}: pass a weights file")
        return _load_files(vit, spec, files)
    return _load_files(vit, spec, [path])


def _load_files(vit: nn.Module, spec: BackboneSpec, files: list[Path], label: str | None = None) -> str:
    origin = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} shards)"
    if len(files) == 1:
        state = backbone_state(read_checkpoint(files[0]), origin)
    else:  # shards of one flat state dict: the prefix is found once all keys are together
        merged: dict[str, Any] = {}
        for f in files:
            shard = read_checkpoint(f)
            if not isinstance(shard, Mapping):
                raise UserError(f"shard {f} does not hold a state dict: re-download the model folder")
            merged.update(shard)
        state = backbone_state(merged, origin)
    load_strict(vit, to_timm_layout(state, vit), spec, origin)
    demo = _demo_vit_source(files[0]) if len(files) == 1 and label is None else None
    if demo is not None:
        return demo
    where = ", ".join(f"file {f} sha256:{sha256_file(f)}" for f in files)
    return f"{label} ({where})" if label else where


def _demo_vit_source(path: Path) -> str | None:
    """The weights_source of a demo-vit file that cka-split pretrained itself (its recipe is in the
    safetensors metadata): a run that loads it by path still says how the weights were made."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    from . import pretrain

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # unreadable files were already reported by read_checkpoint
        return None
    if meta.get("format") != pretrain.FILE_FORMAT:
        return None
    _, recipe, _ = pretrain.read_demo_vit_file(path)
    return pretrain.weights_source(recipe, path, sha256_file(path))


# =========================================================================== reading files
def read_checkpoint(path: Path) -> Any:
    """The object stored in a weights file: safetensors, or a torch zip/legacy file read with
    ``weights_only=True`` (plain tensors and containers only; pickled code is refused)."""
    if not path.exists():
        raise UserError(f"weights file {path} does not exist: {_WAYS_FORWARD}")
    if not path.is_file():
        raise UserError(f"weights path {path} is not a file: {_WAYS_FORWARD}")
    if path.suffix == ".json":  # a sharded checkpoint's index: read by hf_weight_files
        raise UserError(f"{path} is an index file: pass the folder that holds it and its shards")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise UserError(f"cannot read {path} as safetensors ({e}): pass a valid weights file") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:  # the restricted unpickler met a class or function: never import or call it
            raise UserError(
                f"refused to load {path}: it pickles '{found.group(1)}', which is not a tensor or plain container, "
                "and loading it could run code (torch.load weights_only=True); re-save just the state dict, "
                "or convert it to .safetensors") from e
        raise UserError(f"cannot read weights file {path}: not a torch weights file that loads with "
                        "weights_only=True (no code is run): pass a .pth/.pt/.safetensors state dict") from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"cannot read weights file {path} ({type(e).__name__}: {e}): pass a .pth/.pt/.safetensors file") from e


def _looks_like_safetensors(path: Path) -> bool:
    """True if the file starts like safetensors: an 8-byte little-endian header length then '{'."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def hf_weight_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face model folder (one file, or the shards of an index)."""
    for name in HF_WEIGHT_FILES:
        p = folder / name
        if not p.is_file():
            continue
        if name.endswith(".index.json"):
            index = load_json(p)
            shards = sorted(set((index.get("weight_map") or {}).values()))
            if not shards:
                raise UserError(f"{p} lists no weight shards: re-download the model folder")
            return [folder / s for s in shards]
        return [p]
    return []


def backbone_state(obj: Any, origin: Path | str) -> dict[str, torch.Tensor]:
    """The backbone's tensors from a loaded checkpoint: unwraps ``state_dict``/``model``/
    ``teacher``/``module`` nesting and strips the key prefix in front of the backbone (found by
    its patch-embedding key; a teacher is preferred over a student)."""
    for _ in range(len(WRAPPER_KEYS) + 1):
        if not isinstance(obj, Mapping):
            raise UserError(f"{origin} does not hold a state dict (found {type(obj).__name__}): {_WAYS_FORWARD}")
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        prefixes = [k[: len(k) - len(a)] for k in tensors for a in (TIMM_ANCHOR, HF_ANCHOR)
                    if k == a or k.endswith("." + a)]
        if prefixes:
            prefix = min(prefixes, key=lambda p: ("student" in p, len(p), p))
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    keys = ", ".join(list(map(str, obj.keys()))[:6]) if isinstance(obj, Mapping) else ""
    raise UserError(f"{origin} holds no ViT weights (no key ending in '{TIMM_ANCHOR}' or '{HF_ANCHOR}'; "
                    f"first keys: {keys or 'none'}): {_WAYS_FORWARD}")


# =========================================================================== layouts
def to_timm_layout(state: dict[str, torch.Tensor], vit: nn.Module) -> dict[str, torch.Tensor]:
    """Any supported layout (prefix already stripped) -> timm keys of ``vit``."""
    if HF_ANCHOR in state:
        state = official_to_timm(hf_to_official(state), vit)
    elif ("mask_token" in state or "register_tokens" in state
          or any(_OFFICIAL_ONLY.match(k) for k in state)):
        state = official_to_timm(state, vit)
    return state


_OFFICIAL_ONLY = re.compile(r"blocks\.\d+\.(\d+\.|mlp\.w12\.|mlp\.w3\.)")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


def official_to_timm(state: dict[str, torch.Tensor], vit: nn.Module) -> dict[str, torch.Tensor]:
    """DINOv2 release keys -> timm keys.

    Block chunks of training checkpoints (``blocks.<chunk>.<i>.``; DINOv2's ``BlockChunk`` keeps
    the global block index ``i``) become ``blocks.<i>.``; the rest is timm's own converter
    (``timm.models.vision_transformer._convert_dinov2``): drops ``mask_token``, renames the
    SwiGLU ``w12``/``w3`` to ``fc1``/``fc2`` and, with registers, moves ``register_tokens`` to
    ``reg_token`` and folds the cls position (``pos_embed[:, 0]``) into ``cls_token`` (timm's
    register models use ``no_embed_class``).
    """
    from timm.models.vision_transformer import _convert_dinov2

    unchunked = {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in state.items()}
    return _convert_dinov2(unchunked, vit)


_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_IN_BLOCK = {  # HF name inside encoder.layer.<i>. -> DINOv2 release name inside blocks.<i>.
    "norm1.": "norm1.", "norm2.": "norm2.",
    "attention.output.dense.": "attn.proj.",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2.",
    "mlp.weights_in.": "mlp.w12.", "mlp.weights_out.": "mlp.w3.",
}
_HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")
_HF_BLOCK = re.compile(r"encoder\.layer\.(\d+)\.(.+)$")


def hf_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` keys -> DINOv2 release keys.

    HF keeps separate ``query``/``key``/``value`` projections; the release (and timm) use one
    ``qkv`` linear whose output rows are [q; k; v], so they are concatenated along dim 0. HF's
    position embeddings include the cls position, as the release's do. Keys this function does
    not know are kept as they are, so that strict loading names them.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
            continue
        m = _HF_QKV.match(k)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
            continue
        m = _HF_BLOCK.match(k)
        if m:
            rest = m.group(2)
            for hf, official in _HF_IN_BLOCK.items():
                if rest.startswith(hf):
                    out[f"blocks.{m.group(1)}.{official}{rest[len(hf):]}"] = v
                    break
            else:
                out[k] = v
            continue
        out[k] = v
    for (i, kind), parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
        else:  # incomplete: keep the HF names so the strict check reports them
            out.update({f"encoder.layer.{i}.attention.attention.{n}.{kind}": t for n, t in parts.items()})
    return out


# =========================================================================== strict loading
def load_strict(vit: nn.Module, state: dict[str, torch.Tensor], spec: BackboneSpec, origin: str) -> None:
    """Copy ``state`` (timm keys) into ``vit`` if every key and shape matches; else ``UserError``
    naming the first missing, unexpected and mis-shaped keys. A classifier (``head.*``) in the
    checkpoint is dropped when the backbone has none (backbones are built with ``num_classes=0``)."""
    expected = vit.state_dict()
    if "head.weight" not in expected:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(t.shape)}" for k, t in expected.items()
              if k in state and tuple(state[k].shape) != tuple(t.shape)]
    problems = []
    for title, items in (("shape mismatch (checkpoint != model)", shapes), ("missing", missing),
                         ("unexpected", unexpected)):
        if items:
            more = f" (+{len(items) - 4} more)" if len(items) > 4 else ""
            problems.append(f"{title}: {', '.join(items[:4])}{more}")
    if problems:
        raise UserError(f"{origin} does not fit '{spec.name}' (timm {spec.timm_name}): {'; '.join(problems)}; "
                        "pass weights made for this architecture, or the --model they were made for")
    vit.load_state_dict(state, strict=True)


# =========================================================================== Hugging Face folders
def hf_spec(name: str) -> BackboneSpec:
    """``hf:<dir>`` (or ``hf:<org>/<model>`` already in the HF hub cache) -> a spec for the
    equivalent timm DINOv2 architecture, read from the folder's ``config.json``
    (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``mlp_ratio``,
    ``patch_size``, ``image_size``, ``use_swiglu_ffn``, ``num_register_tokens``)."""
    ref = name[len("hf:"):]
    folder = _hf_folder(ref)
    cfg = load_json(folder / "config.json")
    kind = cfg.get("model_type")
    if kind not in ("dinov2", "dinov2_with_registers"):
        raise UserError(f"{folder}/config.json has model_type {kind!r}: hf: supports DINOv2 "
                        "(dinov2, dinov2_with_registers); use a timm name for other ViTs")
    if cfg.get("hidden_act", "gelu") != "gelu" or float(cfg.get("layer_norm_eps", 1e-6)) != 1e-6:
        raise UserError(f"{folder}/config.json uses hidden_act={cfg.get('hidden_act')!r}, layer_norm_eps="
                        f"{cfg.get('layer_norm_eps')}: only DINOv2's gelu and 1e-6 map onto timm's architecture")
    try:
        c = int(cfg["hidden_size"])
        registers = int(cfg.get("num_register_tokens", 0) or 0)
        swiglu = bool(cfg.get("use_swiglu_ffn", False))
        kwargs: dict[str, Any] = dict(
            embed_dim=c, depth=int(cfg["num_hidden_layers"]), num_heads=int(cfg["num_attention_heads"]),
            patch_size=int(cfg.get("patch_size", 14)), img_size=int(cfg.get("image_size", 518)),
            in_chans=int(cfg.get("num_channels", 3)), qkv_bias=bool(cfg.get("qkv_bias", True)),
            init_values=float(cfg.get("layerscale_value", 1.0)), num_classes=0, dynamic_img_size=True,
        )
        ratio = float(cfg.get("mlp_ratio", 4))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{folder}/config.json lacks or mangles a DINOv2 field ({e}): re-download the model folder") from e
    if swiglu:
        # HF's SwiGLU width: h = (int(int(C * mlp_ratio) * 2 / 3) + 7) // 8 * 8, with one packed input
        # linear of 2h rows (timm's SwiGLUPacked). timm sizes that linear as int(C * mlp_ratio'), so
        # mlp_ratio' = (2h + 0.5) / C lands on exactly 2h despite float rounding.
        h = (int(int(c * ratio) * 2 / 3) + 7) // 8 * 8
        kwargs["mlp_ratio"] = (2 * h + 0.5) / c
    else:
        kwargs["mlp_ratio"] = ratio
    if registers:
        kwargs.update(reg_tokens=registers, no_embed_class=True)
    timm_name = "vit_{}_patch14{}_dinov2".format("giant" if swiglu else "small", "_reg4" if registers else "")
    hub_id = ref if not Path(ref).expanduser().is_dir() else None
    return BackboneSpec(name=name, timm_name=timm_name, timm_kwargs=kwargs, hf_id=hub_id, hf_dir=str(folder))


def _hf_folder(ref: str) -> Path:
    """A local folder, or the snapshot folder of a hub id already in the HF cache."""
    p = Path(ref).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"{p} has no config.json: hf:<dir> needs a Hugging Face DINOv2 folder (config.json + weights)")
        return p.resolve()
    if re.fullmatch(r"[\w.-]+/[\w.-]+", ref) and not p.exists():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref, "config.json", cache_dir=hf_cache_dir())
        if isinstance(cached, str):
            return Path(cached).parent
        reason = offline_reason()
        if reason is None:
            return Path(_hf_download(ref, "config.json")).parent
        raise UserError(f"'{ref}' is neither a folder nor in the Hugging Face cache, and {reason}: "
                        "download it once online, or use hf:<local folder>")
    raise UserError(f"hf:{ref}: no such folder; hf:<dir> needs a Hugging Face DINOv2 folder (config.json + weights)")


# =========================================================================== auto: caches, download
def torch_hub_checkpoints_dir() -> Path:
    """torch.hub's checkpoint folder: ``$TORCH_HOME/hub/checkpoints`` (default ~/.cache/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (``HF_HUB_CACHE``,
    else ``$HF_HOME/hub``, else huggingface_hub's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def demo_vit_cache_path() -> Path:
    """Where ``cka-split demo`` keeps the pretrained demo-vit: the cached file if there is one,
    else where the full recipe's weights will be written (``demo-vit-<recipe id>.safetensors``
    under ``$CKA_SPLIT_CACHE``, ``$XDG_CACHE_HOME/cka-split`` or ``~/.cache/cka-split``)."""
    from . import pretrain

    return pretrain.find_cached_demo_vit() or pretrain.cache_path(pretrain.FULL_RECIPE)


def hub_id(spec: BackboneSpec) -> str | None:
    """The Hugging Face repo holding timm's pretrained weights for ``spec`` (its own ``hf_id``,
    else the default tag of timm's pretrained config)."""
    if spec.hf_id:
        return spec.hf_id
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(spec.timm_name)
    except (RuntimeError, KeyError, ValueError):
        return None
    return getattr(cfg, "hf_hub_id", None) or None


def cached_weights(spec: BackboneSpec) -> list[tuple[Path, str]]:
    """Cached weight files for ``spec`` as (path, label), best first: torch.hub's
    ``checkpoints/<official file>``, then the HF hub cache (``model.safetensors``,
    ``pytorch_model.bin``)."""
    found: list[tuple[Path, str]] = []
    if spec.hub_file:
        p = torch_hub_checkpoints_dir() / spec.hub_file
        if p.is_file():
            found.append((p, f"torch.hub {spec.hub_url or spec.hub_file}"))
    repo = hub_id(spec)
    if repo:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(repo, filename, cache_dir=hf_cache_dir())
            if isinstance(hit, str):
                found.append((Path(hit), f"hub {repo}"))
                break
    return found


def offline_reason() -> str | None:
    """Why we are offline (``HF_HUB_OFFLINE`` set, or no TCP connection to
    ``PROBE_ADDRESS`` within ``PROBE_TIMEOUT_S``), or None when online. The probe runs in a
    daemon thread so that a slow DNS lookup cannot hold the caller past the timeout."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    result: dict[str, Any] = {}
    host, port = PROBE_ADDRESS

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            result["ok"] = True
        except OSError as e:
            result["error"] = e

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(PROBE_TIMEOUT_S)
    if result.get("ok"):
        return None
    return f"there is no network ({host}:{port} unreachable within {PROBE_TIMEOUT_S:g} s)"


def _hf_download(repo: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()  # library code does not print; the CLI reports progress
    try:
        return hf_hub_download(repo, filename, cache_dir=hf_cache_dir())
    finally:
        if not was_disabled:
            enable_progress_bars()


def _download(spec: BackboneSpec) -> tuple[Path, str]:
    """Download pretrained weights (timm's on the HF hub, else the official torch.hub URL)."""
    errors = []
    repo = hub_id(spec)
    if repo:
        for filename in ("model.safetensors", "pytorch_model.bin"):
            try:
                return Path(_hf_download(repo, filename)), f"hub {repo}"
            except Exception as e:  # noqa: BLE001 - any hub failure falls through to the next source
                errors.append(f"{repo}/{filename}: {type(e).__name__}")
    if spec.hub_url and spec.hub_file:
        dest = torch_hub_checkpoints_dir() / spec.hub_file
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(spec.hub_url, str(dest), progress=False)  # writes a temp, then moves
            return dest, f"torch.hub {spec.hub_url}"
        except Exception as e:  # noqa: BLE001
            errors.append(f"{spec.hub_url}: {type(e).__name__}")
    why = "; ".join(errors) if errors else "no known download location"
    raise UserError(f"could not download pretrained weights for '{spec.name}' ({why}): {_WAYS_FORWARD}")


def _load_auto(vit: nn.Module, spec: BackboneSpec) -> str:
    if spec.name == "demo-vit":
        from .pretrain import load_cached_demo_vit_into

        return load_cached_demo_vit_into(vit)
    if spec.hf_dir:
        folder = Path(spec.hf_dir)
        files = hf_weight_files(folder)
        if not files and spec.hf_id and offline_reason() is None:
            files = [Path(_hf_download(spec.hf_id, "model.safetensors"))]
        if not files:
            raise UserError(f"{folder} has no weights ({', '.join(HF_WEIGHT_FILES)}): {_WAYS_FORWARD}")
        return _load_files(vit, spec, files, label=f"hf {spec.hf_id}" if spec.hf_id else None)
    found = cached_weights(spec)
    if found:
        path, label = found[0]
        return _load_files(vit, spec, [path], label=label)
    reason = offline_reason()
    if reason is not None:
        looked = [str(torch_hub_checkpoints_dir() / spec.hub_file)] if spec.hub_file else []
        repo = hub_id(spec)
        if repo:
            looked.append(f"{repo} in {hf_cache_dir()}")
        where = f"looked for {' and '.join(looked)}" if looked else "it has no known pretrained weights"
        raise UserError(f"no cached pretrained weights for '{spec.name}' ({where}) and {reason}: {_WAYS_FORWARD}")
    path, label = _download(spec)
    return _load_files(vit, spec, [path], label=label)
