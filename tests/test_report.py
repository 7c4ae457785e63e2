"""The HTML report (reports/): built from a fake-but-valid run directory (a real CKAResult file, a
recommendation.json in recommend's layout, PCA maps, linked training runs), it is one self-contained
file whose figures all decode, that says plainly when the weights are random, and that shows the
recommended numbers."""

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from cka_split.reports import build_report
from cka_split.reports.rundir import load_cka
from cka_split.reports.training import find_training_runs
from PIL import Image

from cka_split.estimator.result import CKAResult

L = 12
STARTS = {"seg": 9, "det": 7}  # planted divergence starts: K_t = L - s = 3 and 5


def planted_cka() -> CKAResult:
    """pretrained + seg + det copies, 12 blocks each. Same-block CKA(pretrained, t) is exactly 1 below
    the task's planted start and falls by 0.12 per block from it."""
    names = ["pretrained", "seg", "det"]
    base = np.exp(-np.abs(np.subtract.outer(np.arange(L), np.arange(L))) / 10.0)

    def c(name):
        if name == "pretrained":
            return np.ones(L)
        s = STARTS[name]
        return np.array([1.0 if l < s else 1.0 - 0.12 * (l - s + 1) for l in range(L)])

    full = np.zeros((3 * L, 3 * L))
    for a, na in enumerate(names):
        for b, nb in enumerate(names):
            blk = base * np.outer(c(na), c(nb)) if na != nb else base
            full[a * L : (a + 1) * L, b * L : (b + 1) * L] = blk
    full[L + 3, 2 * L + 3] = full[2 * L + 3, L + 3] = np.nan  # an undefined cell must not break the figure
    # per-minibatch HSIC terms whose sum is `full` (its diagonal is 1, so CKA(full) = full): the SE is known
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.02, (8, 3 * L, 3 * L))
    noise = noise + noise.transpose(0, 2, 1) - (noise + noise.transpose(0, 2, 1)).mean(0)
    terms = full[None] / 8 * (1 + noise)
    return CKAResult(
        models=names,
        layers={n: list(range(L)) for n in names},
        full=torch.from_numpy(full),
        num_images=64,
        features="tokens",
        unbiased=True,
        num_batches=8,
        batch_hsic=torch.from_numpy(terms),
    )


def recommendation() -> dict:
    prior = [2, 5, 8, 11]
    per = {}
    for t, s in STARTS.items():
        k = L - s
        per[t] = {
            "k_t": k,
            "task_head_layers": list(range(s, L)),
            "prior_layers": prior,
            "b": 2,
            "k_p": 4,
            "divergence_start": s,
            "k_t_from_cka": k,
            "divergence": [0.0 if l < s else 0.12 * (l - s + 1) for l in range(L)],
            "divergence_threshold": 0.05,
            "pretrained_groups": [[i, i + 1] for i in range(0, L, 2)],
            "trainable_params": {"seg": 10_234_567, "det": 14_500_001}[t],
            "divergence_kind": "step",
            "params_vs_full": {"seg": 0.4629, "det": 1.25}[t],
            "larger_than_full": t == "det",
            "backward_avoided": (L - k) / L,
            "step_time_ratio_estimate": (L + 3 * k) / (3 * L),
            "evidence": [
                f"The curve leaves the plateau at block {s} for {t} & stays <above>.",
                f"K_t = L - {s} = {k}.",
                "Prior layers by the uniform rule from block 2 to 11: [2, 5, 8, 11].",
            ],
        }
    return {
        "model": "dinov2_vits14",
        "num_layers": L,
        "pretrained": "pretrained",
        "tasks": list(STARTS),
        "settings": {"abs_tol": 0.005, "rel_tol": 0.1},
        "max_trainable_params": None,
        "per_task": per,
    }


