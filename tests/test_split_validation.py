"""benchmarks/split_validation.py: its grid, its row arithmetic, and the --quick smoke run end to end."""

import importlib.util
import json
from pathlib import Path

import pytest
from cka_split.reports import build_report

from vitsplit.sweep.grid import summarize

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "split_validation.py"


def load():
    spec = importlib.util.spec_from_file_location("split_validation", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_grid_spans_the_blocks_and_includes_both_picks():
    sv = load()
    g = sv.k_t_grid(12, [4, 9])
    assert g[0] == 1 and g[-1] == 11 and {4, 9} <= set(g) and len(g) >= sv.MIN_K_T
    assert sv.k_t_grid(4, [2]) == [1, 2, 3]


def test_row_arithmetic_on_a_constructed_sweep():
    sv = load()
    means = {1: 20.0, 3: 30.0, 5: 34.0, 7: 33.5, 11: 25.0}  # seeds at mean - 1, mean, mean + 1: pooled SD 1
    points = [
        {
            "method": "vitsplit",
            "k_t": k,
            "prior_layers": [2, 5, 8, 11],
            "seed": s,
            "metric": m + d,
            "step_time_s": 0.1 * k,
        }
        for k, m in means.items()
        for s, d in enumerate((-1.0, 0.0, 1.0))
    ]
    sweep = {
        "task": "seg",
        "metric": "mIoU",
        "higher_is_better": True,
        "points": points,
        "config": {"train": {"iters": 10}},
        **summarize(points),
    }
    row = sv.validation_row(
        "s",
        "tuning",
        sweep,
        {"k_t": 3, "rgn": {"k_t": 7, "seconds": 2.0}},
        analyze_seconds=12.0,
        num_layers=12,
        sweep_seconds=99.0,
    )
    assert row["best_k_t"] == 5 and row["pooled_sd"] == pytest.approx(1.0)
    assert row["cka"] == {
        "k_t": 3,
        "mean": 30.0,
        "minus_best": -4.0,
        "in_sd": pytest.approx(-4.0),
        "within_target": False,
    }
    assert (
        row["rgn"]["minus_best"] == pytest.approx(-0.5) and row["rgn"]["within_target"] is True
    )  # within 2 SD = 2 points
    # one-seed full sweep: step time 0.1 * K_t s x 10 iterations, K_t 1..11 -> sum_k k = 66 s (linear between points)
    assert row["full_one_seed_sweep_seconds"] == pytest.approx(66.0)
    assert row["analysis_seconds"] == 10.0 and row["analysis_over_full"] == pytest.approx(10.0 / 66.0)
    assert row["rgn_over_full"] == pytest.approx(2.0 / 66.0)
    assert sv.pick_row(sweep, 4)["minus_best"] is None  # a pick the sweep did not train


@pytest.mark.slow
def test_quick_protocol_runs_end_to_end(tmp_path, capsys):
    sv = load()
    rows = sv.main(["--quick", "--out", str(tmp_path)])
    assert [r["role"] for r in rows] == ["tuning", "held-out"] and [r["task"] for r in rows] == ["seg", "depth"]
    for r in rows:
        assert {r["cka"]["k_t"], r["rgn"]["k_t"]} <= set(r["k_t_swept"]) and r["seeds"] == 2
        assert r["best_k_t"] in r["k_t_swept"] and r["rgn_seconds"] > 0 and r["full_one_seed_sweep_seconds"] > 0
    saved = json.loads((tmp_path / "split_validation.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["machine"]["cpus"] >= 1
    assert "CKA pick - best" in capsys.readouterr().out
    # the analysis run's report finds the sweep beside it (sweep.json names the analysis)
    analysis = tmp_path / rows[0]["setting"] / "analysis"
    html = build_report(analysis).read_text()
    assert 'id="sweeps"' in html and "The sweep&#39;s best K_t is" in html


def test_seed_blocked_anova_matches_a_least_squares_fit():
    """benchmarks/kt_effect.py block_anova (K_t x seed, seed as block) against the F test of nested
    least-squares fits: additive model (K_t + seed) vs seed only."""
    import sys

    import numpy as np
    from scipy.stats import f as f_dist

    sys.path.insert(0, str(SCRIPT.parent))
    from kt_effect import block_anova

    rng = np.random.default_rng(3)
    ks, seeds = [1, 3, 5, 7, 9, 11], [0, 1, 2]
    table = {k: {s: 30 + 0.4 * k + 4.0 * s + rng.normal(0, 0.6) for s in seeds} for k in ks}
    table[5][7] = 99.0  # a seed missing at the other K_t is left out
    got = block_anova(table)

    y = np.array([table[k][s] for k in ks for s in seeds])
    K = np.array([[float(k == kk) for kk in ks] for k in ks for _ in seeds])
    S = np.array([[float(s == ss) for ss in seeds[1:]] for _ in ks for s in seeds])
    rss = lambda X: float(((y - X @ np.linalg.lstsq(X, y, rcond=None)[0]) ** 2).sum())  # noqa: E731
    full, reduced = rss(np.hstack([K, S])), rss(np.hstack([np.ones((len(y), 1)), S]))
    df1, df2 = len(ks) - 1, (len(ks) - 1) * (len(seeds) - 1)
    F = ((reduced - full) / df1) / (full / df2)
    assert got["seeds"] == 3 and got["F"] == pytest.approx(F, rel=1e-9)
    assert got["p"] == pytest.approx(f_dist.sf(F, df1, df2), rel=1e-9) and got["p"] < 0.01
    assert got["residual_sd"] == pytest.approx(np.sqrt(full / df2), rel=1e-9)
    assert block_anova({1: {0: 1.0}, 2: {0: 2.0}})["p"] is None  # one seed: no test


@pytest.mark.slow
def test_only_runs_one_setting_under_its_name_and_role(tmp_path):
    """--only I runs setting I alone, keeps the name and role it has in the whole list, and writes its own json."""
    sv = load()
    rows = sv.main(["--quick", "--only", "1", "--out", str(tmp_path)])
    assert [(r["setting"][:2], r["role"], r["task"]) for r in rows] == [("1-", "held-out", "depth")]
    assert (tmp_path / "split_validation-1.json").is_file() and not (tmp_path / "split_validation.json").exists()
    assert not any(p.name.startswith("0-") for p in tmp_path.iterdir())  # setting 0 was not run
