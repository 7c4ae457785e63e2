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
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=96 if gated else 256,
        use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
        num_register_tokens=4,
        image_size=64,
        query_bias=qkv_bias,
        value_bias=qkv_bias,
    )
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
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "storage_tokens": sd["embeddings.register_tokens"],
        "mask_token": sd["embeddings.mask_token"][0],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
        "local_cls_norm.weight": torch.randn(c, generator=g),
        "local_cls_norm.bias": torch.randn(c, generator=g),
    }
    head_dim = c // cfg.num_attention_heads
    periods = cfg.rope_theta ** (4 * torch.arange(head_dim // 4, dtype=torch.float32) / head_dim)
    out["rope_embed.periods"] = periods.bfloat16().float()  # what the release's files hold
    for i in range(cfg.num_hidden_layers):
        p = f"layer.{i}."
        q = {n: sd[f"{p}attention.{n}_proj.weight"] for n in "qkv"}
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q["q"], q["k"], q["v"]])
        if cfg.query_bias:
            garbage = torch.randn(c, generator=g)  # masked off by bias_mask, as in the release
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat(
                [sd[f"{p}attention.q_proj.bias"], garbage, sd[f"{p}attention.v_proj.bias"]]
            )
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
        torch.testing.assert_close(
            vit.forward_features(images()), hf(pixel_values=images()).last_hidden_state, rtol=0, atol=ATOL
        )


@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
def test_official_layout_reproduces_transformers_outputs(gated):
    hf = hf_model(gated)
    official = hf_to_official(hf)
    assert is_official_dinov3(official) and not is_hf_dinov3(official)
    vit = timm_from(hf.config.to_dict(), official, official_dinov3_to_timm)
    with torch.no_grad():
        torch.testing.assert_close(
            vit.forward_features(images()), hf(pixel_values=images()).last_hidden_state, rtol=0, atol=ATOL
        )


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
    state = {
        k: (torch.zeros_like(v) if k.endswith(("q_proj.bias", "v_proj.bias")) else v)
        for k, v in hf.state_dict().items()
    }
    vit = timm_from(no_bias_cfg, state, hf_dinov3_to_timm)  # zero biases: nothing is lost
    with torch.no_grad():
        hf.load_state_dict(state)
        torch.testing.assert_close(
            vit.forward_features(images()), hf(pixel_values=images()).last_hidden_state, rtol=0, atol=ATOL
        )


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


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("key_bias", True, "key_bias"),
        ("layer_norm_eps", 1e-6, "layer_norm_eps"),
        ("hidden_act", "relu", "hidden_act"),
        ("value_bias", False, "value_bias"),
    ],
)
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
        cfg = dict(
            hidden_size=c,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            intermediate_size=hidden,
            use_gated_mlp=gated,
            hidden_act="silu" if gated else "gelu",
            num_register_tokens=4,
        )
        with torch.device("meta"):
            ours = timm.create_model("vit_small_patch16_dinov3", pretrained=False, **hf_dinov3_kwargs(cfg, name))
            theirs = timm.create_model(name, pretrained=False, num_classes=0)
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
            k: tuple(v.shape) for k, v in theirs.state_dict().items()
        }, name


# ================================================================ through the loader (build_backbone)
from vitsplit.backbones import (  # noqa: E402
    Backbone,
    BackboneSpec,
    build_backbone,
    hub,  # noqa: E402
    resolve_name,
)
from vitsplit.backbones.dinov3 import NAMES, RELEASES  # noqa: E402


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def spec_of(hf, name: str = "tiny-dinov3") -> BackboneSpec:
    return BackboneSpec(
        name=name,
        timm_name="vit_small_patch16_dinov3",
        timm_kwargs=hf_dinov3_kwargs(hf.config.to_dict(), "config.json"),
    )


def assert_matches_hf(bb: Backbone, hf) -> None:
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(bb(x), hf(pixel_values=images()).last_hidden_state, rtol=0, atol=ATOL)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_file_round_trips_bit_for_bit(tmp_path, suffix):
    from safetensors.torch import save_file

    hf = hf_model(gated=True)
    ref = timm_from(hf.config.to_dict(), hf.state_dict(), hf_dinov3_to_timm)
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"model": state}, path)
    bb = build_backbone(spec_of(hf), str(path))
    with torch.no_grad():
        assert torch.equal(bb(images()), Backbone(ref, name="ref", weights_source="")(images()))


def test_official_file_through_the_loader(tmp_path):
    """A release checkpoint as a training run saves it: nested under "teacher", keys "backbone.*"."""
    hf = hf_model(gated=True)
    path = tmp_path / "dinov3_tiny_pretrain.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in hf_to_official(hf).items()}}, path)
    bb = build_backbone(spec_of(hf), str(path))
    assert str(path) in bb.weights_source
    assert_matches_hf(bb, hf)


