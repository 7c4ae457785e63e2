"""DINOv3 weight layouts -> timm's ``Eva`` layout (the ``vit_*_patch16_dinov3`` architectures).

DINOv3 (Simeoni et al. 2025) is published in two layouts besides timm's own:

- the official release (facebookresearch/dinov3, ``DinoVisionTransformer``): ``cls_token``,
  ``storage_tokens`` (the 4 registers), ``mask_token``, ``rope_embed.periods``, ``patch_embed.proj``,
  ``blocks.<i>.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1/fc2 | mlp.w1/w2/w3, ls2.gamma}``,
  ``norm``; the qkv bias comes with a ``bias_mask`` buffer that zeroes its key third
  (``LinearKMaskedBias``), and the 7B and satellite ViT-L add a training-only ``local_cls_norm``;
- Hugging Face ``DINOv3ViTModel`` (transformers >= 4.56): ``embeddings.{cls_token, register_tokens,
  mask_token, patch_embeddings}``, ``layer.<i>.`` (``model.layer.<i>.`` in transformers 5)
  ``{norm1, attention.{q,k,v,o}_proj, layer_scale1.lambda1, norm2, mlp.{up,down,gate}_proj,
  layer_scale2.lambda1}``, ``norm``; its rotary frequencies (``inv_freq``) are not stored.

timm keeps one fused ``qkv`` weight, separate ``q_bias``/``v_bias`` parameters (when the architecture
has a qkv bias; the key bias is fixed at zero), ``reg_token``, ``gamma_1``/``gamma_2`` and, for the
SwiGLU sizes (S+, H+, 7B), ``mlp.fc1_g`` (gate, the release's ``w1``), ``mlp.fc1_x`` (``w2``) and
``mlp.fc2`` (``w3``): SwiGLU(x) = fc2(silu(fc1_g x) * fc1_x x) (Shazeer 2020). Read from timm's
``checkpoint_filter_fn`` (timm/models/eva.py), the release's ``dinov3/models/vision_transformer.py``
and transformers' ``modeling_dinov3_vit.py``.

Nothing is dropped silently: the rotary periods in a file are checked against the architecture's
(only training-time state -- ``mask_token``, ``local_cls_norm``, the bias mask once applied -- is
discarded), a key bias must be zero (timm cannot hold one, and under RoPE it would change the
attention), and q/v biases are dropped only when they are exactly zero and the architecture has none.
Keys this module does not know are passed through, so that strict loading names them.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..errors import UserError

# Keys that tell the layouts apart (prefix already stripped).
HF_DINOV3_ANCHOR = "embeddings.patch_embeddings.weight"  # DINOv2's HF layout has ...projection.weight
OFFICIAL_DINOV3_MARKERS = ("storage_tokens", "rope_embed.periods")
# Training-only state of the release: never used at inference.
_OFFICIAL_TRAINING_ONLY = re.compile(r"^(mask_token|local_cls_norm\..+)$")
# The release stores the RoPE periods after a bfloat16 round trip (timm's eva.py notes it): relative
# rounding error <= 2^-9. 2^-8 accepts that and rejects any other base (which changes periods by
# whole factors, e.g. base 100 vs 10000).
PERIODS_RTOL = 2.0**-8

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^(?:model\.)?layer\.(\d+)\.(.+)$")


def is_official_dinov3(state: dict[str, torch.Tensor]) -> bool:
    """True for the release's layout (its register or RoPE keys, or a masked qkv bias)."""
    return any(k in state for k in OFFICIAL_DINOV3_MARKERS) or any(k.endswith(".attn.qkv.bias_mask") for k in state)


def is_hf_dinov3(state: dict[str, torch.Tensor]) -> bool:
    """True for Hugging Face ``DINOv3ViTModel`` keys."""
    return HF_DINOV3_ANCHOR in state


# =========================================================================== shared checks
def _architecture(vit: nn.Module) -> str:
    cfg = getattr(vit, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(vit).__name__)


def _check_periods(periods: torch.Tensor, vit: nn.Module, origin: str) -> None:
    """The file's RoPE periods (head_dim/4,) must be the architecture's, to bf16 precision."""
    rope = getattr(vit, "rope", None)
    mine = getattr(rope, "periods", None)
    if mine is None:
        raise UserError(
            f"{origin} holds DINOv3 RoPE weights but {_architecture(vit)} has no DINOv3 RoPE: "
            "pass the --model the weights were made for"
        )
    got = periods.detach().float().reshape(-1)
    want = mine.detach().float().reshape(-1)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=PERIODS_RTOL, atol=0):
        raise UserError(
            f"{origin}: RoPE periods {got[:3].tolist()}... differ from {_architecture(vit)}'s "
            f"{want[:3].tolist()}... (another RoPE base or head width): pass the --model the weights were made for"
        )


