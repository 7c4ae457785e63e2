"""demo-vit pretext pretraining: recipe ids, learning, the cache, and what the weights say they are."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch

from vitsplit import pretrain as pt
from vitsplit.backbones import Backbone, sha256_file
from vitsplit.backbones import demo_vit as dv
from vitsplit.errors import UserError
from vitsplit.fileio import atomic_write_safetensors as write_safetensors
from vitsplit.fileio import read_safetensors
from vitsplit.pretrain import loop as pretrain_loop
from vitsplit.progress import NULL_PROGRESS

# A ViT small enough for a test (4 blocks, width 32, 4x4 patches of 14 px on 56 px images).
TINY = dv.DemoRecipe(
    steps=60,
    batch_size=8,
    image_size=56,
    lr=3e-3,
    warmup_steps=4,
    dataset_length=32,
    decoder_dim=32,
    decoder_depth=1,
    decoder_heads=2,
    arch=(("embed_dim", 32), ("depth", 4), ("num_heads", 2)),
)


pytestmark = pytest.mark.usefixtures("one_thread")  # float reductions split the same way in every run


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_recipe_id_is_stable_and_changes_with_every_field():
    again = dv.DemoRecipe.from_json(json.loads(json.dumps(TINY.to_json())))
    assert again == TINY and again.recipe_id == TINY.recipe_id
    assert TINY.recipe_id == "5c2d17d79957"  # the same in every process and on every machine
    changed = {
        "steps": 41,
        "batch_size": 4,
        "image_size": 42,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "warmup_steps": 5,
        "grad_clip": 0.0,
        "layer_scale_init": 1e-5,
        "seed": 1,
        "pretext": "simclr",
        "mask_ratio": 0.5,
        "decoder_dim": 64,
        "decoder_depth": 2,
        "decoder_heads": 4,
        "view_size": 28,
        "crop_min": 0.5,
        "temperature": 0.1,
        "proj_hidden": 64,
        "proj_dim": 16,
        "data": "folder:x",
        "dataset_length": 64,
        "arch": (("depth", 3),),
        "threads": 2,
        "version": 3,
    }
    assert set(changed) == {f.name for f in dataclasses.fields(dv.DemoRecipe)}  # every field is covered
    ids = {dataclasses.replace(TINY, **{k: v}).recipe_id for k, v in changed.items()}
    assert len(ids) == len(changed) and TINY.recipe_id not in ids
    assert dv.DEMO_RECIPE.pretext == "simclr" and dv.DEMO_RECIPE.threads == 1
    assert dv.DEMO_RECIPE.vit_kwargs()["embed_dim"] == 192 and dv.DEMO_RECIPE.vit_kwargs()["depth"] == 12


def test_recipe_rejects_unknown_pretext_and_arch_keys():
    with pytest.raises(UserError, match="pretext"):
        dv.DemoRecipe(pretext="rotation")
    with pytest.raises(UserError, match="arch"):
        dv.DemoRecipe(arch=(("width", 3),))


def test_cache_dir_env_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("CKA_SPLIT_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert dv.cache_dir() == tmp_path / "c"
    assert dv.cache_path(TINY) == tmp_path / "c" / f"demo-vit-{TINY.recipe_id}.safetensors"
    monkeypatch.delenv("CKA_SPLIT_CACHE")
    assert dv.cache_dir() == tmp_path / "x" / "cka-split"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert dv.cache_dir() == tmp_path / "h" / ".cache" / "cka-split"


def test_patchify_matches_patch_token_order():
    x = torch.randn(2, 3, 28, 42)
    patches = pt.patchify(x, 14)  # (2, 2*3, 588)
    assert patches.shape == (2, 6, 14 * 14 * 3)
    r, c = 1, 2  # patch 1*3 + 2 = 5
    expected = x[1, :, r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[1, 5], expected)


def test_sincos_pos_embed_distinguishes_rows_and_columns():
    pe = pt.sincos_pos_embed_2d(16, 3, 4)
    assert pe.shape == (12, 16)
    # first half encodes the row, second half the column
    assert torch.equal(pe[0, :8], pe[3, :8]) and not torch.equal(pe[0, 8:], pe[3, 8:])
    assert torch.equal(pe[0, 8:], pe[4, 8:]) and not torch.equal(pe[0, :8], pe[4, :8])


def test_tiny_pretraining_learns_beyond_the_trivial_prediction():
    res = pt.pretrain(TINY)
    assert len(res.losses) == TINY.steps and all(map(torch.isfinite, torch.tensor(res.losses)))
    first = sum(res.losses[:5]) / 5
    last = sum(res.losses[-10:]) / 10
    base = sum(res.baselines[-10:]) / 10
    # Targets are normalised per patch, so predicting zero costs `base` (about 1 on textured
    # patches). A randomly initialised decoder costs more than that; a model that has learnt
    # nothing can at best reach it. Requiring the end loss to be clearly below both shows that
    # the encoder-decoder reconstructs masked patches from the visible ones.
    assert first > 0.95 * sum(res.baselines[:5]) / 5
    assert last < 0.8 * first
    assert last < 0.9 * base
    # layer scale started at recipe.layer_scale_init (0.1), not timm's 1e-5
    gammas = [b.ls1.gamma.abs().mean().item() for b in res.vit.blocks]
    assert min(gammas) > 0.05
    # deterministic for a recipe: the same recipe gives the same first losses
    again = pt.pretrain(dataclasses.replace(TINY, steps=3))
    assert again.losses[:1] != [] and abs(again.losses[0] - res.losses[0]) < 1e-6


def test_load_or_pretrain_caches_atomically_and_reuses(monkeypatch, tmp_path):
    recipe = dataclasses.replace(TINY, steps=6)
    calls = []
    real = pt.pretrain

    def spy(r, progress=NULL_PROGRESS):
        calls.append(r)
        result = real(r, progress)
        spy.result = result
        return result

    monkeypatch.setattr(pretrain_loop, "pretrain", spy)
    bb = pt.load_or_pretrain_demo_vit(recipe, cache_dir=tmp_path)
    path = tmp_path / f"demo-vit-{recipe.recipe_id}.safetensors"
    assert calls == [recipe] and path.is_file()
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left behind
    assert _state_equal(bb.vit, spy.result.vit)  # bit for bit what was trained
    assert bb.num_layers == 4 and bb.embed_dim == 32
    src = bb.weights_source
    assert src.startswith("demo-vit pretrained by cka-split (recipe " + recipe.recipe_id)
    assert "MAE-style masked patch reconstruction, 6 steps on synthetic scenes" in src
    assert f"file {path} sha256:{sha256_file(path)}" in src
    _, saved_recipe, meta = dv.read_demo_vit_file(path)
    assert saved_recipe == recipe and len(json.loads(meta["losses"])) == 6

    mtime = path.stat().st_mtime_ns
    bb2 = pt.load_or_pretrain_demo_vit(recipe, cache_dir=tmp_path)
    assert len(calls) == 1 and path.stat().st_mtime_ns == mtime  # reused, not retrained
    assert _state_equal(bb2.vit, bb.vit) and bb2.weights_source == src


def test_pretrain_demo_vit_is_not_called_saved():
    bb = pt.pretrain_demo_vit(dataclasses.replace(TINY, steps=2))
    assert "pretrained by cka-split" in bb.weights_source and "not saved" in bb.weights_source
    assert "random" not in bb.weights_source


def test_a_foreign_file_in_the_cache_is_a_user_error(tmp_path):
    path = dv.cache_path(TINY, tmp_path)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(UserError, match="not a demo-vit file"):
        pt.load_or_pretrain_demo_vit(TINY, cache_dir=tmp_path)
    path.write_bytes(b"garbage")
    with pytest.raises(UserError, match="cka-split pretrain-demo"):
        dv.load_demo_vit(path)


def test_cached_demo_weights_load_into_a_fresh_demo_vit(monkeypatch, tmp_path):
    from vitsplit.backbones import DEMO_VIT_KWARGS, create_vit, resolve_name

    monkeypatch.setenv("CKA_SPLIT_CACHE", str(tmp_path))
    monkeypatch.setattr(dv, "SHIPPED_WEIGHTS", tmp_path / "none.safetensors")  # a checkout without shipped weights
    fresh = create_vit(resolve_name("demo-vit"))
    with pytest.raises(UserError, match="run `cka-split pretrain-demo`.*--weights random"):
        dv.load_demo_vit_into(fresh)
    # a stand-in for the demo recipe's output
    torch.manual_seed(3)
    trained = create_vit(resolve_name("demo-vit"))
    dv.save_demo_vit(trained, dv.DEMO_RECIPE, dv.cache_path(dv.DEMO_RECIPE), [1.0], [1.0])
    source = dv.load_demo_vit_into(fresh)
    assert _state_equal(fresh, trained)
    assert f"recipe {dv.DEMO_RECIPE.recipe_id}" in source and "pretrained by cka-split" in source
    assert dv.find_demo_vit() == dv.cache_path(dv.DEMO_RECIPE)
    assert dv.DEMO_RECIPE.vit_kwargs() == DEMO_VIT_KWARGS


def test_rendered_images_round_trip_the_dataset_exactly():
    from vitsplit.data import build_dataset

    recipe = dataclasses.replace(TINY, dataset_length=8, batch_size=4)
    images = pt.render_images(recipe)
    assert images.shape == (8, 3, 56, 56) and images.dtype == torch.uint8
    ds = build_dataset("synthetic", "train", task="seg", crop=56, augment=False, length=8, seed=0)
    idx = torch.tensor([2, 5])
    x = pretrain_loop._batch(images, idx, torch.tensor([False, True]))
    assert torch.allclose(x[0], ds[2]["image"], atol=1e-5)  # 8-bit scenes survive the uint8 cache
    assert torch.allclose(x[1], ds[5]["image"].flip(-1), atol=1e-5)
    assert not torch.allclose(x[1], ds[5]["image"], atol=1e-2)


def test_a_demo_vit_file_loaded_by_path_says_it_was_pretrained_by_cka_split(tmp_path):
    """build_backbone('demo-vit', PATH) on a cache file keeps the recipe in weights_source."""
    from vitsplit.backbones import build_backbone
    from vitsplit.backbones.demo_vit import DEMO_RECIPE, create_demo_vit, save_demo_vit

    vit = create_demo_vit(DEMO_RECIPE)
    path = save_demo_vit(vit, DEMO_RECIPE, tmp_path / "demo.safetensors", [1.0], [1.0])
    bb = build_backbone("demo-vit", str(path))
    assert bb.weights_source.startswith("demo-vit pretrained by cka-split (recipe " + DEMO_RECIPE.recipe_id)
    assert "sha256:" in bb.weights_source


@pytest.mark.parametrize("before", [False, True])
def test_pretraining_puts_back_the_callers_flush_denormal_setting(before):
    """Flushing denormals is scoped to pretraining: the caller's setting (on or off) survives it."""
    torch.set_flush_denormal(before)
    try:
        assert pretrain_loop.flush_denormal_enabled() == before
        pt.pretrain(dataclasses.replace(TINY, steps=1, dataset_length=8))
        assert pretrain_loop.flush_denormal_enabled() == before
    finally:
        torch.set_flush_denormal(False)


