"""Backbone names, layer access, and every weights layout and source the loaders read.

Round trips: a tiny timm DINOv2-architecture ViT with random weights is written in timm, official
DINOv2 or Hugging Face layout (the inverse conversions below are written independently of the
loader), loaded through ``build_backbone`` and compared with the original bit for bit.
"""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import pytest
import torch

import vitsplit.backbones.hub as hub
from vitsplit.backbones import Backbone, BackboneSpec, build_backbone, create_vit, demo_vit, resolve_name
from vitsplit.backbones.hf import hf_spec
from vitsplit.errors import UserError
from vitsplit.fileio import sha256_file

TINY = dict(depth=2, embed_dim=64, num_heads=2, img_size=56, num_classes=0, dynamic_img_size=True)


def tiny_spec(reg: bool = False, giant: bool = False, name: str = "tiny", **kw) -> BackboneSpec:
    """DINOv2 architecture (layer scale, patch 14, pos_embed for 56 px = 4x4 (+1 cls)); ``giant``
    gives the SwiGLU MLP (embed 96 so that timm's packed width int(96 * 5.33334) = 512 is even)."""
    arch = "vit_{}_patch14{}_dinov2".format("giant" if giant else "small", "_reg4" if reg else "")
    kwargs = dict(TINY, **({"embed_dim": 96} if giant else {}), **kw)
    return BackboneSpec(
        name=name, timm_name=arch, timm_kwargs=kwargs, hub_file=f"{name}_pretrain.pth", hf_id=f"test-org/{name}"
    )


