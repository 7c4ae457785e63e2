"""Backbone names, layer access, and every weights layout the loaders read (round trips bit for bit)."""

import json
import pickle
import time

import pytest
import torch

from vitsplit.backbones import Backbone, build_backbone, resolve_name
from vitsplit.checkpoints import detect_layout, hf_spec
from vitsplit.errors import UserError

TINY = dict(depth=2, embed_dim=64, num_heads=2, img_size=56)


def tiny_vit(reg: bool = False, **kw):
    import timm

    name = "vit_small_patch14_reg4_dinov2" if reg else "vit_small_patch14_dinov2"
    return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **(TINY | kw))


def randomize(vit):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in vit.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return vit


def official_layout(vit) -> dict:
    """timm -> official DINOv2 release keys (the inverse of timm's _convert_dinov2)."""
    sd = {k: v.clone() for k, v in vit.state_dict().items()}
    out = {"mask_token": torch.zeros(1, sd["cls_token"].shape[-1])}
    if "reg_token" in sd:
        pos = sd.pop("pos_embed")
        cls_pos = torch.zeros(1, 1, pos.shape[-1])
        out["register_tokens"] = sd.pop("reg_token")
        out["cls_token"] = sd.pop("cls_token") - cls_pos[:, 0]
        out["pos_embed"] = torch.cat([cls_pos, pos], dim=1)
    out.update(sd)
    return out


def hf_layout(vit) -> dict:
    """timm -> Hugging Face Dinov2Model keys, written independently of the loader's mapping."""
    sd = official_layout(vit)
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            pre = f"encoder.layer.{i}."
            if rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]
                q, kk, vv = v.chunk(3, dim=0)
                for name, t in (("query", q), ("key", kk), ("value", vv)):
                    out[pre + f"attention.attention.{name}.{kind}"] = t
            elif rest.startswith("attn.proj."):
                out[pre + "attention.output.dense." + rest.rsplit(".", 1)[1]] = v
            elif rest == "ls1.gamma":
                out[pre + "layer_scale1.lambda1"] = v
            elif rest == "ls2.gamma":
                out[pre + "layer_scale2.lambda1"] = v
            else:
                out[pre + rest] = v
        else:
            ren = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
                   "register_tokens": "embeddings.register_tokens", "pos_embed": "embeddings.position_embeddings",
                   "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
                   "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
                   "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
            out[ren[k]] = v
    return out


def save(sd, path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, str(path))
    return path


@pytest.fixture
def tiny_name(monkeypatch):
    """Register the tiny architecture under a test name by patching resolve_name's spec kwargs."""
    import vitsplit.backbones as bbmod

    real = bbmod.resolve_name

    def fake(name):
        if name in ("tiny", "tiny_reg"):
            spec = real("dinov2_vits14_reg" if name == "tiny_reg" else "dinov2_vits14")
            return bbmod.BackboneSpec(name=name, timm_name=spec.timm_name,
                                      timm_kwargs=spec.timm_kwargs | TINY, hub_file=f"{name}_pretrain.pth",
                                      hf_id=f"timm/{name}.test")
        return real(name)

    monkeypatch.setattr(bbmod, "resolve_name", fake)
    return fake


def outputs(bb, x):
    with torch.no_grad():
        return bb.forward_layers(x, range(bb.num_layers))