def _attention_biases(
    i: str, q: torch.Tensor | None, k: torch.Tensor | None, v: torch.Tensor | None, vit: nn.Module, origin: str
) -> dict[str, torch.Tensor]:
    """Query/key/value biases of block ``i`` (each (A,) or None) -> timm's ``q_bias``/``v_bias``."""
    if k is not None and bool((k != 0).any()):
        raise UserError(
            f"{origin}: block {i} has a non-zero key bias; timm's DINOv3 attention fixes it at zero "
            "(the release masks it), so these weights are not a DINOv3 ViT"
        )
    has_bias = f"blocks.{i}.attn.q_bias" in dict(vit.named_parameters())
    if has_bias:
        if q is None or v is None:  # strict loading will name the missing q_bias / v_bias
            return {}
        return {f"blocks.{i}.attn.q_bias": q, f"blocks.{i}.attn.v_bias": v}
    nonzero = [t for t in (q, v) if t is not None and bool((t != 0).any())]
    if nonzero:
        raise UserError(
            f"{origin}: block {i} has non-zero query/value biases but {_architecture(vit)} has none: "
            f"pass --model {_architecture(vit)}_qkvb (timm's DINOv3 with a qkv bias)"
        )
    return {}


# =========================================================================== official release
_OFFICIAL_IN_BLOCK = (  # release name inside blocks.<i>. -> timm's
    ("ls1.gamma", "gamma_1"),
    ("ls2.gamma", "gamma_2"),
    ("mlp.w1.", "mlp.fc1_g."),
    ("mlp.w2.", "mlp.fc1_x."),
    ("mlp.w3.", "mlp.fc2."),
)