# ------------------------------------------------------------------------------ SimCLR (the demo's)
TINY_SIMCLR = dataclasses.replace(
    TINY,
    pretext="simclr",
    steps=60,
    batch_size=8,
    dataset_length=32,
    view_size=28,
    warmup_steps=2,
    temperature=0.1,
    grad_clip=3.0,
)


def test_full_area_crops_are_the_image_or_its_mirror_and_views_repeat_with_the_generator():
    from vitsplit.pretrain.views import colour_change, resized_crops

    x = torch.randn(16, 3, 28, 28)
    crops = resized_crops(x, 28, (1.0, 1.0), torch.Generator().manual_seed(0))
    same = [torch.allclose(c, i, atol=1e-5) for c, i in zip(crops, x)]
    mirrored = [torch.allclose(c, i.flip(-1), atol=1e-5) for c, i in zip(crops, x)]
    assert all(a != b for a, b in zip(same, mirrored))  # each crop is exactly one of the two
    assert 2 <= sum(mirrored) <= 14
    small = resized_crops(x, 14, (0.25, 0.25), torch.Generator().manual_seed(1))  # half the side, at scale 1
    assert small.shape == (16, 3, 14, 14)
    assert torch.equal(small, resized_crops(x, 14, (0.25, 0.25), torch.Generator().manual_seed(1)))
    assert not torch.equal(small, resized_crops(x, 14, (0.25, 0.25), torch.Generator().manual_seed(2)))

    y = colour_change(x, torch.Generator().manual_seed(3))
    for img, out in zip(x, y):
        if torch.allclose(out[0], out[1]) and torch.allclose(out[1], out[2]):
            continue  # turned grey
        for c in range(3):  # every output channel is gain * (one input channel) + offset
            corr = max(
                abs(torch.corrcoef(torch.stack([out[c].flatten(), img[k].flatten()]))[0, 1].item()) for k in range(3)
            )
            assert corr > 0.9999


