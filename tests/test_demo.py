"""`cka-split demo --quick`: the whole pipeline, offline, end to end (slow; runs in CI)."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_demo_runs_the_whole_pipeline(tmp_path):
    env = dict(os.environ, CKA_SPLIT_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    out = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "cka_split.cli", "demo", "--quick", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary["results"]) == {"vitsplit", "linear", "full"}
    for method, res in summary["results"].items():
        # the summary reports each training run's own evaluation and parameter count
        ev = json.loads((out / "training" / method / "eval.json").read_text())
        present = [v for v in ev["IoU"] if v is not None]
        assert res["mIoU"] == ev["mIoU"] == pytest.approx(sum(present) / len(present)), method
        tcfg = json.loads((out / "training" / method / "config.json").read_text())
        assert res["trainable_params"] == tcfg["trainable_params"] > 0, method
    p = {m: r["trainable_params"] for m, r in summary["results"].items()}
    assert p["linear"] < min(p["vitsplit"], p["full"])
    rec = json.loads((out / "recommendation.json").read_text())
    # the trained ViT-Split has exactly the parameter count the recommendation predicted for its K_t
    assert p["vitsplit"] == rec["per_task"]["seg"]["trainable_params"]
    assert set(rec["per_task"]) == {"seg", "det"}
    vcfg = json.loads((out / "training" / "vitsplit" / "config.json").read_text())
    assert (
        vcfg["k_t"] == rec["per_task"]["seg"]["k_t"] and vcfg["prior_layers"] == rec["per_task"]["seg"]["prior_layers"]
    )
    assert summary["weights_source"].startswith("demo-vit pretrained by cka-split (recipe ")
    assert (out / "finetuned" / "seg.safetensors").is_file() and (out / "finetuned" / "det.safetensors").is_file()
    photos = json.loads((out / "pca" / "photos" / "index.json").read_text())
    assert photos["photo_names"] == ["astronaut", "chelsea", "coffee", "rocket", "motorcycle"]
    page = (out / "report.html").read_text()
    assert "demo-vit" in page and "astronaut" in page and "data:image/png;base64," in page
    assert "report:" in r.stdout and summary["verdict"].split(" (")[0] in " ".join(r.stdout.split())
    best = max(summary["results"], key=lambda m: summary["results"][m]["mIoU"])
    assert summary["verdict"].startswith("ViT-Split reached") == (best == "vitsplit")
    # the shipped demo-vit was used, hash-checked, and nothing was pretrained or cached
    from vitsplit.backbones.demo_vit import SHIPPED_SHA256, SHIPPED_WEIGHTS

    assert f"file {SHIPPED_WEIGHTS} sha256:{SHIPPED_SHA256}" in summary["weights_source"]
    assert "load demo-vit" in summary["timings_s"] and not list((tmp_path / "cache").glob("demo-vit-*"))
