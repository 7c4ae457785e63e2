"""The report's sweep section (reports/sweep.py): a sweep linked to an analysis run is found and shown
with the CKA pick, the RGN pick and the sweep's best, its table and decodable figures."""

import html as html_lib
import json
import re
from pathlib import Path

import pytest
from cka_split.reports import build_report
from cka_split.reports.sweep import find_sweeps
from test_report import L, decode_png, make_run, parse

from vitsplit.sweep.grid import summarize

MIOU = {1: [20.0, 21.0, 22.0], 3: [30.0, 31.0, 32.0], 5: [33.0, 34.0, 35.0], 8: [28.0, 29.0, 30.0]}


def write_sweep(out: Path, analysis: Path | None, *, pending=()) -> None:
    points = [
        {
            "name": f"kt{k:02d}-s{s}",
            "k_t": k,
            "prior_layers": [2, 5, 8, 11],
            "method": "vitsplit",
            "seed": s,
            "run": f"kt{k:02d}-s{s}",
            "metric": m,
            "trainable_params": 1_000_000 * k,
            "step_time_s": 0.1 + 0.01 * k,
            "peak_memory_mb": 500.0 + k,
        }
        for k, ms in MIOU.items()
        for s, m in enumerate(ms)
    ]
    points += [
        {
            "name": f"linear-s{s}",
            "k_t": None,
            "prior_layers": None,
            "method": "linear",
            "seed": s,
            "run": f"linear-s{s}",
            "metric": m,
            "trainable_params": 3000,
            "step_time_s": 0.05,
            "peak_memory_mb": 400.0,
        }
        for s, m in enumerate([12.0, 13.0, 14.0])
    ]
    out.mkdir(parents=True)
    d = {
        "task": "seg",
        "metric": "mIoU",
        "higher_is_better": True,
        "analysis": str(analysis) if analysis else None,
        "picks": {"cka": 3, "rgn": 5},
        "config": {},
        "points": points,
        "pending": list(pending),
        **summarize(points),
    }
    (out / "sweep.json").write_text(json.dumps(d))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-report")
    run = make_run(root, training=False)
    rec = json.loads((run / "recommendation.json").read_text())
    rec["per_task"]["seg"]["rgn"] = {
        "k_t": 5,
        "scores": [0.01] * 7 + [0.1] * 5,
        "se": [0.001] * L,
        "batches": 5,
        "batch_size": 8,
        "ratio": 10.0,
        "seconds": 1.5,
        "evidence": ["Relative gradient norms step up at block 7."],
    }
    (run / "recommendation.json").write_text(json.dumps(rec))
    write_sweep(run.parent / "sweep", run)  # linked: beside the run, naming it
    write_sweep(run.parent / "other", None, pending=["kt11-s0"])  # not linked
    path = build_report(run)
    return run, path.read_text(encoding="utf-8")


def test_linked_sweep_is_found_and_an_unlinked_one_only_when_given(built, tmp_path):
    run, _ = built
    assert [s.path.name for s in find_sweeps(run)] == ["sweep"]
    assert [s.path.name for s in find_sweeps(run, [run.parent / "other"])] == ["other", "sweep"]
    problems = []
    found = find_sweeps(run, [tmp_path], problems)  # a directory without sweep.json: named, left out
    assert [s.path.name for s in found] == ["sweep"] and any("no readable sweep.json" in p for p in problems)


def test_sweep_section_states_best_and_picks(built):
    _, html = built
    section = html.split('id="sweeps"', 1)[1]
    text = html_lib.unescape(re.sub(r"<[^>]+>", " ", section))
    # best = K_t 5 (mean 34); CKA picked 3 (mean 31: -3.00, pooled SD 1.00 -> 3.0 SD); RGN picked 5
    assert "The sweep's best K_t is 5: mIoU 34.00 +- 1.00 over 3 seed(s)" in text
    assert (
        "CKA picked K_t 3: mIoU 31.00, -3.00 against the best; the pooled seed SD is 1.00, so that is 3.0 SD." in text
    )
    assert "RGN picked K_t 5: mIoU 34.00, +0.00 against the best" in text
    assert "Baseline linear: mIoU 13.00 +- 1.00 (3 seed(s))" in text
    # the tie rule (vitsplit.sweep.grid.tie_tolerance): max(1 point, 2 x pooled SD 1.00) = 2.00; CKA is 3 below
    assert (
        "Only RGN's pick is within max(1 point, 2 pooled seed SD) = 2.00 of the best; CKA's is not: on this sweep "
        "RGN is the better selector."
    ) in text
    rows = re.findall(r"<tr><td>(\d+)</td>(.*?)</tr>", section, flags=re.S)
    assert [r[0] for r in rows] == ["1", "3", "5", "8"]
    marks = {k: re.findall(r"<td[^>]*>(.*?)</td>", cells, flags=re.S)[-1] for k, cells in rows}
    assert marks == {"1": "", "3": "CKA", "5": "best RGN", "8": ""}


def test_sweep_figures_decode_and_rgn_is_in_the_recommendation(built):
    _, html = built
    section = html.split('id="sweeps"', 1)[1].split('id="notes"', 1)[0]
    imgs = parse(section).imgs
    assert len(imgs) == 2
    for uri in imgs:
        assert decode_png(uri).size[0] > 300
    assert (
        "RGN picks 5" in html
        and "RGN rival (5 minibatches, 1.5 s): Relative gradient norms step up at block 7." in html
    )


def test_pick_verdict_says_to_start_with_rgn_when_it_ties_for_less():
    from types import SimpleNamespace

    from cka_split.reports.sweep import _pick_verdict

    groups = {3: {"mean": 33.5}, 5: {"mean": 34.0}, 8: {"mean": 30.0}}
    data = SimpleNamespace(
        recommendation={
            "per_task": {
                "seg": {"k_t": 3, "rgn": {"k_t": 5, "seconds": 2.0}},
                "det": {"k_t": 4, "rgn": {"k_t": 6, "seconds": 8.0}},
            }
        },
        config={"seconds": 110.0},
    )
    sw = SimpleNamespace(task="seg", data={"higher_is_better": True})
    text = _pick_verdict(data, sw, {"CKA": 3, "RGN": 5}, groups, 34.0, 0.2)[0]
    assert text.startswith(
        "Both picks are within max(1 point, 2 pooled seed SD) = 1.00 of the best, and RGN cost less: start with RGN"
    )
    assert text.endswith("RGN took 2.0 s; the copies' fine-tuning and CKA took 100 s.")  # 110 - (2 + 8) s of RGN
    assert _pick_verdict(data, sw, {"CKA": 3, "RGN": 8}, groups, 34.0, 0.2)[0].startswith("Only CKA's pick is within")
    assert _pick_verdict(data, sw, {"CKA": 8, "RGN": 8}, groups, 34.0, 0.2)[0].startswith("Neither pick is within")
    lower = SimpleNamespace(task="seg", data={"higher_is_better": False})  # an error metric: lower is better
    assert _pick_verdict(data, lower, {"CKA": 8, "RGN": 8}, groups, 30.0, 0.2)[0].startswith("Both picks are")