def randomize(module: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> torch.nn.Module:
    """Every parameter random (layer scales included, so that every block changes the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def official_layout(ref: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm -> DINOv2 release keys. With registers the release keeps a cls position in pos_embed;
    a random one is drawn, and ``ref.cls_token`` is set to what loading must give back
    (release cls + cls position, computed as timm's converter does) so outputs compare exactly."""
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    c = sd["cls_token"].shape[-1]
    out = {"mask_token": torch.randn(1, c)}
    if "reg_token" in sd:
        cls_pos = torch.randn(1, 1, c)
        out["register_tokens"] = sd.pop("reg_token")
        out["cls_token"] = sd.pop("cls_token") - cls_pos[:, 0]
        out["pos_embed"] = torch.cat([cls_pos, sd.pop("pos_embed")], dim=1)
        with torch.no_grad():
            ref.cls_token.copy_(out["cls_token"] + cls_pos[:, 0])
    swiglu = type(ref.blocks[0].mlp).__name__ == "GluMlp"  # the release names its SwiGLU linears w12, w3
    for k, v in sd.items():
        out[k.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.") if swiglu else k] = v
    return out


def hf_layout(ref: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm -> Hugging Face Dinov2Model / Dinov2WithRegistersModel keys."""
    top = {
        "cls_token": "embeddings.cls_token",
        "mask_token": "embeddings.mask_token",
        "register_tokens": "embeddings.register_tokens",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    inner = {
        "attn.proj.": "attention.output.dense.",
        "ls1.gamma": "layer_scale1.lambda1",
        "ls2.gamma": "layer_scale2.lambda1",
        "mlp.w12.": "mlp.weights_in.",
        "mlp.w3.": "mlp.weights_out.",
    }
    out = {}
    for k, v in official_layout(ref).items():
        if not k.startswith("blocks."):
            out[top[k]] = v
            continue
        _, i, rest = k.split(".", 2)
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            for part, t in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                out[f"encoder.layer.{i}.attention.attention.{part}.{kind}"] = t.clone()
            continue
        for a, b in inner.items():
            rest = rest.replace(a, b)
        out[f"encoder.layer.{i}.{rest}"] = v
    return out


def save(obj, path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    return path


def all_outputs(bb: Backbone, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        layers = bb.forward_layers(x, range(bb.num_layers))
        return [layers[i] for i in range(bb.num_layers)] + [bb(x)]


def assert_same_outputs(bb: Backbone, ref: torch.nn.Module, x: torch.Tensor) -> None:
    want = all_outputs(Backbone(ref, name="ref", weights_source="test"), x)
    got = all_outputs(bb, x)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"output {i} differs by {(a - b).abs().max()}"


CASES = [  # layout, arch, wrapping, file type
    ("timm", "plain", "flat", ".safetensors"),
    ("timm", "plain", "model", ".pth"),
    ("timm", "reg", "state_dict+module.", ".pt"),
    ("timm", "plain", "classifier", ".pth"),
    ("official", "plain", "flat", ".pth"),
    ("official", "reg", "flat", ".safetensors"),
    ("official", "reg", "dinov2-train", ".pth"),
    ("official", "plain", "teacher+backbone.", ".pth"),
    ("official", "giant", "chunked", ".pth"),
    ("hf", "plain", "flat", ".safetensors"),
    ("hf", "reg", "dinov2.+classifier", ".pth"),
    ("hf", "giant", "flat", ".safetensors"),
]


@pytest.mark.parametrize("layout,arch,wrap,suffix", CASES)
def test_every_layout_round_trips_bit_for_bit(tmp_path, layout, arch, wrap, suffix):
    spec = tiny_spec(reg=arch == "reg", giant=arch == "giant")
    ref = randomize(create_vit(spec))
    sd = {
        "timm": lambda: dict(ref.state_dict()),
        "official": lambda: official_layout(ref),
        "hf": lambda: hf_layout(ref),
    }[layout]()
    if wrap == "model":
        obj = {"model": sd, "epoch": 3, "args": {"lr": 0.1}}
    elif wrap == "state_dict+module.":
        obj = {"state_dict": {"module." + k: v for k, v in sd.items()}, "optimizer": {}}
    elif wrap == "classifier":  # timm's ImageNet checkpoints carry a head the backbone drops
        obj = dict(sd, **{"head.weight": torch.randn(10, 64), "head.bias": torch.randn(10)})
    elif wrap == "dinov2-train":  # facebookresearch/dinov2 training checkpoint: teacher and student
        student = {k: torch.randn_like(v) for k, v in sd.items()}
        obj = {
            "model": {
                **{f"teacher.backbone.{k}": v for k, v in sd.items()},
                **{f"student.backbone.{k}": v for k, v in student.items()},
                "teacher.dino_head.last_layer.weight": torch.randn(8, 64),
            },
            "iteration": 7,
        }
    elif wrap == "teacher+backbone.":
        obj = {"teacher": {f"backbone.{k}": v for k, v in sd.items()}}
    elif wrap == "chunked":  # BlockChunk keys: blocks.<chunk>.<global block index>.
        obj = {
            (f"blocks.{int(k.split('.')[1])}.{k[len('blocks.') :]}" if k.startswith("blocks.") else k): v
            for k, v in sd.items()
        }
        assert "blocks.1.1.norm1.weight" in obj
    elif wrap == "dinov2.+classifier":  # Dinov2ForImageClassification
        obj = {**{f"dinov2.{k}": v for k, v in sd.items()}, "classifier.weight": torch.randn(5, 128)}
    else:
        obj = sd
    path = save(obj, tmp_path / f"weights{suffix}")
    bb = build_backbone(spec, str(path))
    assert_same_outputs(bb, ref, torch.randn(2, 3, 56, 42))
    source = bb.weights_source
    assert source.startswith(f"file {path.resolve()} sha256:")
    assert source.split("sha256:")[1] == sha256_file(path)


def test_official_registers_conversion_moves_cls_position(tmp_path):
    """The release's cls position must be folded into timm's cls token (no_embed_class): loading
    while ignoring it gives different tokens."""
    spec = tiny_spec(reg=True)
    ref = randomize(create_vit(spec))
    sd = official_layout(ref)
    bb = build_backbone(spec, str(save(sd, tmp_path / "w.pth")))
    assert torch.equal(bb.vit.cls_token, sd["cls_token"] + sd["pos_embed"][:, 0])
    assert bb.vit.pos_embed.shape == (1, 16, 64) and torch.equal(bb.vit.pos_embed, sd["pos_embed"][:, 1:])
    assert torch.equal(bb.vit.reg_token, sd["register_tokens"])


@pytest.mark.parametrize("kind", ["plain", "registers", "swiglu"])
def test_hf_folder_matches_transformers(tmp_path, kind):
    """hf:<dir> written by transformers' own save_pretrained gives the same tokens as transformers."""
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14)
    if kind == "registers":
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=2, **common)
        )
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(use_swiglu_ffn=kind == "swiglu", **common))
    randomize(model, seed=3)
    model.save_pretrained(tmp_path)
    bb = build_backbone(f"hf:{tmp_path}", "auto")
    assert bb.num_prefix_tokens == (3 if kind == "registers" else 1)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        want = model(pixel_values=x).last_hidden_state
        got = bb(x)
    assert got.shape == want.shape == (2, bb.num_prefix_tokens + 16, 64)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert bb.weights_source.startswith(f"file {tmp_path.resolve() / 'model.safetensors'} sha256:")


