"""The gradient-norm rival (cka_split.probes.rgn): the K_t rule on constructed profiles, the measurement on a
constructed ViT whose early blocks get no gradient, and its place in recommendation.json."""

import json

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from cka_split.decision.recommend import SplitRecommendation
from cka_split.probes.rgn import check_rgn_options, measure_rgn, rgn_k_t, rgn_recommendation
from vitsplit.backbones import Backbone
from vitsplit.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("L", [12, 24])
def test_a_step_profile_gives_k_t_l_minus_s(L):
    rng = np.random.default_rng(L)
    for s in range(2, L - 1):  # both segments of at least 2 blocks: see the next test for one block
        zero_below = np.r_[np.zeros(s), rng.uniform(0.5, 2.0, L - s) * 1e-3]  # only blocks >= s get gradient
        plateau = np.r_[rng.uniform(0.8, 1.25, s), 10 * rng.uniform(0.8, 1.25, L - s)] * 1e-4  # a noisy plateau
        for profile in (zero_below, plateau):
            c = rgn_k_t(profile)
            assert (c.k_t, c.kind, c.start) == (L - s, "step", s), (L, s)
            assert c.p_value <= 0.05
        assert rgn_k_t(plateau).ratio == pytest.approx(10, rel=0.35)


def test_what_the_permutation_test_cannot_tell_falls_back_to_the_published_k_t():
    one_block = rgn_k_t(np.r_[np.ones(11), 10.0])  # one block at an end: p ~ 2/12
    assert (one_block.kind, one_block.k_t) == ("flat", 3) and one_block.p_value > 0.1
    assert "one block standing out at an end cannot reach p < 0.17" in one_block.evidence[0]
    assert rgn_k_t(np.r_[np.ones(10), 10.0, 10.0]).k_t == 2  # two blocks can
    assert rgn_k_t([1e-4, 1e-4, 1.0, 1.0]).kind == "flat"  # 4 blocks: no step reaches the level


def test_false_positive_rate_on_profiles_without_a_step():
    rng = np.random.default_rng(1)
    kinds = [rgn_k_t(np.exp(rng.normal(0.0, 0.1, 12))).kind for _ in range(200)]
    # ALPHA = 0.05: 10 of 200 expected; the chosen boundary alone (no test) would call all 200 a step
    assert kinds.count("flat") >= 180


def test_one_dominant_last_block_does_not_pull_the_boundary_onto_itself():
    # blocks 8-10 get 10x the gradient of 0-7 and the last block 30x: the step is at block 8 (K_t 4).
    r = np.r_[np.ones(8), 10 * np.ones(3), 30.0]
    assert rgn_k_t(r).k_t == 4
    # the same least-squares step on the raw scale would isolate the last block (K_t 1): why the log
    sse = [((r[:s] - r[:s].mean()) ** 2).sum() + ((r[s:] - r[s:].mean()) ** 2).sum() for s in range(1, 12)]
    assert 12 - (1 + int(np.argmin(sse))) == 1


def test_early_blocks_dominant_gives_every_block_but_the_first():
    c = rgn_k_t(np.linspace(5.0, 1.0, 12))
    assert (c.k_t, c.kind) == (11, "early") and c.ratio < 1 and "early blocks" in c.evidence[0]


def test_bad_input_is_a_user_error():
    for bad in ([1.0], [0.0, 0.0], [1.0, np.nan], [-1.0, 1.0]):
        with pytest.raises(UserError):
            rgn_k_t(bad)
    with pytest.raises(UserError, match="--selector"):
        check_rgn_options("grad", 5)
    with pytest.raises(UserError, match="--rgn-batches"):
        check_rgn_options("rgn", 0)


class Cut(nn.Module):
    """A block whose input is detached: the blocks before it get no gradient from the loss."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x.detach())


def cut_backbone(s: int, depth: int = 12) -> Backbone:
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=0, dynamic_img_size=True
    )
    vit.blocks[s] = Cut(vit.blocks[s])
    return Backbone(vit, name="tiny", weights_source="random (seed 0)").eval()


@pytest.mark.parametrize("s", [4, 9])
def test_measured_rgn_on_a_vit_whose_early_blocks_get_no_gradient(s):
    bb = cut_backbone(s)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    entry = measure_rgn(bb, "seg", "synthetic:size=32,classes=3", batches=3, batch_size=2, crop=32, seed=0)
    assert (entry["k_t"], entry["kind"], entry["start"]) == (12 - s, "step", s)
    assert entry["scores"][:s] == [0.0] * s and min(entry["scores"][s:]) > 0
    assert len(entry["se"]) == 12 and entry["batches"] == 3 and entry["seconds"] > 0
    assert all(torch.equal(v, bb.state_dict()[k]) for k, v in before.items())  # nothing updated, input untouched
    json.dumps(entry)  # recommendation.json holds it as is


def test_rgn_recommendation_round_trips_through_recommendation_json():
    entry = {
        "k_t": 4,
        "scores": [0.1] * 8 + [1.0] * 4,
        "se": [0.0] * 12,
        "batches": 5,
        "batch_size": 8,
        "ratio": 10.0,
        "evidence": ["step"],
        "seconds": 1.0,
    }
    rec = rgn_recommendation({"seg": entry}, model="dinov2_vits14", num_layers=12, param_count=lambda t, k, p: 1000 * k)
    s = rec.per_task["seg"]
    assert (s.k_t, s.task_head_layers, s.prior_layers, s.trainable_params) == (4, [8, 9, 10, 11], [2, 5, 8, 11], 4000)
    back = SplitRecommendation.from_json(json.loads(json.dumps(rec.to_json())))
    assert back.per_task["seg"].rgn == entry


@pytest.mark.slow
def test_analyze_selector_rgn_makes_no_copies_and_recommend_keeps_the_rgn_entry(tmp_path, capsys):
    from cka_split.cli.app import main

    from cka_split.pipelines.analyze import recommend_run

    run = tmp_path / "runs" / "rgn"
    with pytest.raises(SystemExit) as e:
        main(
            [
                "analyze",
                "--model",
                "demo-vit",
                "--weights",
                "random",
                "--tasks",
                "seg",
                "--selector",
                "rgn",
                "--rgn-batches",
                "2",
                "--data",
                "synthetic:size=28,classes=2",
                "--image-size",
                "28",
                "--probe-images",
                "8",
                "--batch-size",
                "4",
                "--pca-images",
                "0",
                "--device",
                "cpu",
                "--out",
                str(run),
            ]
        )
    assert e.value.code == 0, capsys.readouterr().err
    rec = json.loads((run / "recommendation.json").read_text())
    seg = rec["per_task"]["seg"]
    assert rec["settings"]["selector"] == "rgn" and seg["k_t"] == seg["rgn"]["k_t"] and len(seg["rgn"]["scores"]) == 12
    assert seg["prior_layers"] == [2, 5, 8, 11] and seg["trainable_params"] > 0
    assert not (run / "finetuned").exists()  # no task copies
    assert json.loads((run / "rgn.json").read_text())["seg"] == seg["rgn"]
    assert (run / "report.html").is_file() and "RGN" in (run / "report.html").read_text()
    _, again = recommend_run(run)  # `cka-split recommend RUN` recomputes it from rgn.json
    assert again.to_json() == rec
