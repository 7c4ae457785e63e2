"""The split recommendation on constructed CKA matrices (with noise) and on tiny ViTs with planted
divergence: a copy equal to the pretrained model below block s and different from s on must give
exactly K_t = L - s."""

import copy
import json

import numpy as np
import pytest
import torch

from cka_split.recommend import (SplitRecommendation, default_k_p, default_k_t, divergence_start, layer_groups,
                                 recommend_split)
from vitsplit.errors import UserError
from vitsplit.model.configs import prior_layers_uniform


class FakeResult:
    """The part of CKAResult that recommend_split reads: models, layers, matrix(a, b)."""

    def __init__(self, mats: dict[tuple[str, str], np.ndarray], layers: list[int]):
        self.mats = mats
        self.models = sorted({n for pair in mats for n in pair}, key=lambda n: (n != "pretrained", n))
        self.layers = {m: list(layers) for m in self.models}

    def matrix(self, a, b):
        if (a, b) in self.mats:
            return torch.as_tensor(self.mats[(a, b)])
        return torch.as_tensor(self.mats[(b, a)]).T


def self_cka(L: int, groups: list[list[int]] | None = None, within: float = 0.95, across: float = 0.5) -> np.ndarray:
    """A symmetric (L, L) self-CKA: `within` inside each group, `across` between groups."""
    groups = groups or [list(range(L))]
    m = np.full((L, L), across)
    for g in groups:
        for i in g:
            for j in g:
                m[i, j] = within
    np.fill_diagonal(m, 1.0)
    return m


def planted_curve(L: int, s: int, rng: np.random.Generator, noise: float = 0.004) -> np.ndarray:
    """d(l): a noisy plateau near 0 below s, then a noisy rise from 0.1 to 0.6."""
    d = np.abs(rng.normal(0, noise, L))
    for l in range(s, L):
        d[l] = 0.1 + 0.5 * (l - s) / max(1, L - 1 - s) + rng.normal(0, noise)
    return d


def cross_with_diag(d: np.ndarray) -> np.ndarray:
    L = d.size
    m = np.full((L, L), 0.4)
    np.fill_diagonal(m, 1.0 - d)
    return m