@pytest.mark.parametrize("reg", [False, True])
@pytest.mark.parametrize("layout,nest,suffix", [
    ("timm", None, ".pth"), ("timm", "state_dict", ".pt"), ("official", None, ".pth"),
    ("official", "teacher", ".pth"), ("official", None, ".safetensors"), ("hf", None, ".safetensors"),
    ("timm", "module.", ".safetensors"), ("official", "backbone.", ".pth"),
])
def test_every_layout_round_trips_bit_for_bit(tmp_path, tiny_name, reg, layout, nest, suffix):
    ref = randomize(tiny_vit(reg=reg)).eval()
    sd = {"timm": lambda: ref.state_dict(), "official": lambda: official_layout(ref), "hf": lambda: hf_layout(ref)}[layout]()
    if nest and nest.endswith("."):
        sd = {nest + k: v for k, v in sd.items()}
    elif nest:
        sd = {nest: sd, "epoch": torch.tensor(3)} if suffix != ".safetensors" else sd
    assert detect_layout(sd.get(nest, sd) if isinstance(sd.get(nest), dict) else
                         {k.split(".", 1)[1] if nest and nest.endswith(".") else k: v for k, v in sd.items()}) == layout
    path = save(sd, tmp_path / f"w{suffix}")
    bb = build_backbone("tiny_reg" if reg else "tiny", str(path))
    x = torch.randn(2, 3, 56, 42)
    want = outputs(Backbone(ref, name="ref", weights_source="test"), x)
    got = outputs(bb, x)
    for i in want:
        assert torch.equal(want[i], got[i]), (layout, i)
    assert bb.weights_source.startswith(f"file {path.resolve()} sha256:")
    assert len(bb.weights_source.split("sha256:")[1]) == 64


def test_random_weights_are_named_random():
    bb = build_backbone("dinov2_vits14", "random")
    assert bb.weights_source == "random"
    assert (bb.num_layers, bb.embed_dim, bb.patch_size, bb.num_prefix_tokens) == (12, 384, 14, 1)
    assert build_backbone("dinov2_vits14_reg", "random").num_prefix_tokens == 5


@pytest.mark.parametrize("name,timm_name,file", [
    ("dinov2_vits14", "vit_small_patch14_dinov2", "dinov2_vits14_pretrain.pth"),
    ("dinov2_vitb14", "vit_base_patch14_dinov2", "dinov2_vitb14_pretrain.pth"),
    ("dinov2_vitl14", "vit_large_patch14_dinov2", "dinov2_vitl14_pretrain.pth"),
    ("dinov2_vitg14_reg", "vit_giant_patch14_reg4_dinov2", "dinov2_vitg14_reg4_pretrain.pth"),
])
def test_dinov2_names(name, timm_name, file):
    spec = resolve_name(name)
    assert (spec.timm_name, spec.hub_file, spec.hf_id) == (timm_name, file, f"timm/{timm_name}.lvd142m")


@pytest.mark.parametrize("name", ["dinov2_vitx14", "dinov2_vits16", "not_a_model", "resnet50"])
def test_unknown_names_are_user_errors(name):
    with pytest.raises(UserError):
        build_backbone(name, "random")


def test_strict_mismatch_names_keys(tmp_path, tiny_name):
    other = tiny_vit(embed_dim=32)
    path = save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(UserError) as e:
        build_backbone("tiny", str(path))
    msg = str(e.value)
    assert "does not fit" in msg and "(1, 1, 32)" in msg and "\n" not in msg


