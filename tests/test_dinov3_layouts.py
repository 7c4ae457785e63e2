"""DINOv3 weight layouts: Hugging Face DINOv3ViTModel and the official release -> timm's Eva.

The reference is transformers' own ``DINOv3ViTModel`` with random weights (every parameter, biases
and layer scales included): its state is converted and loaded strictly into the timm architecture
built from its config, and the two models' outputs must agree to float32 round-off. The official
layout is written from the same HF state by inverting transformers' documented release -> HF key
map (``convert_dinov3_vit_to_hf.py``), with the release's extras: a masked key bias (garbage in the
masked third), bf16-rounded RoPE periods, a training-only ``local_cls_norm``.
"""

from __future__ import annotations

import pytest
import torch

from vitsplit.backbones.dinov3_layouts import (
    PERIODS_RTOL,
    hf_dinov3_kwargs,
    hf_dinov3_to_timm,
    is_hf_dinov3,
    is_official_dinov3,
    official_dinov3_to_timm,
)
from vitsplit.errors import UserError

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

ATOL = 1e-5  # float32 round-off over two blocks of a width-64 model (outputs are O(1))


def hf_model(gated: bool = False, qkv_bias: bool = True, seed: int = 0):
    cfg = transformers.DINOv3ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96 if gated else 256,
        use_gated_mlp=gated, hidden_act="silu" if gated else "gelu", num_register_tokens=4, image_size=64,
        query_bias=qkv_bias, value_bias=qkv_bias)
    model = transformers.DINOv3ViTModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            offset = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + offset)
    return model


def timm_from(cfg_dict: dict, state: dict, convert) -> torch.nn.Module:
    vit = timm.create_model("vit_small_patch16_dinov3", pretrained=False, **hf_dinov3_kwargs(cfg_dict, "config.json"))
    vit.load_state_dict(convert(state, vit), strict=True)
    return vit.eval()


def images(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(seed))


def hf_to_official(model) -> dict[str, torch.Tensor]:
    """HF state -> release keys (inverse of transformers' release -> HF map), plus the release's extras."""
    cfg = model.config
    sd = {k.removeprefix("model."): v.clone() for k, v in model.state_dict().items()}
    gated = cfg.use_gated_mlp
    mlp = {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"} if gated else {"up_proj": "fc1", "down_proj": "fc2"}
    g = torch.Generator().manual_seed(7)
    c = cfg.hidden_size
    out = {"cls_token": sd["embeddings.cls_token"], "storage_tokens": sd["embeddings.register_tokens"],
           "mask_token": sd["embeddings.mask_token"][0],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
           "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"],
           "local_cls_norm.weight": torch.randn(c, generator=g), "local_cls_norm.bias": torch.randn(c, generator=g)}
    head_dim = c // cfg.num_attention_heads
    periods = cfg.rope_theta ** (4 * torch.arange(head_dim // 4, dtype=torch.float32) / head_dim)
    out["rope_embed.periods"] = periods.bfloat16().float()  # what the release's files hold
    for i in range(cfg.num_hidden_layers):
        p = f"layer.{i}."
        q = {n: sd[f"{p}attention.{n}_proj.weight"] for n in "qkv"}
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q["q"], q["k"], q["v"]])
        if cfg.query_bias:
            garbage = torch.randn(c, generator=g)  # masked off by bias_mask, as in the release
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([sd[f"{p}attention.q_proj.bias"], garbage,
                                                          sd[f"{p}attention.v_proj.bias"]])
            out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones(c), torch.zeros(c), torch.ones(c)])
        for hf, rel in (("attention.o_proj.", "attn.proj."), ("norm1.", "norm1."), ("norm2.", "norm2.")):
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.{rel}{kind}"] = sd[f"{p}{hf}{kind}"]
        out[f"blocks.{i}.ls1.gamma"] = sd[f"{p}layer_scale1.lambda1"]
        out[f"blocks.{i}.ls2.gamma"] = sd[f"{p}layer_scale2.lambda1"]
        for hf, rel in mlp.items():
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.mlp.{rel}.{kind}"] = sd[f"{p}mlp.{hf}.{kind}"]
    return out


@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
@pytest.mark.parametrize("qkv_bias", [True, False], ids=["qkv-bias", "no-bias"])
def test_hf_layout_reproduces_transformers_outputs(gated, qkv_bias):
    hf = hf_model(gated, qkv_bias)
    state = hf.state_dict()
    assert is_hf_dinov3(state) and not is_official_dinov3(state)
    vit = timm_from(hf.config.to_dict(), state, hf_dinov3_to_timm)
    with torch.no_grad():
        want = hf(pixel_values=images()).last_hidden_state
        got = vit.forward_features(images())
    assert got.shape == want.shape == (2, 1 + 4 + 12, 64)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_hf_transformers4_key_names_are_read_too():
    """transformers 4.x saved ``layer.<i>.``; 5.x names the encoder ``model.layer.<i>.``."""
    hf = hf_model()
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    assert not any(k.startswith("model.") for k in state)
    vit = timm_from(hf.config.to_dict(), state, hf_dinov3_to_timm)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(images()), hf(pixel_values=images()).last_hidden_state,
                                   rtol=0, atol=ATOL)


