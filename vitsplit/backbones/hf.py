"""Hugging Face DINOv2 and DINOv3 folders (``hf:<dir>`` or ``hf:<org>/<model>``): the equivalent timm
spec and the folder's weight files. Their key layouts are converted by
:func:`vitsplit.backbones.layouts.hf_to_official` (DINOv2) and
:func:`vitsplit.backbones.dinov3_layouts.hf_dinov3_to_timm` (DINOv3)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..fileio import read_json
from .dinov3_layouts import hf_dinov3_kwargs
from .hub import hf_cache_dir, hf_download, offline_reason
from .spec import BackboneSpec

# timm's DINOv2 size names by (width, SwiGLU MLP).
_TIMM_SIZES = {(384, False): "small", (768, False): "base", (1024, False): "large", (1536, True): "giant"}
# Files of a Hugging Face model folder, in order of preference.
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def hf_spec(name: str) -> BackboneSpec:
    """``hf:<dir>`` (or ``hf:<org>/<model>`` already in the HF hub cache) -> a spec for the
    equivalent timm architecture, read from the folder's ``config.json``: DINOv2 (``hidden_size``,
    ``num_hidden_layers``, ``num_attention_heads``, ``mlp_ratio``, ``patch_size``, ``image_size``,
    ``use_swiglu_ffn``, ``num_register_tokens``) or DINOv3 (``model_type`` ``dinov3_vit``, see
    :func:`~vitsplit.backbones.dinov3_layouts.hf_dinov3_kwargs`)."""
    ref = name[len("hf:") :]
    folder = _hf_folder(ref)
    cfg = read_json(folder / "config.json")
    kind = cfg.get("model_type")
    hub_id = ref if not Path(ref).expanduser().is_dir() else None
    if kind == "dinov3_vit":
        kwargs = hf_dinov3_kwargs(cfg, f"{folder}/config.json")
        label = (
            f"a DINOv3 ViT of width {kwargs['embed_dim']} and {kwargs['depth']} blocks "
            "(timm vit_small_patch16_dinov3 architecture with the folder's sizes)"
        )
        return BackboneSpec(
            name=name,
            timm_name="vit_small_patch16_dinov3",
            timm_kwargs=kwargs,
            hf_id=hub_id,
            hf_dir=str(folder),
            arch_label=label,
            gated=hub_id is not None,
        )
    if kind not in ("dinov2", "dinov2_with_registers"):
        raise UserError(
            f"{folder}/config.json has model_type {kind!r}: hf: supports DINOv2 "
            "(dinov2, dinov2_with_registers) and DINOv3 (dinov3_vit); use a timm name for other ViTs"
        )
    if cfg.get("hidden_act", "gelu") != "gelu" or float(cfg.get("layer_norm_eps", 1e-6)) != 1e-6:
        raise UserError(
            f"{folder}/config.json uses hidden_act={cfg.get('hidden_act')!r}, layer_norm_eps="
            f"{cfg.get('layer_norm_eps')}: only DINOv2's gelu and 1e-6 map onto timm's architecture"
        )
    try:
        c = int(cfg["hidden_size"])
        registers = int(cfg.get("num_register_tokens", 0) or 0)
        swiglu = bool(cfg.get("use_swiglu_ffn", False))
        kwargs: dict[str, Any] = dict(
            embed_dim=c,
            depth=int(cfg["num_hidden_layers"]),
            num_heads=int(cfg["num_attention_heads"]),
            patch_size=int(cfg.get("patch_size", 14)),
            img_size=int(cfg.get("image_size", 518)),
            in_chans=int(cfg.get("num_channels", 3)),
            qkv_bias=bool(cfg.get("qkv_bias", True)),
            init_values=float(cfg.get("layerscale_value", 1.0)),
            num_classes=0,
            dynamic_img_size=True,
        )
        ratio = float(cfg.get("mlp_ratio", 4))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"{folder}/config.json lacks or mangles a DINOv2 field ({e}): re-download the model folder"
        ) from e
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
    # timm's DINOv2 architecture of this width and MLP kind; a width timm has no name for is built
    # from the architecture with the same MLP kind (SwiGLU: giant, else small) and named by its shape.
    size = _TIMM_SIZES.get((c, swiglu))
    reg = "_reg4" if registers else ""
    timm_name = f"vit_{size or ('giant' if swiglu else 'small')}_patch14{reg}_dinov2"
    label = (
        None
        if size
        else (
            f"a DINOv2 ViT of width {c} and {kwargs['depth']} blocks (timm {timm_name} architecture with embed_dim={c})"
        )
    )
    return BackboneSpec(
        name=name, timm_name=timm_name, timm_kwargs=kwargs, hf_id=hub_id, hf_dir=str(folder), arch_label=label
    )


def _hf_folder(ref: str) -> Path:
    """A local folder, or the snapshot folder of a hub id already in the HF cache."""
    p = Path(ref).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(
                f"{p} has no config.json: hf:<dir> needs a Hugging Face DINOv2 or DINOv3 folder (config.json + weights)"
            )
        return p.resolve()
    if re.fullmatch(r"[\w.-]+/[\w.-]+", ref) and not p.exists():
        from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415 - only for hub ids

        cached = try_to_load_from_cache(ref, "config.json", cache_dir=hf_cache_dir())
        if isinstance(cached, str):
            return Path(cached).parent
        reason = offline_reason()
        if reason is None:
            return Path(hf_download(ref, "config.json")).parent
        raise UserError(
            f"'{ref}' is neither a folder nor in the Hugging Face cache, and {reason}: "
            "download it once online, or use hf:<local folder>"
        )
    raise UserError(
        f"hf:{ref}: no such folder; hf:<dir> needs a Hugging Face DINOv2 or DINOv3 folder (config.json + weights)"
    )


def hf_weight_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face model folder (one file, or the shards of an index)."""
    for name in HF_WEIGHT_FILES:
        p = folder / name
        if not p.is_file():
            continue
        if name.endswith(".index.json"):
            index = read_json(p)
            shards = sorted(set((index.get("weight_map") or {}).values()))
            if not shards:
                raise UserError(f"{p} lists no weight shards: re-download the model folder")
            return [folder / s for s in shards]
        return [p]
    return []