def test_missing_and_unreadable_files(tmp_path, tiny_name):
    with pytest.raises(UserError, match="does not exist"):
        build_backbone("tiny", str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read"):
        build_backbone("tiny", str(bad))


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickled_code_is_refused(tmp_path, tiny_name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(UserError, match="weights-only"):
        build_backbone("tiny", str(path))
    assert not (tmp_path / "PWNED").exists()


def test_auto_finds_torch_hub_cache(tmp_path, tiny_name, monkeypatch):
    ref = randomize(tiny_vit()).eval()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    save(official_layout(ref), tmp_path / "hub" / "checkpoints" / "tiny_pretrain.pth")
    bb = build_backbone("tiny", "auto")
    assert bb.weights_source.startswith("torch.hub file ")
    x = torch.randn(1, 3, 28, 28)
    assert torch.equal(outputs(bb, x)[1], outputs(Backbone(ref, name="r", weights_source=""), x)[1])


def test_auto_finds_hf_hub_cache(tmp_path, tiny_name, monkeypatch):
    ref = randomize(tiny_vit()).eval()
    cache = tmp_path / "hf"
    snap = cache / "models--timm--tiny.test" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (cache / "models--timm--tiny.test" / "refs").mkdir()
    (cache / "models--timm--tiny.test" / "refs" / "main").write_text("abc123")
    save(ref.state_dict(), snap / "model.safetensors")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    bb = build_backbone("tiny", "auto")
    assert bb.weights_source.startswith("hub timm/tiny.test file ")


def test_auto_offline_fails_fast_with_both_ways_forward(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.monotonic()
    with pytest.raises(UserError) as e:
        build_backbone("dinov2_vits14", "auto")
    assert time.monotonic() - t < 10
    assert "--weights PATH" in str(e.value) and "--weights random" in str(e.value)
    assert "dinov2_vits14_pretrain.pth" in str(e.value)


def test_auto_offline_without_env_probe_fails_fast(tmp_path, monkeypatch):
    """No HF_HUB_OFFLINE: the connection probe decides (this sandbox has no route to the hub)."""
    import vitsplit.checkpoints as ck

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(ck, "is_online", lambda *a, **k: False)
    t = time.monotonic()
    with pytest.raises(UserError, match="--weights random"):
        build_backbone("dinov2_vits14", "auto")
    assert time.monotonic() - t < 10


def test_hf_folder_name_builds_architecture_from_config(tmp_path):
    ref = randomize(tiny_vit()).eval()
    folder = tmp_path / "dinov2-tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "dinov2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "mlp_ratio": 4, "patch_size": 14, "image_size": 56, "layerscale_value": 1.0, "use_swiglu_ffn": False}))
    save(hf_layout(ref), folder / "model.safetensors")
    bb = build_backbone(f"hf:{folder}", "auto")
    x = torch.randn(1, 3, 56, 56)
    assert torch.equal(outputs(bb, x)[1], outputs(Backbone(ref, name="r", weights_source=""), x)[1])


def test_hf_swiglu_width_matches_official_rule():
    import tempfile
    from pathlib import Path

    import timm

    spec_cfg = {"model_type": "dinov2", "hidden_size": 1536, "num_hidden_layers": 1, "num_attention_heads": 24,
                "mlp_ratio": 4, "use_swiglu_ffn": True}
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(spec_cfg))
        spec = hf_spec(f"hf:{d}")
    with torch.device("meta"):
        vit = timm.create_model(spec.timm_name, **spec.timm_kwargs)
    # DINOv2-g: SwiGLU hidden 4096 (weights_in 1536 -> 8192, weights_out 4096 -> 1536)
    assert tuple(vit.blocks[0].mlp.fc1.weight.shape) == (8192, 1536)
    assert tuple(vit.blocks[0].mlp.fc2.weight.shape) == (1536, 4096)


def test_forward_layers_pad_and_maps():
    bb = Backbone(randomize(tiny_vit()).eval(), name="t", weights_source="random")
    x = torch.randn(2, 3, 512, 500)
    padded = bb.pad(x)
    assert padded.shape[-2:] == (518, 504)
    assert torch.equal(padded[..., 3:515, 2:502], x) and padded[..., :3, :].abs().sum() == 0
    assert padded[..., 515:, :].abs().sum() == 0
    small = torch.randn(2, 3, 56, 70)
    out = bb.forward_layers(small, [0])
    assert set(out) == {0} and out[0].shape == (2, 1 + 4 * 5, 64)
    fmap = bb.tokens_to_map(out[0], bb.grid_size(56, 70))
    assert fmap.shape == (2, 64, 4, 5)
    assert torch.equal(fmap[:, :, 1, 2], out[0][:, 1 + 1 * 5 + 2])
    calls = []
    h = bb.vit.blocks[1].register_forward_hook(lambda *a: calls.append(1))
    bb.forward_layers(small, [0])
    h.remove()
    assert calls == []  # block 1 never ran: the pass stops at the deepest listed layer
    with pytest.raises(UserError):
        bb.forward_layers(small, [2])