def test_hf_folder_with_sharded_weights(tmp_path):
    """model.safetensors.index.json + shards (how large HF checkpoints such as giant are stored)."""
    ref = randomize(create_vit(tiny_spec()))
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "dinov2",
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "patch_size": 14,
                "image_size": 56,
            }
        )
    )
    sd = hf_layout(ref)
    names = sorted(sd)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for fname, keys in shards.items():
        save({k: sd[k] for k in keys}, tmp_path / fname)
    assert "embeddings.patch_embeddings.projection.weight" in shards["model-00001-of-00002.safetensors"]
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    bb = build_backbone(f"hf:{tmp_path}", "auto")
    assert_same_outputs(bb, ref, torch.randn(1, 3, 56, 56))
    assert bb.weights_source.count("sha256:") == 2


def test_hf_spec_giant_swiglu_width_and_json_kwargs(tmp_path):
    import timm

    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "dinov2",
                "hidden_size": 1536,
                "num_hidden_layers": 1,
                "num_attention_heads": 24,
                "mlp_ratio": 4,
                "use_swiglu_ffn": True,
                "image_size": 518,
                "patch_size": 14,
            }
        )
    )
    spec = hf_spec(f"hf:{tmp_path}")
    json.dumps(spec.timm_kwargs)  # recordable as plain JSON
    with torch.device("meta"):
        vit = timm.create_model(spec.timm_name, **spec.timm_kwargs)
    # DINOv2-g (Oquab et al. 2023): SwiGLU hidden 4096, packed input linear 1536 -> 8192.
    assert tuple(vit.blocks[0].mlp.fc1.weight.shape) == (8192, 1536)
    assert tuple(vit.blocks[0].mlp.fc2.weight.shape) == (1536, 4096)
    assert tuple(vit.pos_embed.shape) == (1, 37 * 37 + 1, 1536)


def test_hf_errors(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        resolve_name(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(UserError, match="config.json"):
        resolve_name(f"hf:{tmp_path}")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 8}))
    with pytest.raises(UserError, match="model_type 'vit'"):
        resolve_name(f"hf:{tmp_path}")


# ------------------------------------------------------------------------------ strict loading
def test_strict_loading_names_mismatched_keys_and_shapes(tmp_path):
    ref = randomize(create_vit(tiny_spec()))
    path = save(dict(ref.state_dict()), tmp_path / "w.safetensors")
    with pytest.raises(UserError) as e:  # another width
        build_backbone(tiny_spec(embed_dim=32), str(path))
    msg = str(e.value)
    assert "\n" not in msg and "does not fit 'tiny'" in msg
    assert "cls_token (1, 1, 64) != (1, 1, 32)" in msg and "(+" in msg
    with pytest.raises(UserError) as e:  # another depth
        build_backbone(tiny_spec(depth=1), str(path))
    assert "unexpected: blocks.1." in str(e.value)
    with pytest.raises(UserError) as e:  # registers expected, none in the file; pos_embed has a cls slot
        build_backbone(tiny_spec(reg=True), str(path))
    assert "pos_embed (1, 17, 64) != (1, 16, 64)" in str(e.value) and "missing: reg_token" in str(e.value)
    other_grid = randomize(create_vit(tiny_spec(img_size=42)))  # no silent pos_embed resampling
    with pytest.raises(UserError, match=r"pos_embed \(1, 10, 64\) != \(1, 17, 64\)"):
        build_backbone(tiny_spec(), str(save(dict(other_grid.state_dict()), tmp_path / "grid.pth")))