def write_pca(pca: Path, models: list[str], layers: list[int], n_images: int = 2) -> None:
    pca.mkdir(parents=True)
    rng = np.random.default_rng(0)
    index = {
        "models": models,
        "layers": layers,
        "num_images": n_images,
        "grid_hw": [2, 2],
        "patch_size": 14,
        "grid_rows": models,
        "grid_cols": layers,
        "explained_variance": {},
        "images": [],
    }
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(pca / f"input_{i}.png")
        maps = {}
        for m in models:
            maps[m] = {}
            for l in layers:
                fn = f"{m}_L{l}_{i}.png"
                Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(pca / fn)
                maps[m][str(l)] = fn
        Image.fromarray(np.zeros((60, 90, 3), np.uint8)).save(pca / f"grid_{i}.png")
        index["images"].append({"input": f"input_{i}.png", "grid": f"grid_{i}.png", "maps": maps})
    (pca / "index.json").write_text(json.dumps(index))


def write_training_run(
    out: Path,
    method: str,
    miou: float,
    *,
    split_source: str | None = None,
    params: int = 1000,
    losses=(2.0, 1.5, 1.1, 0.9),
    iters: int = 40,
    peak_mb: float | None = None,
    model: str = "dinov2_vits14",
    head: str = "linear",
) -> None:
    """A training run as vitsplit.train writes it: config.json (TrainConfig fields + trainable_params),
    metrics.jsonl rows (iter, loss parts, lr, it_s, time), eval.json (metrics, iters, train_seconds)."""
    out.mkdir(parents=True)
    cfg = {
        "task": "seg",
        "method": method,
        "head": head,
        "model": model,
        "data": "synthetic",
        "iters": iters,
        "crop": 56,
        "batch_size": 4,
        "k_t": 3 if method == "vitsplit" else None,
        "auto_split": "runs/latest" if split_source else None,
        "split_source": split_source,
        "trainable_params": params,
        "weights_source": "random (seed 0)",
    }
    (out / "config.json").write_text(json.dumps(cfg))
    rows = [
        {"iter": 10 * (i + 1), "loss": v, "loss_ce": v, "lr": 1e-4, "it_s": r, "time": 2.5 * (i + 1)}
        for i, (v, r) in enumerate(zip(losses, (4.0, 3.9, 3.7, 3.5)))
    ]
    (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + '\n{"iter": 5')  # torn last line
    ev = {"mIoU": miou, "aAcc": 80.0, "iters": iters, "train_seconds": 12.0}
    if peak_mb is not None:
        ev["peak_memory_mb"] = peak_mb
    (out / "eval.json").write_text(json.dumps(ev))


def make_run(
    root: Path, *, weights_source: str = "random (seed 0)", model: str = "dinov2_vits14", training: bool = True
) -> Path:
    run = root / "runs" / "20260101-000000"
    run.mkdir(parents=True)
    planted_cka().save(run / "cka.npz")
    (run / "recommendation.json").write_text(json.dumps(recommendation()))
    cfg = {
        "command": "analyze",
        "options": {
            "model": model,
            "weights": "random" if weights_source.startswith("random") else "/w/dinov2.pth",
            "tasks": ["seg", "det"],
            "probe_images": 64,
            "batch_size": 32,
            "features": "tokens",
            "image_size": 56,
            "precision": "fp32",
            "seed": 7,
            "unbiased": True,
        },
        "resolved": {
            "device": "cpu",
            "probe_spec": "synthetic",
            "probe_images_used": 64,
            "data": {"seg": "synthetic", "det": "synthetic"},
            "num_classes": {"seg": 5, "det": 4},
        },
        "seed": 7,
        "versions": {"python": "3.11.2", "torch": "2.5.0", "cka-split": "0.1.0", "platform": "Linux-x"},
        "weights_source": weights_source,
        "models": {
            "pretrained": {
                "name": model,
                "weights_source": weights_source,
                "num_layers": L,
                "embed_dim": 384,
                "patch_size": 14,
                "state_sha256": "ab" * 32,
            },
            "seg": {"origin": "fine-tuned by analyze (method full)", "steps": 30, "data": "synthetic"},
            "det": {"origin": "fine-tuned by analyze (method full)", "steps": 30, "data": "synthetic"},
        },
        "started": "2026-01-01T00:00:00",
        "seconds": 83.4,
    }
    (run / "config.json").write_text(json.dumps(cfg))
    write_pca(run / "pca", ["pretrained", "seg", "det"], list(range(L)))
    if training:
        runs = run.parent
        # always shown: under RUN/training/
        write_training_run(run / "training" / "vitsplit", "vitsplit", 23.4, params=10_234_567, peak_mb=1536.0)
        # linked by split_source (the resolved recommendation file), and its baseline beside it
        write_training_run(
            runs / "train-auto",
            "vitsplit",
            21.0,
            split_source=f"recommendation {run / 'recommendation.json'}",
            params=10_234_567,
        )
        write_training_run(runs / "linear-seg", "linear", 19.85, params=5_000, losses=(2.2, 1.9, 1.7, 1.6))
        # not shown: a ViT-Split run from another analysis, a baseline with another setup
        other = runs / "20250101-000000"
        other.mkdir()
        write_training_run(
            runs / "train-other", "vitsplit", 98.0, split_source=f"recommendation {other / 'recommendation.json'}"
        )
        write_training_run(runs / "full-long", "full", 99.0, iters=400)
    return run


