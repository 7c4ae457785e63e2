"""Where backbone weights come from, and the one place each checkpoint format is converted.

Formats read (``read_state_dict`` + ``to_timm``), from ``.pth``/``.pt`` (``torch.load`` with
``weights_only=True``: a file never runs pickled code) or ``.safetensors``:
- timm layout (``blocks.0.attn.qkv.weight``, ``reg_token``, ...).
- official DINOv2 layout (Oquab et al. 2023, facebookresearch/dinov2 ``hub/backbones.py`` files
  ``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth``): ``mask_token``, ``register_tokens``,
  ``ls1.gamma``, SwiGLU ``mlp.w12/w3``; converted by timm's own ``checkpoint_filter_fn``
  (``_convert_dinov2``), which also resamples ``pos_embed`` to the model's grid.
- Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` layout (``embeddings.*``,
  ``encoder.layer.N.attention.attention.query.*``, ``layer_scale1.lambda1``, ``layernorm.*``):
  renamed to the official layout here (:func:`hf_to_official`, no ``transformers`` needed), then
  converted like an official file.
- any of these nested under ``model`` / ``state_dict`` / ``teacher`` / ``student`` / ``module``,
  or with key prefixes ``module.``, ``backbone.``, ``teacher.backbone.``, ``dinov2.``, ...

``weights="auto"`` looks only in the usual caches first (torch.hub's ``checkpoints/`` folder, the
Hugging Face hub cache, the demo's own cache), downloads only when online, and otherwise fails
within seconds naming the two ways forward (``--weights PATH``, ``--weights random``).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbones import BackboneSpec, sha256_file
from .errors import UserError

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_NEST_KEYS = ("model", "state_dict", "teacher", "student", "module", "model_state", "backbone")
_PREFIXES = ("module.", "teacher.backbone.", "student.backbone.", "teacher.", "backbone.", "model.", "dinov2.",
             "encoder.backbone.")


# ----------------------------------------------------------------------------------- reading files
def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, unwrapped from common nesting and prefixes. Raises UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist (give --weights PATH to a .pth/.pt/.safetensors file, "
                        "'auto' or 'random')")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"cannot read {path} as safetensors ({e})") from e
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors of every kind, including refused globals
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load {path} as a weights-only torch file ({first}); files that need "
                            "arbitrary pickled code are refused") from e
    return unwrap(obj, path)


def unwrap(obj: Any, path: Path | str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Descend into nesting keys (``model``, ``state_dict``, ``teacher``, ...) until a flat dict of
    tensors remains, then strip a prefix that every key shares."""
    for _ in range(4):
        if not isinstance(obj, dict):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _NEST_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path} holds no state dict of tensors")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise UserError(f"{path} holds no tensors")
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    """'hf', 'official' (DINOv2 release) or 'timm'."""
    if any(k.startswith("embeddings.") for k in sd) and any(k.startswith("encoder.layer.") for k in sd):
        return "hf"
    if "mask_token" in sd or "register_tokens" in sd or any(".mlp.w12." in k for k in sd):
        return "official"
    return "timm"


# ------------------------------------------------------------------------------ format conversion
def hf_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face Dinov2(WithRegisters)Model keys -> official DINOv2 keys (q, k, v fused to qkv)."""
    out: dict[str, torch.Tensor] = {}
    simple = {
        "embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
        "embeddings.register_tokens": "register_tokens", "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
    }
    per_layer = {
        "norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj", "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2", "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3",
    }
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k in simple:
            out[simple[k]] = v
            continue
        if not k.startswith("encoder.layer."):
            out[k] = v  # unknown: kept, so that a strict load names it
            continue
        idx, _, rest = k[len("encoder.layer."):].partition(".")
        i = int(idx)
        if rest.startswith("attention.attention."):
            which, _, kind = rest[len("attention.attention."):].partition(".")
            qkv.setdefault((i, kind), {})[which] = v
        elif rest == "layer_scale1.lambda1":
            out[f"blocks.{i}.ls1.gamma"] = v
        elif rest == "layer_scale2.lambda1":
            out[f"blocks.{i}.ls2.gamma"] = v
        else:
            mod, _, kind = rest.rpartition(".")
            out[f"blocks.{i}.{per_layer.get(mod, mod)}.{kind}"] = v
    for (i, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise UserError(f"HF checkpoint layer {i}: attention {kind} has {sorted(parts)}, needs query, key and value")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def to_timm(sd: dict[str, torch.Tensor], vit: nn.Module) -> dict[str, torch.Tensor]:
    """Any supported layout -> the timm state dict of ``vit`` (pos_embed resampled to its grid)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    if detect_layout(sd) == "hf":
        sd = hf_to_official(sd)
    return checkpoint_filter_fn(dict(sd), vit)