def test_missing_unreadable_and_foreign_files(tmp_path):
    spec = tiny_spec()
    with pytest.raises(UserError, match="does not exist.*--weights random"):
        build_backbone(spec, str(tmp_path / "nope.pth"))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read .* as safetensors"):
        build_backbone(spec, str(tmp_path / "bad.safetensors"))
    (tmp_path / "bad.pth").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="cannot read weights file"):
        build_backbone(spec, str(tmp_path / "bad.pth"))
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pth")
    with pytest.raises(UserError, match="holds no ViT weights.*fc.weight"):
        build_backbone(spec, str(tmp_path / "resnet.pth"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="folder without"):
        build_backbone(spec, str(tmp_path / "empty"))


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {"pos_embed": torch.zeros(1)}, "args": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="refused to load .*pickles .exec.*weights_only=True"):
        build_backbone(tiny_spec(), str(tmp_path / "evil.pth"))
    with open(tmp_path / "evil_legacy.pt", "wb") as f:  # a bare pickle, not torch's zip format
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(UserError):
        build_backbone(tiny_spec(), str(tmp_path / "evil_legacy.pt"))
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------------------------- auto
@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("CKA_SPLIT_CACHE", str(tmp_path / "cka"))
    return tmp_path


def test_auto_finds_official_file_in_torch_hub_cache(empty_caches):
    """The real name: dinov2_vits14_pretrain.pth (release layout, 518 px pos_embed = 37x37+1)."""
    ref = randomize(create_vit(resolve_name("dinov2_vits14")), scale=0.02)
    folder = empty_caches / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    sd = official_layout(ref)
    assert sd["pos_embed"].shape == (1, 37 * 37 + 1, 384)
    path = save(sd, folder / "dinov2_vits14_pretrain.pth")
    bb = build_backbone("dinov2_vits14", "auto")
    url = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
    assert bb.weights_source == f"torch.hub {url} (file {path} sha256:{sha256_file(path)})"
    x = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        assert torch.equal(bb(x), Backbone(ref, name="ref", weights_source="")(x))


def test_auto_finds_hf_hub_cache(empty_caches):
    spec = tiny_spec(reg=True)
    ref = randomize(create_vit(spec))
    repo = empty_caches / "hf" / "models--test-org--tiny"
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    path = save(dict(ref.state_dict()), repo / "snapshots" / "0123abc" / "model.safetensors")
    bb = build_backbone(spec, "auto")
    assert bb.weights_source == f"hub test-org/tiny (file {path} sha256:{sha256_file(path)})"
    assert_same_outputs(bb, ref, torch.randn(1, 3, 28, 28))


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "probe", "hung-probe"])
def test_auto_offline_fails_fast_naming_both_ways_forward(empty_caches, monkeypatch, how):
    if how == "probe":  # no offline flag: the connection probe decides. 192.0.2.1 is TEST-NET-1 (RFC 5737).
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(hub, "PROBE_ADDRESS", ("192.0.2.1", 443))
    elif how == "hung-probe":  # a lookup that never returns (a dead DNS server): the probe is abandoned
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

        def hung(*args, **kwargs):
            time.sleep(12)
            raise OSError("lookup timed out")

        monkeypatch.setattr(hub.socket, "create_connection", hung)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "download", lambda spec: pytest.fail("tried to download while offline"))
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        build_backbone("dinov2_vits14", "auto")
    assert time.monotonic() - start < 10
    msg = str(e.value)
    assert "--weights PATH" in msg and "--weights random" in msg and "\n" not in msg
    assert "dinov2_vits14_pretrain.pth" in msg and "timm/vit_small_patch14_dinov2.lvd142m" in msg
    assert ("HF_HUB_OFFLINE" in msg) == (how == "HF_HUB_OFFLINE")