class _Refs(HTMLParser):
    """Every attribute that can load something (src, href, srcset, poster, data), and the <img> srcs."""

    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.imgs: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for k, v in attrs:
            if k in ("src", "href", "srcset", "poster", "data", "action", "xlink:href") and v is not None:
                self.refs.append((tag, k, v))
        if tag == "img":
            self.imgs.append(dict(attrs).get("src") or "")


def parse(html: str) -> _Refs:
    p = _Refs()
    p.feed(html)
    return p


def decode_png(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,"), uri[:60]
    raw = base64.b64decode(uri.split(",", 1)[1], validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    im = Image.open(io.BytesIO(raw))
    im.load()
    return im


def cell_row(html: str, task: str) -> list[str]:
    """The text of each cell of the recommendation table's row for ``task``."""
    table = html.split('<table class="rec">', 1)[1].split("</table>", 1)[0]
    for row in re.findall(r"<tr>(.*?)</tr>", table, flags=re.S):
        cells = [re.sub(r"<[^>]+>", " ", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)]
        if cells and cells[0] == task:
            return cells
    raise AssertionError(f"no row for {task}")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    run = make_run(root)
    path = build_report(run)
    return run, path, path.read_text(encoding="utf-8")


def test_report_is_self_contained(built):
    run, path, html = built
    assert path == run / "report.html"
    p = parse(html)
    assert "script" not in p.tags and "link" not in p.tags and "iframe" not in p.tags
    for tag, attr, value in p.refs:
        if attr == "href":
            assert value.startswith("#"), (tag, value)  # in-page anchors only
        else:
            assert value.startswith("data:image/png;base64,"), (tag, attr, value[:80])
    assert not re.search(r"https?://", html), "the page names a network address"
    assert "url(" not in html and "@import" not in html  # CSS loads nothing either


def test_every_figure_is_a_decodable_png(built):
    _, _, html = built
    imgs = parse(html).imgs
    # heatmaps: pretrained self, pretrained vs seg, pretrained vs det, seg vs det; curves: same-layer,
    # cross-task; PCA: 2 probe images; training: loss, final mIoU
    assert len(imgs) == 4 + 2 + 2 + 2, len(imgs)
    sizes = [decode_png(u).size for u in imgs]
    assert all(w > 200 and h > 100 for w, h in sizes), sizes
    # the figures differ (one figure repeated would pass the count)
    assert len(set(imgs)) == len(imgs)


def test_random_weights_banner_and_header(built):
    _, _, html = built
    head = html.split('<h2 id="run">', 1)[0]
    assert 'class="banner danger"' in head and "Random weights" in head and "random (seed 0)" in head
    for text in (
        "dinov2_vits14 (12 blocks, width 384, patch 14)",
        "ab" * 32,
        "unbiased HSIC",
        "32 images per minibatch",
        "64 at 56 px",
        "1 min 23 s",
        "torch 2.5.0",
        "tokens (patch tokens",
    ):
        assert text in html, text


def _facts_only(run: Path) -> Path:
    """Drop the parts that only make figures (faster; the banner depends on config.json alone)."""
    (run / "cka.npz").unlink()
    shutil.rmtree(run / "pca")
    return run


def test_pretrained_weights_have_no_banner_demo_has_one(tmp_path):
    run = _facts_only(make_run(tmp_path / "a", weights_source="/w/dinov2.pth (sha256 0123abcd)", training=False))
    html = build_report(run).read_text()
    assert 'class="banner' not in html and "/w/dinov2.pth (sha256 0123abcd)" in html
    run = _facts_only(
        make_run(tmp_path / "b", weights_source="demo cache /c/demo-vit.safetensors", model="demo-vit", training=False)
    )
    html = build_report(run).read_text()
    assert 'class="banner warn"' in html and "not a real foundation model" in html and "Random weights" not in html


def test_recommendation_numbers_and_evidence(built):
    _, _, html = built
    assert cell_row(html, "seg") == [
        "seg",
        "3",
        "9-11",
        "2",
        "4",
        "2, 5, 8, 11",
        "9 (step)",
        "10.23 M (10,234,567)",
        "0.46x",
        "75%",
        "0.58x",
    ]
    assert cell_row(html, "det") == [
        "det",
        "5",
        "7-11",
        "2",
        "4",
        "2, 5, 8, 11",
        "7 (step)",
        "14.50 M (14,500,001)",
        "1.25x (larger than full fine-tuning)",
        "58%",
        "0.75x",
    ]
    # same-block CKA +- SE table: the pretrained model's adjacent blocks, then each copy; values from the file
    table = html.split('id="se-table"', 1)[1].split("</table>", 1)[0]
    assert "pretrained vs seg" in table and "pretrained: block l-1 vs l" in table
    assert "1.0000 \u00b1 " in table and "0.6400 \u00b1 " in table  # seg block 11: 1 - 0.12 x 3
    assert "jackknife SE over 8 minibatches" in html
    # evidence sentences, HTML-escaped
    assert "The curve leaves the plateau at block 9 for seg &amp; stays &lt;above&gt;." in html
    assert "Copy the last 5 of 12 blocks (7-11) as the det task head" in html
    # the sentence both tasks share is said once, under "every task"
    assert html.count("Prior layers by the uniform rule from block 2 to 11: [2, 5, 8, 11].") == 1
    assert html.index("Why, for every task") < html.index("Prior layers by the uniform rule")


def test_training_runs_linked_and_tabled(built):
    run, _, html = built
    section = html.split('<h2 id="training">', 1)[1]
    assert section.count("<tr title=") == 3
    assert "vitsplit K_t=3 (seg) [vitsplit]" in section and "vitsplit K_t=3 (seg) [train-auto]" in section
    assert "linear (seg)" in section
    assert "98.00" not in section and "99.00" not in section and "full (seg)" not in section
    assert "mIoU 23.40" in section and "mIoU 21.00" in section and "mIoU 19.85" in section
    assert "the best final mIoU is 23.40, from vitsplit K_t=3 (seg) [vitsplit]" in section
    assert "10.23 M (10,234,567)" in section and "5,000" in section
    assert "270 ms" in section  # median of 1 / it_s over the logged windows (0.25, 0.256, 0.270, 0.286 s)
    assert "1,536 MB" in section and section.count(">-</td>") == 2  # peak memory only where recorded


def test_find_training_runs_keys(tmp_path):
    run = make_run(tmp_path)
    runs = find_training_runs(run)
    assert sorted((r.method, r.path.name) for r in runs) == [
        ("linear", "linear-seg"),
        ("vitsplit", "train-auto"),
        ("vitsplit", "vitsplit"),
    ]
    lin = next(r for r in runs if r.method == "linear")
    assert lin.step_time == pytest.approx(1 / 3.7)
    assert lin.peak_memory_mb is None and lin.final_metric == ("mIoU", 19.85, True)
    assert lin.curves()["loss"] == ([10.0, 20.0, 30.0, 40.0], [2.2, 1.9, 1.7, 1.6])  # torn line skipped
    assert "it_s" not in lin.curves() and "lr" not in lin.curves()
    # an explicit list adds a run from anywhere, once
    runs = find_training_runs(run, [run.parent / "full-long", run.parent / "full-long"])
    assert sorted(r.path.name for r in runs) == ["full-long", "linear-seg", "train-auto", "vitsplit"]
    # no metrics rows: eval.json's train_seconds / iters
    lin.metrics = []
    assert lin.step_time == pytest.approx(12.0 / 40)


def test_vit_adapter_baseline_on_its_own_backbone_is_found_and_labelled(tmp_path):
    """A ViT-Adapter run beside the linked run counts as its baseline on another backbone (the
    paper's comparison); a full fine-tuning run on another backbone does not."""
    run = make_run(tmp_path)
    write_training_run(run.parent / "adapter", "vit-adapter", 20.5, model="deit_small_patch16_224", head="upernet")
    write_training_run(run.parent / "full-deit", "full", 20.0, model="deit_small_patch16_224", head="upernet")
    write_training_run(run.parent / "full-upernet", "full", 22.0, head="upernet")
    labels = {r.path.name: r.label for r in find_training_runs(run)}
    assert labels["adapter"] == "vit-adapter + upernet on deit_small_patch16_224 (seg)"
    assert labels["full-upernet"] == "full + upernet (seg)" and "full-deit" not in labels
    assert labels["linear-seg"] == "linear (seg)"


def test_report_reads_cka_npz_through_cka_result(tmp_path):
    res = planted_cka()
    res.save(tmp_path / "cka.npz")
    view = load_cka(tmp_path / "cka.npz")
    assert view.models == res.models and view.layers == res.layers and view.num_images == 64
    for a in res.models:
        for b in res.models:
            np.testing.assert_array_equal(view.matrix(a, b), res.matrix(a, b).numpy())
    assert view.matrix("pretrained", "seg")[10, 10] == pytest.approx(1 - 0.12 * 2)


def test_partial_run_still_reports(tmp_path):
    """Only a recommendation and a corrupt cka.npz: the page says what is missing, shows the table and
    the recommendation's own divergence curves."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "recommendation.json").write_text(json.dumps(recommendation()))
    (run / "cka.npz").write_bytes(b"not a zip")
    html = build_report(run).read_text()
    assert cell_row(html, "seg")[:3] == ["seg", "3", "9-11"]
    assert "cka.npz could not be read" in html and 'id="heatmaps"' not in html
    assert "config.json is missing" in html
    assert len(parse(html).imgs) == 1  # the same-layer curves from recommendation.json's divergence


def test_a_part_that_cannot_be_drawn_is_named_and_the_rest_stays(tmp_path):
    run = make_run(tmp_path, training=False)
    idx = json.loads((run / "pca" / "index.json").read_text())
    idx["grid_cols"] = ["first", "second"]  # not block numbers
    (run / "pca" / "index.json").write_text(json.dumps(idx))
    html = build_report(run).read_text()
    assert "The PCA maps could not be drawn (ValueError" in html and 'id="pca"' not in html
    assert len(parse(html).imgs) == 4 + 2 and cell_row(html, "seg")[1] == "3"


def test_cli_report(tmp_path, capsys):
    from cka_split.cli.app import main

    run = make_run(tmp_path, training=False)
    with pytest.raises(SystemExit) as e:
        main(["report", str(run)])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert (run / "report.html").is_file() and f"report: {run / 'report.html'}" in out
    assert "K_t" in out and "9-11" in out  # the recommendation table, printed with rich
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "missing")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cka-split: error:") and "is not a run directory" in err and "\n" not in err
