"""Weight layouts -> timm keys, and strict loading.

Five layouts are read: timm's own keys; DINOv3's release and Hugging Face layouts
(:mod:`~vitsplit.backbones.dinov3_layouts`); the official DINOv2 release (``mask_token``,
``register_tokens``, ``ls1.gamma``, ``mlp.w12``/``mlp.w3`` for the SwiGLU giant,
``blocks.<chunk>.<i>`` in training checkpoints); and Hugging Face ``Dinov2Model``/
``Dinov2WithRegistersModel`` (``embeddings.*``, ``encoder.layer.<i>.*``, ``layernorm.*``), converted
without importing ``transformers``. Each conversion lives in one function (after timm's
``checkpoint_filter_fn``): :func:`hf_to_official` (HF -> DINOv2 release keys) and
:func:`official_to_timm` (DINOv2 release -> timm, delegating to timm's own ``_convert_dinov2``).
Loading is strict (:func:`load_strict`): every key and shape must match the architecture (no silent
position-embedding or patch-embedding resampling); a mismatch raises ``UserError`` naming the
first missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import UserError
from .dinov3_layouts import hf_dinov3_to_timm, is_hf_dinov3, is_official_dinov3, official_dinov3_to_timm
from .reading import HF_ANCHOR
from .spec import BackboneSpec


def to_timm_layout(
    state: dict[str, torch.Tensor], vit: nn.Module, origin: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """Any supported layout (prefix already stripped) -> timm keys of ``vit``. DINOv3's layouts
    (:mod:`~vitsplit.backbones.dinov3_layouts`) are told apart first: the release, like DINOv2's,
    has a ``mask_token``."""
    if is_hf_dinov3(state):
        state = hf_dinov3_to_timm(state, vit, origin)
    elif is_official_dinov3(state):
        state = official_dinov3_to_timm(state, vit, origin)
    elif HF_ANCHOR in state:
        state = official_to_timm(hf_to_official(state), vit)
    elif "mask_token" in state or "register_tokens" in state or any(_OFFICIAL_ONLY.match(k) for k in state):
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
    from timm.models.vision_transformer import _convert_dinov2  # noqa: PLC0415 - timm is slow to import

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
    "norm1.": "norm1.",
    "norm2.": "norm2.",
    "attention.output.dense.": "attn.proj.",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
    "mlp.weights_in.": "mlp.w12.",
    "mlp.weights_out.": "mlp.w3.",
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
                    out[f"blocks.{m.group(1)}.{official}{rest[len(hf) :]}"] = v
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


def load_strict(vit: nn.Module, state: dict[str, torch.Tensor], spec: BackboneSpec, origin: str) -> None:
    """Copy ``state`` (timm keys) into ``vit`` if every key and shape matches; else ``UserError``
    naming the first missing, unexpected and mis-shaped keys. A classifier (``head.*``) in the
    checkpoint is dropped when the backbone has none (backbones are built with ``num_classes=0``)."""
    expected = vit.state_dict()
    if "head.weight" not in expected:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(t.shape)}"
        for k, t in expected.items()
        if k in state and tuple(state[k].shape) != tuple(t.shape)
    ]
    # load_state_dict would cast integer or boolean tensors to float without a word: refuse them
    kinds = [
        f"{k} {str(state[k].dtype).removeprefix('torch.')}"
        for k, t in expected.items()
        if k in state and t.is_floating_point() and not state[k].is_floating_point()
    ]
    problems = []
    for title, items in (
        ("shape mismatch (checkpoint != model)", shapes),
        ("missing", missing),
        ("unexpected", unexpected),
        ("integer tensors where the model has floats", kinds),
    ):
        if items:
            more = f" (+{len(items) - 4} more)" if len(items) > 4 else ""
            problems.append(f"{title}: {', '.join(items[:4])}{more}")
    if problems:
        raise UserError(
            f"{origin} does not fit '{spec.name}' ({spec.label}): {'; '.join(problems)}; "
            "pass weights made for this architecture, or the --model they were made for"
        )
    vit.load_state_dict(state, strict=True)