def test_hf_hub_id_from_the_hf_cache(empty_caches):
    """hf:<org>/<model> found in the Hugging Face cache (config.json + weights of one snapshot)."""
    ref = randomize(create_vit(tiny_spec()))
    snap = empty_caches / "hf" / "models--test-org--dinov2-tiny" / "snapshots" / "feed"
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("feed")
    (snap / "config.json").write_text(
        json.dumps(
            {
                "model_type": "dinov2",
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "mlp_ratio": 4,
                "patch_size": 14,
                "image_size": 56,
                "use_swiglu_ffn": False,
            }
        )
    )
    path = save(hf_layout(ref), snap / "model.safetensors")
    bb = build_backbone("hf:test-org/dinov2-tiny", "auto")
    assert bb.weights_source == f"hf test-org/dinov2-tiny (file {path} sha256:{sha256_file(path)})"
    assert_same_outputs(bb, ref, torch.randn(1, 3, 56, 56))
    with pytest.raises(UserError, match="neither a folder nor in the Hugging Face cache"):
        resolve_name("hf:test-org/not-cached")


def test_demo_vit_auto_uses_the_demo_cache_when_nothing_ships(empty_caches, monkeypatch):
    monkeypatch.setattr(demo_vit, "SHIPPED_WEIGHTS", empty_caches / "not-shipped.safetensors")
    with pytest.raises(UserError, match="cka-split pretrain-demo"):
        build_backbone("demo-vit", "auto")
    where = demo_vit.cache_path(demo_vit.DEMO_RECIPE)
    assert where.parent == empty_caches / "cka" and where.name.startswith("demo-vit-")
    assert where.name.endswith(".safetensors") and demo_vit.DEMO_RECIPE.recipe_id in where.name
    vit = randomize(create_vit(resolve_name("demo-vit")))
    demo_vit.save_demo_vit(vit, demo_vit.DEMO_RECIPE, where, [1.0], [1.0])
    bb = build_backbone("demo-vit", "auto")
    assert str(where) in bb.weights_source and demo_vit.find_demo_vit() == where
    assert torch.equal(bb.vit.blocks[3].attn.qkv.weight, vit.blocks[3].attn.qkv.weight)


# ------------------------------------------------------------------------------ names, layers
@pytest.mark.parametrize("size,timm_size", [("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant")])
@pytest.mark.parametrize("reg", [False, True])
def test_dinov2_names(size, timm_size, reg):
    import timm

    spec = resolve_name(f"dinov2_vit{size}14" + ("_reg" if reg else ""))
    stem = f"dinov2_vit{size}14" + ("_reg4" if reg else "")
    timm_name = f"vit_{timm_size}_patch14" + ("_reg4" if reg else "") + "_dinov2"
    assert spec.timm_name == timm_name and timm_name in timm.list_models()
    assert spec.hub_file == f"{stem}_pretrain.pth"
    assert spec.hub_url == f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{size}14/{stem}_pretrain.pth"
    assert spec.hf_id == f"timm/{timm_name}.lvd142m"


def test_random_weights_for_real_names():
    bb = build_backbone("dinov2_vits14", "random")
    assert bb.weights_source == "random"
    assert (bb.num_layers, bb.embed_dim, bb.patch_size, bb.num_prefix_tokens) == (12, 384, 14, 1)
    assert build_backbone("dinov2_vits14", "random", seed=4).weights_source == "random (seed 4)"
    reg = build_backbone("dinov2_vits14_reg", "random")
    assert reg.num_prefix_tokens == 5 and tuple(reg.vit.pos_embed.shape) == (1, 37 * 37, 384)
    for name in ("dinov2_vitx14", "dinov2_vits16", "not_a_model"):
        with pytest.raises(UserError):
            build_backbone(name, "random")


@pytest.mark.parametrize("reg", [False, True])
def test_forward_layers_stops_early_with_token_shapes(reg):
    bb = Backbone(randomize(create_vit(tiny_spec(reg=reg, depth=4))), name="t", weights_source="random")
    x = torch.randn(2, 3, 56, 70)  # grid 4 x 5
    ran = []
    hooks = [blk.register_forward_hook(lambda m, i, o, n=n: ran.append(n)) for n, blk in enumerate(bb.vit.blocks)]
    with torch.no_grad():
        out = bb.forward_layers(x, [1, 0, 1])
    for h in hooks:
        h.remove()
    assert ran == [0, 1] and sorted(out) == [0, 1]
    prefix = 5 if reg else 1
    assert out[0].shape == out[1].shape == (2, prefix + 20, 64)
    with torch.no_grad():
        assert torch.equal(out[1], bb.vit.blocks[1](out[0]))
        full = bb.vit.forward_features(x)  # timm's own pass, final norm included
        assert torch.equal(bb(x), full)
    with pytest.raises(UserError, match="outside"):
        bb.forward_layers(x, [4])