def load_strict(vit: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Load ``sd`` into ``vit`` requiring the same keys and shapes; else a UserError naming the first
    mismatches (a checkpoint for another architecture)."""
    own = vit.state_dict()
    problems = [f"missing {k} {tuple(own[k].shape)}" for k in own if k not in sd]
    problems += [f"unexpected {k} {tuple(sd[k].shape)}" for k in sd if k not in own]
    problems += [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if problems:
        more = f" (+{len(problems) - 4} more)" if len(problems) > 4 else ""
        raise UserError(f"{what} does not fit this architecture: " + "; ".join(problems[:4]) + more
                        + ". Check --model against the checkpoint")
    vit.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


def load_file_into(vit: nn.Module, path: str | os.PathLike) -> str:
    """Load a weights file (any supported layout) into ``vit``; returns the weights_source string."""
    path = Path(path).expanduser().resolve()
    sd = read_state_dict(path)
    try:
        converted = to_timm(sd, vit)
    except (RuntimeError, ValueError, KeyError, IndexError) as e:
        raise UserError(f"{path} could not be converted to this architecture ({e}); check --model") from e
    load_strict(vit, converted, str(path))
    return f"file {path} sha256:{sha256_file(path)}"


# ----------------------------------------------------------------------------------- hf:<dir> names
def hf_spec(name: str) -> BackboneSpec:
    """``hf:<dir>``: the architecture from a Hugging Face DINOv2 folder's config.json."""
    folder = Path(name[len("hf:"):]).expanduser()
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{name}: {cfg_path} not found; hf:<dir> needs a Hugging Face DINOv2 folder "
                        "(config.json + model.safetensors or pytorch_model.bin)")
    try:
        cfg = json.loads(cfg_path.read_text())
        c, depth, heads = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{cfg_path} is not a DINOv2 config ({e})") from e
    if cfg.get("model_type", "dinov2") not in ("dinov2", "dinov2_with_registers"):
        raise UserError(f"{cfg_path}: model_type '{cfg.get('model_type')}' is not dinov2; only DINOv2 folders are read")
    ratio = float(cfg.get("mlp_ratio", 4))
    regs = int(cfg.get("num_register_tokens", 0))
    kwargs: dict[str, Any] = dict(
        embed_dim=c, depth=depth, num_heads=heads, patch_size=int(cfg.get("patch_size", 14)),
        img_size=int(cfg.get("image_size", 518)), init_values=float(cfg.get("layerscale_value", 1.0)),
        qkv_bias=bool(cfg.get("qkv_bias", True)), num_classes=0, dynamic_img_size=True,
    )
    base = "vit_small_patch14_reg4_dinov2" if regs else "vit_small_patch14_dinov2"
    if regs:
        kwargs["reg_tokens"] = regs
    if cfg.get("use_swiglu_ffn", False):
        from timm.layers import SwiGLUPacked

        # HF/official SwiGLU hidden width: int(C * r * 2/3) rounded up to a multiple of 8; timm's packed
        # fc1 is 2 x hidden wide, so its mlp_ratio is 2 * hidden / C (+0.5 / C against float truncation).
        hidden = (int(int(c * ratio) * 2 / 3) + 7) // 8 * 8
        kwargs.update(mlp_ratio=(2 * hidden + 0.5) / c, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    else:
        kwargs["mlp_ratio"] = ratio
    return BackboneSpec(name=name, timm_name=base, timm_kwargs=kwargs, hf_dir=str(folder.resolve()))


def _hf_dir_weights(folder: Path) -> Path:
    for fname in ("model.safetensors", "pytorch_model.bin"):
        if (folder / fname).is_file():
            return folder / fname
    raise UserError(f"{folder} has no model.safetensors or pytorch_model.bin; give --weights PATH")


# ----------------------------------------------------------------------------------------- auto
def torch_hub_checkpoint(spec: BackboneSpec) -> Path | None:
    """The official release file in torch.hub's cache (``$TORCH_HOME/hub/checkpoints``), if there."""
    if not spec.hub_file:
        return None
    path = Path(torch.hub.get_dir()) / "checkpoints" / spec.hub_file
    return path if path.is_file() else None


def _hf_hub_id(spec: BackboneSpec) -> str | None:
    if spec.hf_id:
        return spec.hf_id
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(spec.name)
    except Exception:  # unknown tag: no hub weights known
        return None
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def hf_cache_checkpoint(spec: BackboneSpec) -> Path | None:
    """timm's weights for ``spec`` in the Hugging Face hub cache (no network), if there."""
    repo = _hf_hub_id(spec)
    if not repo:
        return None
    from huggingface_hub import try_to_load_from_cache

    for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, fname)
        if isinstance(hit, str) and Path(hit).is_file():
            return Path(hit)
    return None