def test_tiny_simclr_pretraining_learns_beyond_chance():
    res = pt.pretrain(TINY_SIMCLR)
    assert len(res.losses) == TINY_SIMCLR.steps
    chance = math.log(2 * TINY_SIMCLR.batch_size - 1)
    assert res.baselines[0] == pytest.approx(chance)
    # A fresh model finds each view's partner at chance (the first steps' loss is within a few %
    # of log(2B - 1)); after 60 steps the last ten average 0.84 x chance (measured), about five
    # times the step-to-step scatter below it.
    assert sum(res.losses[:3]) / 3 > 0.95 * chance
    assert sum(res.losses[-10:]) / 10 < 0.92 * chance
    assert isinstance(
        pt.pretext_model(Backbone(dv.create_demo_vit(TINY_SIMCLR), name="demo-vit", weights_source="x"), TINY_SIMCLR),
        pt.SimCLR,
    )


def test_pretraining_writes_the_same_bytes_twice_and_pins_its_thread_count(tmp_path):
    """The shipped file's sha256 is only reproducible if a recipe gives the same bytes every time:
    the same weights (fixed seeds and thread count) and a canonical file header."""
    recipe = dataclasses.replace(TINY_SIMCLR, steps=3, threads=1)
    seen = []
    real = pt.SimCLR.forward

    def spy(self, images, generator=None):
        seen.append(torch.get_num_threads())
        return real(self, images, generator)

    torch.set_num_threads(2)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(pt.SimCLR, "forward", spy)
            a = pt.pretrain_to_file(recipe, tmp_path / "a.safetensors")
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2  # pinned inside, restored after
        b = pt.pretrain_to_file(recipe, tmp_path / "b.safetensors")
    finally:
        torch.set_num_threads(1)
    assert a.read_bytes() == b.read_bytes()
    state, saved, meta = dv.read_demo_vit_file(a)
    assert saved == recipe and meta["command"] == "cka-split pretrain-demo"
    assert meta["weights_sha256"] == dv.weights_sha256(state)


def test_a_file_whose_weights_do_not_match_their_recorded_hash_is_refused(tmp_path):
    vit = dv.create_demo_vit(TINY)
    path = dv.save_demo_vit(vit, TINY, tmp_path / "x.safetensors", [1.0], [1.0])
    meta, state = read_safetensors(path)
    state["cls_token"] = state["cls_token"] + 1.0
    write_safetensors(tmp_path / "y.safetensors", state, meta)
    with pytest.raises(UserError, match="weights_sha256"):
        dv.read_demo_vit_file(tmp_path / "y.safetensors")
