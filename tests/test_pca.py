"""PCA feature maps: the PCA itself, one fit per layer across all models, the files and index."""

import copy
import json

import numpy as np
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from cka_split.probes.pca import fit_pca3, pca_maps
from vitsplit.backbones import Backbone


def tiny_backbone(seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=0, dynamic_img_size=True
    )
    return Backbone(vit, name="tiny", weights_source="random").eval()


def perturbed_from(bb: Backbone, start: int, scale: float = 0.5) -> Backbone:
    out = copy.deepcopy(bb)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for blk in out.vit.blocks[start:]:
            for p in blk.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return out


def test_fit_pca3_recovers_known_axes_and_ratios():
    g = torch.Generator().manual_seed(0)
    n, c = 4000, 8
    z = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor([10.0, 3.0, 1.0], dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))[0]
    x = z @ basis[:, :3].T + 0.01 * torch.randn(n, c, generator=g, dtype=torch.float64) + 5.0
    mean, axes, ratios = fit_pca3(x)
    assert torch.allclose(mean, torch.full((c,), 5.0, dtype=torch.float64), atol=0.5)
    for k in range(3):
        assert abs(float(axes[k] @ basis[:, k])) > 0.999  # same axis up to sign
        assert axes[k, axes[k].abs().argmax()] > 0  # deterministic sign
    expected = torch.tensor([100.0, 9.0, 1.0]) / (110.0 + c * 1e-4)
    assert torch.allclose(ratios.float(), expected, atol=0.01)


def test_maps_files_index_and_shared_colours(tmp_path):
    pre = tiny_backbone()
    same = copy.deepcopy(pre)
    late = perturbed_from(pre, 2)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    idx = pca_maps({"pretrained": pre, "same": same, "late": late}, images, tmp_path)
    assert json.loads((tmp_path / "index.json").read_text()) == idx
    assert idx["layers"] == [0, 1, 2, 3] and idx["grid_hw"] == [4, 4] and idx["num_images"] == 2
    for l in map(str, range(4)):
        r = idx["explained_variance"][l]
        assert r[0] >= r[1] >= r[2] >= 0 and sum(r) <= 1 + 1e-9
    tile = lambda name, l, i=0: np.asarray(Image.open(tmp_path / idx["images"][i]["maps"][name][str(l)]))  # noqa: E731
    assert tile("pretrained", 0).shape == (32, 32, 3)  # 4x4 patches of 8 px
    for l in range(4):  # an identical copy gets identical colours at every layer
        assert np.array_equal(tile("pretrained", l), tile("same", l))
    for l in (0, 1):  # unchanged blocks below the perturbation: same colours
        assert np.array_equal(tile("pretrained", l), tile("late", l))
    for l in (2, 3):
        assert np.abs(tile("pretrained", l).astype(int) - tile("late", l).astype(int)).mean() > 5
    grid = np.asarray(Image.open(tmp_path / "grid_1.png"))
    assert grid.shape == (3 * 32 + 2 * 2, 4 * 32 + 3 * 2, 3)
    assert np.array_equal(grid[34:66, 0:32], tile("same", 0, 1))  # row 1 = 'same', column 0 = layer 0
    assert np.asarray(Image.open(tmp_path / "input_0.png")).shape == (32, 32, 3)


def test_one_pca_per_layer_is_fitted_across_models(tmp_path):
    # With one joint fit, the pretrained model's colours at a diverged layer depend on which other
    # models are drawn with it; per-model fits would leave them unchanged.
    pre = tiny_backbone()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    a = pca_maps({"pretrained": pre, "other": copy.deepcopy(pre)}, images, tmp_path / "a", layers=[3])
    b = pca_maps({"pretrained": pre, "other": perturbed_from(pre, 0, scale=1.0)}, images, tmp_path / "b", layers=[3])
    ta = np.asarray(Image.open(tmp_path / "a" / a["images"][0]["maps"]["pretrained"]["3"]))
    tb = np.asarray(Image.open(tmp_path / "b" / b["images"][0]["maps"]["pretrained"]["3"]))
    assert a["layers"] == [3] and not np.array_equal(ta, tb)
