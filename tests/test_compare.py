"""cka_split.pipelines.compare: cross-model CKA on tiny models of different widths and patch sizes, the
boundary-contrast statistic on constructed matrices, and its jackknife against a direct
leave-one-minibatch-out computation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from tiny_vits import randomize

from cka_split import analyze
from cka_split.pipelines.compare import Comparison, boundary_contrast, compare_models, jackknife_se, split_of
from vitsplit.backbones import Backbone
from vitsplit.errors import UserError


def tiny(name: str, width: int, seed: int, **kw) -> Backbone:
    vit = timm.create_model(name, pretrained=False, depth=4, embed_dim=width, num_heads=2, num_classes=0, **kw)
    return Backbone(randomize(vit, seed).eval(), name=name, weights_source="random")


@pytest.fixture(scope="module")
def three():
    """Widths 64 / 96 / 32, patch 16 / 14 / 16, prefix tokens 5 / 1 / 0 (DINOv3, DINOv2, SigLIP)."""
    return {
        "dinov3": tiny("vit_small_patch16_dinov3", 64, 0),
        "dinov2": tiny("vit_small_patch14_dinov2", 96, 1, img_size=56, dynamic_img_size=True),
        "siglip": tiny("vit_base_patch16_siglip_224", 32, 2, img_size=64, dynamic_img_size=True),
    }


def batches(n: int = 4, b: int = 6, size: int = 64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, size, size, generator=g) for _ in range(n)]


def test_three_models_of_different_widths_and_patches(three):
    cmp = compare_models(three, batches())
    assert cmp.grids == {"dinov3": (4, 4), "dinov2": (5, 5), "siglip": (4, 4)}  # 64 px: 4x4 at p16, 5x5 at p14
    assert cmp.common_grid == (4, 4)
    assert cmp.matrix("dinov3", "dinov2").shape == (4, 4) and cmp.num_batches == 4
    for name in three:  # each model's own matrix: ones on the diagonal, symmetric
        own = cmp.matrix(name, name)
        torch.testing.assert_close(torch.diagonal(own), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(own, own.T, rtol=0, atol=1e-12)
    # models whose grid is the common grid: their own CKA is exactly what analyze() gives on native tokens
    for name in ("dinov3", "siglip"):
        alone = analyze({name: three[name]}, batches(), features="tokens")
        torch.testing.assert_close(cmp.matrix(name, name), alone.matrix(name, name), rtol=0, atol=1e-10)
    torch.testing.assert_close(cmp.matrix("dinov2", "siglip"), cmp.matrix("siglip", "dinov2").T, rtol=0, atol=1e-12)


def test_a_copy_compares_as_itself_across_models(three):
    models = {"a": three["dinov2"], "b": copy.deepcopy(three["dinov2"])}
    cmp = compare_models(models, batches(3))
    torch.testing.assert_close(cmp.matrix("a", "b"), cmp.matrix("a", "a"), rtol=0, atol=1e-12)


def test_resampling_averages_the_same_image_regions():
    """Tokens of an 8x6 grid (row-major) resampled to 7x5: every output feature is the mean of the
    tokens whose cells overlap that output cell (adaptive pooling bins, computed here by hand)."""
    from cka_split.estimator.cka import GramWorkspace
    from cka_split.pipelines.compare import _TokenGrams

    g = torch.Generator().manual_seed(0)
    b, (h, w), (th, tw), c = 5, (8, 6), (7, 5), 3
    f = torch.randn(b, h * w, c, generator=g, dtype=torch.float64)
    t = _TokenGrams(GramWorkspace(), resample=True)
    t.grid, t.target = (h, w), (th, tw)
    want = torch.empty(b, c, th, tw, dtype=torch.float64)
    for i in range(th):
        r0, r1 = (i * h) // th, -((-(i + 1) * h) // th)
        for j in range(tw):
            c0, c1 = (j * w) // tw, -((-(j + 1) * w) // tw)
            cells = [y * w + x for y in range(r0, r1) for x in range(c0, c1)]  # row-major token index
            want[:, :, i, j] = f[:, cells].mean(1)
    want = want.reshape(b, -1)
    want = want - want[:1]
    torch.testing.assert_close(t(f), want @ want.T, rtol=1e-10, atol=1e-10)


def test_boundary_contrast_is_zero_for_pure_depth_decay_and_peaks_at_a_group_boundary():
    L = 10
    i, j = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
    toeplitz = np.exp(-np.abs(i - j) / 3.0)
    np.testing.assert_allclose(boundary_contrast(toeplitz), 0.0, atol=1e-12)
    for s in (2, 5, 7):
        groups = np.where((i < s) == (j < s), 0.9, 0.3) + 0.05 * toeplitz  # two groups + a decay
        np.fill_diagonal(groups, 1.0)
        value, boundary = split_of(groups)
        assert boundary == s and value == pytest.approx(0.6, abs=0.05)
    three_groups = np.where(i // 4 == j // 4, 0.95, 0.2)
    c = boundary_contrast(three_groups)
    assert set(np.argsort(c)[-2:] + 1) == {4, 8}  # both boundaries stand out


def test_jackknife_equals_direct_leave_one_minibatch_out(three):
    models = {"dinov3": three["dinov3"], "siglip": three["siglip"]}
    data = batches(4)
    cmp = compare_models(models, data)
    splits = cmp.splits()
    diffs = cmp.split_differences()
    direct = {n: [] for n in models}
    for b in range(len(data)):
        loo = compare_models(models, data[:b] + data[b + 1 :])
        for n in models:
            direct[n].append(split_of(loo.matrix(n, n).numpy())[0])
    for n in models:
        assert splits[n].split_se == pytest.approx(jackknife_se(np.array(direct[n])), rel=1e-9, abs=1e-12)
        assert splits[n].split == pytest.approx(split_of(cmp.matrix(n, n).numpy())[0], abs=1e-12)
    d, se = diffs[("dinov3", "siglip")]
    assert d == pytest.approx(splits["dinov3"].split - splits["siglip"].split, abs=1e-12)
    assert se == pytest.approx(jackknife_se(np.array(direct["dinov3"]) - np.array(direct["siglip"])), rel=1e-9)


def test_save_load_round_trip_and_errors(tmp_path, three):
    cmp = compare_models({"a": three["dinov3"], "b": three["siglip"]}, batches(2), features="mean")
    assert cmp.common_grid is None
    back = Comparison.load(cmp.save(tmp_path))
    assert torch.equal(back.result.full, cmp.result.full) and torch.equal(back.batch_hsic, cmp.batch_hsic)
    assert back.grids == cmp.grids and back.models == ["a", "b"] and back.info["a"]["weights_source"] == "random"
    with pytest.raises(UserError, match="share one size"):
        compare_models({"a": three["dinov3"]}, [batches(1)[0], batches(1, size=48)[0]])
    with pytest.raises(UserError, match="does not hold a comparison"):
        Comparison.load(tmp_path / "nothing")


# ================================================================ the command
def hf_folders(tmp_path):
    """Two tiny transformers models saved as folders: DINOv3 (width 64, patch 16, 4 registers) and
    DINOv2 (width 96, patch 14)."""
    transformers = pytest.importorskip("transformers")
    d3 = transformers.DINOv3ViTModel(
        transformers.DINOv3ViTConfig(
            hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128, num_register_tokens=4
        )
    )
    d2 = transformers.Dinov2Model(
        transformers.Dinov2Config(
            hidden_size=96, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=56
        )
    )
    d3.save_pretrained(tmp_path / "d3")
    d2.save_pretrained(tmp_path / "d2")
    return f"hf:{tmp_path / 'd3'}", f"hf:{tmp_path / 'd2'}"


@pytest.mark.slow
def test_compare_command_on_three_models_of_different_widths_and_patches(tmp_path, capsys, monkeypatch):
    from cka_split.cli.app import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d3, d2 = hf_folders(tmp_path)
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as e:
        main(
            [
                "compare",
                "--models",
                d3,
                d2,
                "dinov3_vits16",
                "--weights",
                "dinov3_vits16=random",
                "--probe-images",
                "16",
                "--batch-size",
                "8",
                "--image-size",
                "32",
                "--out",
                str(out),
            ]
        )
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "How cleanly each model splits" in printed and "report:" in printed
    cmp = Comparison.load(out)
    assert cmp.models == [d3, d2, "dinov3_vits16"] and cmp.num_batches == 2
    assert cmp.grids == {d3: (2, 2), d2: (3, 3), "dinov3_vits16": (2, 2)} and cmp.common_grid == (2, 2)
    assert cmp.matrix(d2, "dinov3_vits16").shape == (4, 12) and cmp.matrix(d3, d2).shape == (3, 4)
    import json

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["models"]["dinov3_vits16"]["weights_source"] == "random"
    assert cfg["models"][d3]["weights_source"].startswith("file ") and cfg["models"][d3]["family"] == "eva"
    html = (out / "report.html").read_text()
    assert "Random weights: not pretrained" in html and "dinov3_vits16" in html
    assert html.count("<figure") == 1 + 3 + 3  # contrast profile, three own heatmaps, three pairs


def test_compare_command_user_errors(tmp_path, capsys):
    from cka_split.cli.app import main

    for args, match in (
        (["--models", "dinov3_vits16"], "at least two"),
        (["--models", "dinov3_vits16", "dinov3_vits16"], "twice"),
        (["--models", "dinov3_vits16", "dinov2_vits14", "--weights", "clip=random"], "not one of --models"),
        (["--models", "dinov3_vits16", "dinov2_vits14", "--probe-images", "8"], "fewer than 2 minibatches"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["compare", *args, "--out", str(tmp_path / "x")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1