@pytest.mark.parametrize("L,s", [(4, 1), (4, 3), (6, 2), (8, 2), (8, 4), (8, 6), (8, 7), (12, 3), (12, 6), (12, 9),
                                 (24, 5), (24, 20), (40, 27), (40, 39)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_divergence_on_noisy_constructed_curves(L, s, seed):
    rng = np.random.default_rng(seed * 100 + L * 7 + s)
    d_seg = planted_curve(L, s, rng)
    s_det = max(1, s - 1)
    d_det = planted_curve(L, s_det, rng)
    res = FakeResult({("pretrained", "pretrained"): self_cka(L), ("pretrained", "seg"): cross_with_diag(d_seg),
                      ("pretrained", "det"): cross_with_diag(d_det)}, list(range(L)))
    rec = recommend_split(res, tasks=["seg", "det"])
    assert rec.per_task["seg"].divergence_start == s
    assert rec.per_task["seg"].k_t == L - s
    assert rec.per_task["seg"].task_head_layers == list(range(s, L))
    assert rec.per_task["det"].k_t == L - s_det


@pytest.mark.parametrize("L,s", [(5, 1), (9, 4), (12, 11)])
def test_exact_step_and_small_step_are_found(L, s):
    # identical below s (d = 0 up to float round-off), a small but clear step from s on
    d = np.zeros(L)
    d[s:] = 0.03 + 0.001 * np.arange(L - s)
    d[:s] = 1e-15
    assert divergence_start(d).start == s


def test_divergence_from_block_zero_gives_L_minus_1():
    # every block changed: the plateau is the first block itself, so s = 1 and K_t = L - 1, which is
    # also what s = 0 gives after clipping to [1, L-1]
    L = 8
    res = FakeResult({("pretrained", "pretrained"): self_cka(L),
                      ("pretrained", "seg"): cross_with_diag(np.linspace(0.3, 0.9, L))}, list(range(L)))
    tr = recommend_split(res).per_task["seg"]
    assert tr.divergence_start == 1 and tr.k_t == L - 1


def test_single_early_spike_is_not_the_start():
    rng = np.random.default_rng(3)
    d = planted_curve(12, 8, rng)
    d[2] = 0.5  # one noisy block on the plateau
    assert divergence_start(d).start == 8
    assert divergence_start(d, min_run=1).start == 2


def test_flat_curve_gives_published_k_t():
    for L, k in [(12, 3), (24, 4), (40, 8), (8, 2)]:
        d = np.full(L, 0.01) + np.random.default_rng(L).normal(0, 0.002, L)
        res = FakeResult({("pretrained", "pretrained"): self_cka(L), ("pretrained", "seg"): cross_with_diag(d)},
                         list(range(L)))
        tr = recommend_split(res).per_task["seg"]
        assert tr.divergence_start is None and tr.k_t == k == default_k_t(L)
        assert "flat" in " ".join(tr.evidence)


def test_layer_subset_start_is_block_after_last_plateau_point():
    layers = [0, 2, 4, 6, 8, 10]
    d = np.array([0.0, 0.001, 0.0, 0.3, 0.5, 0.7])  # changed somewhere in 5..6
    assert divergence_start(d, layers).start == 5


def test_uniform_rule_reproduces_published_configs():
    assert prior_layers_uniform(12, 4, 2) == [2, 5, 8, 11]
    assert prior_layers_uniform(24, 8, 2) == [2, 5, 8, 11, 14, 17, 20, 23]
    assert prior_layers_uniform(40, 14, 27) == [27, 27] + list(range(28, 40))
    assert prior_layers_uniform(12, 5, 2) == [2, 4, 6, 8, 11]  # detection S: [2, 4, 6, 8, 11]


@pytest.mark.parametrize("L,prior", [(12, [2, 5, 8, 11]), (24, [2, 5, 8, 11, 14, 17, 20, 23])])
def test_flat_pretrained_evidence_gives_the_paper_defaults(L, prior):
    d = planted_curve(L, L - 3, np.random.default_rng(0))
    res = FakeResult({("pretrained", "pretrained"): self_cka(L), ("pretrained", "seg"): cross_with_diag(d)},
                     list(range(L)))
    tr = recommend_split(res).per_task["seg"]
    assert (tr.b, tr.k_p, tr.prior_layers) == (2, default_k_p(L), prior)
    assert tr.pretrained_groups == [list(range(L))]


def test_structured_pretrained_moves_b_and_k_p():
    L = 12
    groups = [[0], [1], [2], [3, 4], [5, 6], [7, 8], [9], [10], [11]]
    m = self_cka(L, groups, within=0.95, across=0.3)
    assert layer_groups(m, 0.9) == groups
    res = FakeResult({("pretrained", "pretrained"): m,
                      ("pretrained", "seg"): cross_with_diag(planted_curve(L, 9, np.random.default_rng(1)))},
                     list(range(L)))
    tr = recommend_split(res).per_task["seg"]
    assert tr.b == 3  # blocks 0, 1, 2 stand alone before the first larger group
    assert tr.k_p == 6  # groups from block 3 on: [3,4] [5,6] [7,8] [9] [10] [11]
    assert tr.prior_layers == prior_layers_uniform(12, 6, 3) == [3, 4, 6, 7, 9, 11]
    assert any("b = 3" in e for e in tr.evidence) and any("K_p = 6" in e for e in tr.evidence)


def test_budget_lowers_k_t_and_says_so():
    L = 12
    res = FakeResult({("pretrained", "pretrained"): self_cka(L),
                      ("pretrained", "seg"): cross_with_diag(planted_curve(L, 6, np.random.default_rng(0)))},
                     list(range(L)))
    count = lambda task, k_t, prior: 1_000_000 + 200_000 * k_t + 10 * len(prior)  # noqa: E731
    free = recommend_split(res, param_count=count).per_task["seg"]
    assert free.k_t == 6 and free.trainable_params == 2_200_040
    tight = recommend_split(res, max_trainable_params=1_700_000, param_count=count).per_task["seg"]
    assert tight.k_t == 3 and tight.k_t_from_cka == 6 and tight.trainable_params == 1_600_040
    assert tight.task_head_layers == [9, 10, 11]
    assert any("lowered to 3" in e for e in tight.evidence)
    with pytest.raises(UserError, match="even with K_t=1"):
        recommend_split(res, max_trainable_params=1_100_000, param_count=count)


def test_errors_and_json_round_trip(tmp_path):
    L = 8
    res = FakeResult({("pretrained", "pretrained"): self_cka(L),
                      ("pretrained", "seg"): cross_with_diag(planted_curve(L, 4, np.random.default_rng(0)))},
                     list(range(L)))
    with pytest.raises(UserError, match="unknown task 'depth'"):
        recommend_split(res, tasks=["depth"])
    with pytest.raises(UserError, match="no model 'base'"):
        recommend_split(res, pretrained="base")
    rec = recommend_split(res, model="tiny")
    text = json.dumps(rec.to_json())
    back = SplitRecommendation.from_json(json.loads(text))
    assert back == rec
    d = rec.to_json()
    assert set(d["per_task"]["seg"]) >= {"k_t", "task_head_layers", "prior_layers", "b", "k_p", "divergence_start", "evidence"}
    assert d["model"] == "tiny" and d["num_layers"] == 8
    with pytest.raises(UserError, match="does not exist"):
        SplitRecommendation.load(tmp_path / "nope.json")


def _tiny_vit(depth: int, seed: int = 0):
    from timm.models.vision_transformer import VisionTransformer

    from vitsplit.backbones import Backbone

    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=0,
                            dynamic_img_size=True)
    return Backbone(vit, name=f"tiny{depth}", weights_source="random").eval()


def _planted_copy(bb, start: int, scale: float = 0.05, seed: int = 1):
    """Equal to ``bb`` below block ``start``; every parameter of blocks start.. moved by N(0, scale)."""
    out = copy.deepcopy(bb)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in out.vit.blocks[start:]:
            for p in blk.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return out


@pytest.mark.parametrize("L,starts", [(4, [1, 2, 3]), (6, [1, 3, 5]), (8, [2, 4, 6, 7])])
def test_planted_divergence_on_tiny_vits_gives_exact_k_t(L, starts):
    from cka_split.analysis import analyze

    pre = _tiny_vit(L)
    models = {"pretrained": pre} | {f"from{s}": _planted_copy(pre, s, seed=s) for s in starts}
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(3)]
    res = analyze(models, batches, unbiased=True)
    rec = recommend_split(res, tasks=[f"from{s}" for s in starts])
    for s in starts:
        tr = rec.per_task[f"from{s}"]
        assert (tr.divergence_start, tr.k_t) == (s, L - s), tr.evidence
        assert tr.task_head_layers == list(range(s, L))


def test_flat_but_high_curve_means_every_block_changed():
    L = 8
    res = FakeResult({("pretrained", "pretrained"): self_cka(L),
                      ("pretrained", "seg"): cross_with_diag(np.full(L, 0.6))}, list(range(L)))
    tr = recommend_split(res).per_task["seg"]
    assert tr.divergence_start == 0 and tr.k_t == L - 1


def test_meta_device_param_count_matches_published_totals():
    # the ViT-Split paper: S 10.23M, B 40.52M trainable parameters (150 classes, K_t 3, 2,5,8,11)
    from cka_split.recommend import vitsplit_param_counter

    s = vitsplit_param_counter("dinov2_vits14", {"seg": 150})
    assert round(s("seg", 3, [2, 5, 8, 11]) / 1e4) == 1023
    assert s("seg", 3, [2, 5, 8, 11]) - s("seg", 2, [2, 5, 8, 11]) == 1_775_232  # one DINOv2-S block
    b = vitsplit_param_counter("dinov2_vitb14", {"seg": 150})
    assert round(b("seg", 3, [2, 5, 8, 11]) / 1e4) == 4052