def test_hf_folder_written_by_transformers(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path / "dinov3-tiny")
    bb = build_backbone(f"hf:{tmp_path / 'dinov3-tiny'}", "auto")
    assert (bb.num_layers, bb.embed_dim, bb.num_prefix_tokens, bb.patch_size) == (2, 64, 5, 16)
    assert_matches_hf(bb, hf)
    again = build_backbone(spec_of(hf), str(tmp_path / "dinov3-tiny"))  # --weights FOLDER with a DINOv3 model
    assert_matches_hf(again, hf)


def test_strict_loading_refuses_another_size(tmp_path):
    hf = hf_model()
    path = tmp_path / "w.pth"
    torch.save(hf_to_official(hf), path)
    other = BackboneSpec(
        name="wider",
        timm_name="vit_small_patch16_dinov3",
        timm_kwargs=dict(hf_dinov3_kwargs(hf.config.to_dict(), "c"), embed_dim=96, num_heads=3),
    )
    with pytest.raises(UserError, match="does not fit 'wider'.*shape mismatch"):
        build_backbone(other, str(path))


def test_dinov3_names():
    import timm

    assert NAMES == (
        "dinov3_vits16",
        "dinov3_vitsplus16",
        "dinov3_vitb16",
        "dinov3_vitl16",
        "dinov3_vithplus16",
        "dinov3_vit7b16",
    )
    for name, release in zip(NAMES, RELEASES.values()):
        spec = resolve_name(name)
        assert spec.timm_name == release.timm_name and spec.timm_name in timm.list_models()
        assert spec.hf_id == f"timm/{spec.timm_name}.lvd1689m" and spec.gated
        assert spec.hub_file.startswith("dinov3_vit") and spec.hub_file.endswith(".pth")
        assert spec.hf_alt_ids[0].startswith("facebook/dinov3-vit")
    assert resolve_name("dinov3_vitsplus16").hub_file == "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth"
    with pytest.raises(UserError, match="dinov3_vits16, dinov3_vitsplus16"):
        resolve_name("dinov3_vitg16")


def test_dinov3_real_sizes_on_the_meta_device():
    want = {
        "dinov3_vits16": (12, 384),
        "dinov3_vitsplus16": (12, 384),
        "dinov3_vitb16": (12, 768),
        "dinov3_vitl16": (24, 1024),
        "dinov3_vithplus16": (32, 1280),
        "dinov3_vit7b16": (40, 4096),
    }
    for name, (depth, width) in want.items():
        with torch.device("meta"):
            bb = build_backbone(name, "random")
        assert (bb.num_layers, bb.embed_dim, bb.patch_size, bb.num_prefix_tokens, bb.num_registers) == (
            depth,
            width,
            16,
            5,
            4,
        ), name


def test_auto_offline_says_the_weights_are_gated(empty_caches):
    with pytest.raises(UserError) as e:
        build_backbone("dinov3_vits16", "auto")
    msg = str(e.value)
    assert "licence" in msg and "log in" in msg and "--weights PATH" in msg and "--weights random" in msg
    assert "dinov3_vits16_pretrain_lvd1689m-08c60483.pth" in msg and "facebook/dinov3-vits16-pretrain-lvd1689m" in msg


def test_refused_download_says_the_weights_are_gated(empty_caches, monkeypatch):
    monkeypatch.setattr(hub, "offline_reason", lambda: None)

    def refuse(repo, filename):
        raise PermissionError(f"403 gated repo {repo}")

    monkeypatch.setattr(hub, "hf_download", refuse)
    with pytest.raises(
        UserError, match=r"PermissionError.*licence on https://huggingface.co/timm/vit_small_patch16_dinov3"
    ):
        build_backbone("dinov3_vits16", "auto")


def test_auto_finds_the_official_file_and_the_transformers_cache(empty_caches):
    """The release file in torch.hub's folder, else the transformers repo in the HF cache."""
    hf = hf_model()
    real = resolve_name("dinov3_vits16")
    spec = BackboneSpec(
        name="dinov3_vits16",
        timm_name=real.timm_name,
        timm_kwargs=spec_of(hf).timm_kwargs,
        hub_file=real.hub_file,
        hf_id=real.hf_id,
        hf_alt_ids=real.hf_alt_ids,
        gated=True,
    )
    snap = empty_caches / "hf" / "models--facebook--dinov3-vits16-pretrain-lvd1689m" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc")
    hf.save_pretrained(snap)
    bb = build_backbone(spec, "auto")
    assert bb.weights_source.startswith("hub facebook/dinov3-vits16-pretrain-lvd1689m")
    assert_matches_hf(bb, hf)
    folder = empty_caches / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(hf_to_official(hf), folder / real.hub_file)
    bb = build_backbone(spec, "auto")
    assert bb.weights_source.startswith(f"torch.hub {real.hub_file}")
    assert_matches_hf(bb, hf)