def is_online(host: str = "huggingface.co", port: int = 443, timeout: float = 2.0) -> bool:
    """False when HF_HUB_OFFLINE is set or a TCP connection does not open within ``timeout``
    (DNS included: the probe runs in a thread that is abandoned at the deadline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def _offline_error(spec: BackboneSpec, looked: list[str]) -> UserError:
    where = "; ".join(looked) if looked else "no cache applies to this model"
    return UserError(f"no pretrained weights for '{spec.name}' are cached here ({where}) and the hub cannot be "
                     "reached: pass --weights PATH (a local .pth/.safetensors in DINOv2, timm or HF layout) "
                     "or --weights random (explicitly untrained)")


def load_auto(vit: nn.Module, spec: BackboneSpec) -> str:
    """``weights="auto"``: caches first, then (only when online) a download."""
    if spec.name == "demo-vit":
        from .pretrain import load_cached_demo_vit_into

        return load_cached_demo_vit_into(vit)
    if spec.hf_dir:
        path = _hf_dir_weights(Path(spec.hf_dir))
        return load_file_into(vit, path)
    looked = []
    hub = torch_hub_checkpoint(spec)
    if hub is not None:
        return "torch.hub " + load_file_into(vit, hub)
    if spec.hub_file:
        looked.append(f"torch.hub {Path(torch.hub.get_dir()) / 'checkpoints' / spec.hub_file}")
    cached = hf_cache_checkpoint(spec)
    repo = _hf_hub_id(spec)
    if cached is not None:
        return f"hub {repo} " + load_file_into(vit, cached)
    if repo:
        looked.append(f"Hugging Face cache for {repo}")
    if not (repo or spec.hub_url) or not is_online():
        raise _offline_error(spec, looked)
    if repo:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(repo, "model.safetensors")
        except Exception as e:  # network or hub errors: say which and how to go on
            raise UserError(f"downloading {repo} failed ({type(e).__name__}: {e}); pass --weights PATH or --weights random") from e
        return f"hub {repo} " + load_file_into(vit, path)
    dst = Path(torch.hub.get_dir()) / "checkpoints" / str(spec.hub_file)
    try:
        torch.hub.download_url_to_file(str(spec.hub_url), str(dst), progress=False)
    except Exception as e:
        raise UserError(f"downloading {spec.hub_url} failed ({e}); pass --weights PATH or --weights random") from e
    return "torch.hub " + load_file_into(vit, dst)


def load_weights(vit: nn.Module, spec: BackboneSpec, weights: str) -> str:
    """Load ``weights`` ("auto" or a file path) into ``vit``; returns the weights_source string."""
    if weights == "auto":
        return load_auto(vit, spec)
    path = Path(weights).expanduser()
    if path.is_dir():
        return load_file_into(vit, _hf_dir_weights(path))
    if path.suffix not in WEIGHT_SUFFIXES and not path.is_file():
        raise UserError(f"--weights takes auto, random, or a weights file ({', '.join(WEIGHT_SUFFIXES)}); "
                        f"'{weights}' is none of these")
    return load_file_into(vit, path)