@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
def test_official_layout_reproduces_transformers_outputs(gated):
    hf = hf_model(gated)
    official = hf_to_official(hf)
    assert is_official_dinov3(official) and not is_hf_dinov3(official)
    vit = timm_from(hf.config.to_dict(), official, official_dinov3_to_timm)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(images()), hf(pixel_values=images()).last_hidden_state,
                                   rtol=0, atol=ATOL)


def test_official_layout_round_trip_keeps_the_masked_key_bias_out():
    """Without the mask the garbage key bias would change the output (RoPE rotates it per token)."""
    hf = hf_model()
    official = hf_to_official(hf)
    vit = timm_from(hf.config.to_dict(), official, official_dinov3_to_timm)
    unmasked = {k: (torch.ones_like(v) if k.endswith("bias_mask") else v) for k, v in official.items()}
    with pytest.raises(UserError, match="non-zero key bias"):
        official_dinov3_to_timm(unmasked, vit)
    nan_mask = {k: (torch.full_like(v, float("nan")) if k.endswith("bias_mask") else v) for k, v in official.items()}
    with pytest.raises(UserError, match="never initialised"):
        official_dinov3_to_timm(nan_mask, vit)


def test_zero_qkv_biases_are_dropped_nonzero_ones_are_refused():
    """timm's default DINOv3 architectures have no qkv bias (the released biases are zero)."""
    hf = hf_model(qkv_bias=True)
    no_bias_cfg = dict(hf.config.to_dict(), query_bias=False, value_bias=False)
    with pytest.raises(UserError, match="_qkvb"):
        timm_from(no_bias_cfg, hf.state_dict(), hf_dinov3_to_timm)
    state = {k: (torch.zeros_like(v) if k.endswith(("q_proj.bias", "v_proj.bias")) else v)
             for k, v in hf.state_dict().items()}
    vit = timm_from(no_bias_cfg, state, hf_dinov3_to_timm)  # zero biases: nothing is lost
    with torch.no_grad():
        hf.load_state_dict(state)
        torch.testing.assert_close(vit.forward_features(images()), hf(pixel_values=images()).last_hidden_state,
                                   rtol=0, atol=ATOL)


def test_rope_periods_are_checked():
    hf = hf_model()
    official = hf_to_official(hf)
    vit = timm.create_model("vit_small_patch16_dinov3", pretrained=False, **hf_dinov3_kwargs(hf.config.to_dict(), "c"))
    exact = vit.rope.periods.clone()
    official["rope_embed.periods"] = exact * (1 + 2 * PERIODS_RTOL)  # beyond bf16 rounding
    with pytest.raises(UserError, match="RoPE periods"):
        official_dinov3_to_timm(official, vit)
    official["rope_embed.periods"] = 10000.0 ** (4 * torch.arange(exact.numel()) / 32)  # another base
    with pytest.raises(UserError, match="RoPE periods"):
        official_dinov3_to_timm(official, vit)


def test_unknown_keys_pass_through_for_strict_loading_to_name():
    hf = hf_model()
    official = hf_to_official(hf)
    official["cls_norm.weight"] = torch.ones(64)  # untie_cls_and_patch_norms: timm has no such norm
    vit = timm.create_model("vit_small_patch16_dinov3", pretrained=False, **hf_dinov3_kwargs(hf.config.to_dict(), "c"))
    assert "cls_norm.weight" in official_dinov3_to_timm(official, vit)


@pytest.mark.parametrize("field,value,match", [
    ("key_bias", True, "key_bias"), ("layer_norm_eps", 1e-6, "layer_norm_eps"),
    ("hidden_act", "relu", "hidden_act"), ("value_bias", False, "value_bias"),
])
def test_hf_config_that_timm_cannot_express_is_refused(field, value, match):
    cfg = dict(hf_model().config.to_dict(), **{field: value})
    with pytest.raises(UserError, match=match):
        hf_dinov3_kwargs(cfg, "config.json")


def test_hf_config_of_the_real_sizes_builds_timms_architectures():
    """The published HF configs (hidden, layers, heads, intermediate, gated) give the same parameter
    shapes as timm's named DINOv3 architectures (checked on the meta device: no memory)."""
    sizes = {  # timm name: (hidden, layers, heads, intermediate, gated)
        "vit_small_patch16_dinov3_qkvb": (384, 12, 6, 1536, False),
        "vit_small_plus_patch16_dinov3_qkvb": (384, 12, 6, 1536, True),
        "vit_large_patch16_dinov3_qkvb": (1024, 24, 16, 4096, False),
        "vit_huge_plus_patch16_dinov3_qkvb": (1280, 32, 20, 5120, True),
    }
    for name, (c, depth, heads, hidden, gated) in sizes.items():
        cfg = dict(hidden_size=c, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=hidden,
                   use_gated_mlp=gated, hidden_act="silu" if gated else "gelu", num_register_tokens=4)
        with torch.device("meta"):
            ours = timm.create_model("vit_small_patch16_dinov3", pretrained=False, **hf_dinov3_kwargs(cfg, name))
            theirs = timm.create_model(name, pretrained=False, num_classes=0)
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
            {k: tuple(v.shape) for k, v in theirs.state_dict().items()}, name