def official_dinov3_to_timm(
    state: dict[str, torch.Tensor], vit: nn.Module, origin: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """The release's ``DinoVisionTransformer`` keys -> timm ``Eva`` keys of ``vit``.

    The qkv bias (3A,) is multiplied by its ``bias_mask`` (what the release's forward does) and
    split into q / k / v thirds; see :func:`_attention_biases` for what may be dropped."""
    out: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if _OFFICIAL_TRAINING_ONLY.match(k):
            continue
        if k == "rope_embed.periods":
            _check_periods(v, vit, origin)
            continue
        if k == "storage_tokens":
            out["reg_token"] = v
            continue
        m = _BLOCK.match(k)
        if m is None:
            out[k] = v
            continue
        i, rest = m.groups()
        if rest == "attn.qkv.bias":
            biases[i] = v
            continue
        if rest == "attn.qkv.bias_mask":
            masks[i] = v
            continue
        for old, new in _OFFICIAL_IN_BLOCK:
            if rest.startswith(old):
                rest = new + rest[len(old) :]
                break
        out[f"blocks.{i}.{rest}"] = v
    for i in sorted(set(masks) - set(biases), key=int):
        out[f"blocks.{i}.attn.qkv.bias_mask"] = masks[i]  # a mask without a bias: strict loading names it
    for i, bias in biases.items():
        if i in masks:
            mask = masks[i]
            if not bool(torch.isfinite(mask).all()):
                raise UserError(
                    f"{origin}: block {i}'s qkv bias mask was never initialised (NaN): "
                    "the file was saved before init_weights; re-export the model's weights"
                )
            bias = bias * mask.to(bias.dtype)
        q, kb, vb = bias.chunk(3, dim=0)
        out.update(_attention_biases(i, q, kb, vb, vit, origin))
    return out


# =========================================================================== Hugging Face
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
_HF_TRAINING_ONLY = ("embeddings.mask_token",)
_HF_IN_BLOCK = (  # HF name inside layer.<i>. -> timm's
    ("attention.o_proj.", "attn.proj."),
    ("layer_scale1.lambda1", "gamma_1"),
    ("layer_scale2.lambda1", "gamma_2"),
    ("norm1.", "norm1."),
    ("norm2.", "norm2."),
)
_HF_MLP = {"up_proj": "fc1", "down_proj": "fc2"}
_HF_GATED_MLP = {"gate_proj": "fc1_g", "up_proj": "fc1_x", "down_proj": "fc2"}


def hf_dinov3_to_timm(
    state: dict[str, torch.Tensor], vit: nn.Module, origin: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """Hugging Face ``DINOv3ViTModel`` keys -> timm ``Eva`` keys of ``vit``.

    The separate q/k/v projections (A, C) become timm's fused ``qkv`` weight (3A, C), rows [q; k; v];
    the MLP is gated (SwiGLU) exactly when a block has ``gate_proj``."""
    out: dict[str, torch.Tensor] = {}
    attn: dict[str, dict[str, torch.Tensor]] = {}
    gated = {m.group(1) for k in state if (m := _HF_BLOCK.match(k)) and m.group(2).startswith("mlp.gate_proj.")}
    for k, v in state.items():
        if k in _HF_TRAINING_ONLY:
            continue
        if k == "rope_embeddings.inv_freq":  # not stored by transformers, but checked if present
            _check_periods(1.0 / v.double(), vit, origin)
            continue
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
            continue
        m = _HF_BLOCK.match(k)
        if m is None:
            out[k] = v
            continue
        i, rest = m.groups()
        qkv = re.fullmatch(r"attention\.([qkv])_proj\.(weight|bias)", rest)
        if qkv:
            attn.setdefault(i, {})[f"{qkv.group(1)}.{qkv.group(2)}"] = v
            continue
        mlp = re.fullmatch(r"mlp\.(\w+_proj)\.(weight|bias)", rest)
        if mlp and mlp.group(1) in (_HF_GATED_MLP if i in gated else _HF_MLP):
            names = _HF_GATED_MLP if i in gated else _HF_MLP
            out[f"blocks.{i}.mlp.{names[mlp.group(1)]}.{mlp.group(2)}"] = v
            continue
        for old, new in _HF_IN_BLOCK:
            if rest.startswith(old):
                out[f"blocks.{i}.{new}{rest[len(old) :]}"] = v
                break
        else:
            out[k] = v
    for i, parts in attn.items():
        weights = [parts.get(f"{p}.weight") for p in "qkv"]
        if any(w is None for w in weights):  # keep the HF names so that strict loading reports them
            out.update({f"layer.{i}.attention.{n.replace('.', '_proj.')}": t for n, t in parts.items()})
            continue
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(weights, dim=0)
        out.update(_attention_biases(i, parts.get("q.bias"), parts.get("k.bias"), parts.get("v.bias"), vit, origin))
    return out


def hf_dinov3_kwargs(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """A ``DINOv3ViTConfig`` (``config.json`` of ``model_type`` ``dinov3_vit``) -> keyword arguments
    that make timm's ``vit_small_patch16_dinov3`` entry point build the same architecture.

    Fields read: ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``intermediate_size``, ``use_gated_mlp``, ``hidden_act``, ``patch_size``, ``image_size``,
    ``num_channels``, ``num_register_tokens``, ``rope_theta``, ``layerscale_value``,
    ``query_bias``/``key_bias``/``value_bias``/``proj_bias``/``mlp_bias``, ``layer_norm_eps``.
    Anything timm's architecture cannot express raises ``UserError``; the ``pos_embed_*``
    coordinate augmentations act only in training and are ignored."""

    def bad(why: str) -> UserError:
        return UserError(f"{where}: {why}; only DINOv3 configurations map onto timm's DINOv3 architecture")

    try:
        c = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["intermediate_size"])
        patch = cfg.get("patch_size", 16)
        patch = [int(v) for v in patch] if isinstance(patch, (list, tuple)) else [int(patch)] * 2
        size = cfg.get("image_size", 224)
        size = int(size[0]) if isinstance(size, (list, tuple)) else int(size)
        kwargs: dict[str, Any] = dict(
            embed_dim=c,
            depth=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            patch_size=patch[0],
            img_size=size,
            in_chans=int(cfg.get("num_channels", 3)),
            num_reg_tokens=int(cfg.get("num_register_tokens", 0) or 0),
            rope_temperature=float(cfg.get("rope_theta", 100.0)),
            init_values=float(cfg.get("layerscale_value", 1.0)),
            num_classes=0,
            dynamic_img_size=True,
        )
        q_bias, k_bias, v_bias = (
            bool(cfg.get(n, d)) for n, d in (("query_bias", True), ("key_bias", False), ("value_bias", True))
        )
        gated = bool(cfg.get("use_gated_mlp", False))
        act = str(cfg.get("hidden_act", "gelu"))
        eps = float(cfg.get("layer_norm_eps", 1e-5))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where} lacks or mangles a DINOv3 field ({e}): re-download the model folder") from e
    if patch[0] != patch[1]:
        raise bad(f"patch size {patch} is not square")
    if k_bias:
        raise bad("key_bias is true (timm's DINOv3 attention has no key bias)")
    if q_bias != v_bias:
        raise bad(f"query_bias={q_bias} but value_bias={v_bias} (timm has one switch for both)")
    if not bool(cfg.get("proj_bias", True)) or not bool(cfg.get("mlp_bias", True)):
        raise bad("proj_bias or mlp_bias is false")
    if eps != 1e-5:
        raise bad(f"layer_norm_eps is {eps}, not DINOv3's 1e-5")
    if act != ("silu" if gated else "gelu"):
        raise bad(f"hidden_act is {act!r} with use_gated_mlp={gated} (DINOv3 uses gelu, or silu when gated)")
    if c % heads or (c // heads) % 4:
        raise bad(f"hidden_size {c} over {heads} heads does not give a head width divisible by 4 (2D RoPE)")
    # timm sizes the MLP as int(C * mlp_ratio); (hidden + 0.5) / C lands on exactly `hidden` despite
    # float rounding. SwiGLU with align_to=1 keeps that width and uses the split gate/value linears.
    kwargs.update(qkv_bias=q_bias, mlp_ratio=(hidden + 0.5) / c, swiglu_mlp=gated, swiglu_align_to=1 if gated else 0)
    return kwargs
