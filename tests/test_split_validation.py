"""benchmarks/split_validation.py: its grid, its row arithmetic, and the --quick smoke run end to end."""

import importlib.util
import json
from pathlib import Path

import pytest

from cka_split.reports import build_report
from cka_split.sweep import summarize

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
    points = [{"method": "vitsplit", "k_t": k, "prior_layers": [2, 5, 8, 11], "seed": s, "metric": m + d,
               "step_time_s": 0.1 * k} for k, m in means.items() for s, d in enumerate((-1.0, 0.0, 1.0))]
    sweep = {"task": "seg", "metric": "mIoU", "higher_is_better": True, "points": points,
             "config": {"train": {"iters": 10}}, **summarize(points)}
    row = sv.validation_row("s", "tuning", sweep, {"k_t": 3, "rgn": {"k_t": 7, "seconds": 2.0}}, analyze_seconds=12.0,
                            num_layers=12, sweep_seconds=99.0)
    assert row["best_k_t"] == 5 and row["pooled_sd"] == pytest.approx(1.0)
    assert row["cka"] == {"k_t": 3, "mean": 30.0, "minus_best": -4.0, "in_sd": pytest.approx(-4.0), "within_target": False}
    assert row["rgn"]["minus_best"] == pytest.approx(-0.5) and row["rgn"]["within_target"] is True  # within 2 SD = 2 points
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