def test_pad_is_centred():
    bb = Backbone(create_vit(tiny_spec()), name="t", weights_source="random")
    x = torch.rand(1, 3, 512, 513) + 1.0  # nonzero everywhere
    p = bb.pad(x)
    assert p.shape[-2:] == (518, 518)
    assert torch.equal(p[..., 3:515, 2:515], x)  # 512 -> 3 + 3 rows; 513 -> 2 left + 3 right columns
    assert p[..., :3, :].abs().sum() == 0 and p[..., 515:, :].abs().sum() == 0
    assert p[..., :, :2].abs().sum() == 0 and p[..., :, 515:].abs().sum() == 0
    assert bb.pad(torch.ones(1, 3, 28, 42)).shape == (1, 3, 28, 42)
    assert bb.grid_size(512, 513) == (37, 37)


def test_tokens_to_map_drops_prefix_tokens_row_major():
    bb = Backbone(create_vit(tiny_spec(reg=True)), name="t", weights_source="random")
    tokens = torch.arange(2 * (5 + 6) * 3, dtype=torch.float32).reshape(2, 11, 3)
    fmap = bb.tokens_to_map(tokens, (2, 3))
    assert fmap.shape == (2, 3, 2, 3)
    for i in range(2):
        for j in range(3):
            assert torch.equal(fmap[:, :, i, j], tokens[:, 5 + i * 3 + j])


def test_seeded_random_build_leaves_the_global_rng_alone():
    """build_backbone(seed=...) is reproducible and does not reseed the caller's global generator."""
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_backbone(tiny_spec(), "random", seed=5)
    assert torch.equal(torch.rand(3), expected_next)
    b = build_backbone(tiny_spec(), "random", seed=5)
    torch.manual_seed(5)
    ref = create_vit(tiny_spec())  # the weights a global seed of 5 gives
    assert torch.equal(a.vit.blocks[1].mlp.fc1.weight, b.vit.blocks[1].mlp.fc1.weight)
    assert torch.equal(a.vit.blocks[1].mlp.fc1.weight, ref.blocks[1].mlp.fc1.weight)


@pytest.mark.parametrize(
    "width,swiglu,expected",
    [
        (768, False, "vit_base_patch14_dinov2"),
        (1024, False, "vit_large_patch14_dinov2"),
        (384, False, "vit_small_patch14_dinov2"),
        (1536, True, "vit_giant_patch14_dinov2"),
    ],
)
def test_hf_spec_names_the_timm_architecture_of_its_width(tmp_path, width, swiglu, expected):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "dinov2",
                "hidden_size": width,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "patch_size": 14,
                "image_size": 56,
                "use_swiglu_ffn": swiglu,
            }
        )
    )
    spec = hf_spec(f"hf:{tmp_path}")
    assert spec.timm_name == expected and spec.label == f"timm {expected}"


def test_hf_model_of_another_width_is_named_by_its_shape_in_errors(tmp_path):
    """A width-64 hf: model is built from timm's small architecture; a misfit file's error must give
    its real width, not call it a ViT-S."""
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "dinov2",
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "patch_size": 14,
                "image_size": 56,
            }
        )
    )
    other = save(randomize(create_vit(tiny_spec(embed_dim=32))).state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(UserError) as e:
        build_backbone(f"hf:{tmp_path}", str(other))
    assert "width 64 and 2 blocks" in str(e.value)


def test_unreadable_metadata_of_a_loaded_file_is_an_error_not_silence(tmp_path, monkeypatch):
    """The demo-vit source check reads a file's metadata after its tensors were read: a failure
    there is reported, not swallowed into a weights_source without the file's origin."""
    from safetensors import SafetensorError

    path = save(randomize(create_vit(tiny_spec())).state_dict(), tmp_path / "w.safetensors")

    def broken(*args, **kwargs):
        raise SafetensorError("metadata unreadable")

    monkeypatch.setattr(demo_vit, "safe_open", broken)
    with pytest.raises(UserError, match="metadata unreadable"):
        build_backbone(tiny_spec(), str(path))
