"""Hostile inputs: what a careless user, a shared run directory or an attacker hands the CLI.

Every case ends in one line on stderr naming the problem and exit code 2 (or, where a partial result
is legitimate, a warning line and exit 0), before any expensive work (no ViT built, no dataset opened:
the ``tripwire`` fixture fails the test otherwise) and without half-written files. Nothing in a file
the tool reads can run code: the pickled payloads below write a marker file if they ever run.

Commands run in-process through the CLI's ``main(argv)``; subprocesses only where the case needs a
second process (Ctrl-C, two jobs on one directory).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cka_split.cli.app import main
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLI_MODULE = "cka_split.cli"


# ----------------------------------------------------------------------------------------- helpers
class Tripwire(BaseException):
    """Raised when expensive work starts; a BaseException so that no ``except Exception`` hides it."""


@pytest.fixture
def tripwire(monkeypatch):
    """Fail the test if a ViT is built or a synthetic dataset is opened."""
    from timm.models.vision_transformer import VisionTransformer

    from vitsplit.data.synthetic import SyntheticScenes

    def trip(*args, **kwargs):
        raise Tripwire("expensive work started before the input was checked")

    monkeypatch.setattr(VisionTransformer, "__init__", trip)
    monkeypatch.setattr(SyntheticScenes, "__init__", trip)


pytestmark = pytest.mark.usefixtures("one_thread")


def cli(capsys, *args) -> tuple[int, str]:
    """(exit code, stderr) of ``cka-split ARGS`` run in-process."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


def error_line(err: str) -> str:
    """The one stderr line of a user error (the progress display may have drawn bars above it)."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("cka-split: error: "), err
    assert sum(ln.startswith("cka-split: ") for ln in lines) == 1, err
    return lines[-1]


def refused(capsys, pattern: str, *args) -> str:
    """Run ``args``; assert exit 2 and exactly one stderr line, matching ``pattern``; return it."""
    code, err = cli(capsys, *args)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    line = error_line(err)
    assert re_search(pattern, line), line
    return line


def re_search(pattern: str, text: str) -> bool:
    return re.search(pattern, text) is not None


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A 4-block, width-32 DINOv2-architecture ViT (``hf:DIR`` with ``--weights random``): builds in ms."""
    d = tmp_path_factory.mktemp("hfvit")
    (d / "config.json").write_text(
        json.dumps(
            {
                "model_type": "dinov2",
                "hidden_size": 32,
                "num_hidden_layers": 4,
                "num_attention_heads": 2,
                "image_size": 28,
                "patch_size": 14,
            }
        )
    )
    return d


DATA = "synthetic:size=28,classes=2"


def train_args(hf_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        f"hf:{hf_dir}",
        "--weights",
        "random",
        "--method",
        "linear",
        "--data",
        DATA,
        "--crop",
        "28",
        "--iters",
        "2",
        "--batch-size",
        "2",
        "--train-length",
        "4",
        "--val-length",
        "2",
        "--device",
        "cpu",
        "--log-every",
        "1",
        "--checkpoint-every",
        "1",
        "--out",
        str(out),
        *extra,
    ]


def analyze_args(hf_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "analyze",
        "--model",
        f"hf:{hf_dir}",
        "--weights",
        "random",
        "--tasks",
        "seg",
        "--data",
        DATA,
        "--finetune-steps",
        "1",
        "--probe-images",
        "4",
        "--batch-size",
        "4",
        "--image-size",
        "28",
        "--pca-images",
        "0",
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(hf_dir, tmp_path_factory) -> Path:
    """One finished 2-step linear-probe run (3 seg classes) to evaluate and to resume."""
    out = tmp_path_factory.mktemp("trained") / "run"
    with pytest.raises(SystemExit) as e:
        main(train_args(hf_dir, out))
    assert e.value.code == 0
    return out


def unwritable(tmp_path: Path) -> Path:
    """A directory in which this process cannot create anything (root ignores permission bits, so as
    root a folder under /sys, where mkdir is refused to everyone)."""
    if os.geteuid() == 0:
        return Path("/sys/cka-split-hostile-test")
    d = tmp_path / "readonly"
    d.mkdir()
    d.chmod(0o500)
    return d / "out"


def bad_outs(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "afile").write_text("not a folder")
    return {
        "existing file": tmp_path / "afile",
        "under a file": tmp_path / "afile" / "out",
        "unwritable": unwritable(tmp_path),
    }


OUT_CASES = ["existing file", "under a file", "unwritable"]
OUT_MESSAGE = r"--out .*(is a file|not a folder|cannot|not writable|Permission|permitted|No such)"


# -------------------------------------------------------------------------------------- security
class Payload:
    """Unpickling this calls ``open(marker, 'w')``: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "raw pickle"])
def test_resume_never_runs_code_from_last_pt(writer, tmp_path, capsys, hf_dir, tripwire):
    """A run directory from someone else: ``train --resume`` must not execute its last.pt."""
    out, marker = tmp_path / "shared-run", tmp_path / "PAYLOAD-RAN"
    out.mkdir()
    evil = {"format": "cka-split-resume-1", "step": 1, "model": {}, "config": {}, "rng": Payload(marker)}
    if writer == "torch.save":
        torch.save(evil, out / "last.pt")
    else:
        with open(out / "last.pt", "wb") as f:
            pickle.dump(evil, f)
    line = refused(capsys, r"last\.pt", *train_args(hf_dir, out, "--resume"))
    assert not marker.exists(), "the pickled payload in last.pt ran"
    assert "refused to load" in line or "cannot read" in line


def test_weights_file_payload_never_runs(tmp_path, capsys, hf_dir):
    marker = tmp_path / "PAYLOAD-RAN"
    torch.save({"state_dict": Payload(marker)}, tmp_path / "evil.pth")
    refused(
        capsys,
        r"refused to load .*evil\.pth.*could run code",
        *train_args(hf_dir, tmp_path / "o", "--weights", str(tmp_path / "evil.pth")),
    )
    assert not marker.exists()
    assert not (tmp_path / "o" / "config.json").exists()


def test_raw_pickle_weights_give_one_line_without_torch_warning(tmp_path, capsys, hf_dir):
    with open(tmp_path / "raw.pth", "wb") as f:
        pickle.dump({"pos_embed": torch.zeros(1)}, f)  # not torch.save's format
    line = refused(capsys, r"raw\.pth", *train_args(hf_dir, tmp_path / "o", "--weights", str(tmp_path / "raw.pth")))
    assert "UserWarning" not in line


def test_resume_reads_a_checkpoint_with_numpy_rng_state(trained):
    """The allow-list is exactly wide enough for what save_checkpoint writes (numpy's RNG state array)."""
    from vitsplit.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(trained / "last.pt")
    assert ckpt["step"] == 2 and isinstance(ckpt["rng"]["numpy"][1], np.ndarray)
    assert ckpt["rng"]["numpy"][1].dtype == np.uint32 and len(ckpt["rng"]["numpy"][1]) == 624


# ------------------------------------------------------------------------ numbers checked at parse time
def _train_case(option: str, value: str):
    return pytest.param(["train", option, value], option, id=f"train {option} {value}")


NUMERIC_CASES = [
    _train_case("--lr", "-1"),
    _train_case("--lr", "0"),
    _train_case("--lr", "inf"),
    _train_case("--lr", "nan"),
    _train_case("--weight-decay", "-1"),
    _train_case("--weight-decay", "nan"),
    _train_case("--num-workers", "-1"),
    _train_case("--warmup-iters", "-5"),
    _train_case("--iters", "0"),
    _train_case("--batch-size", "0"),
    _train_case("--crop", "0"),
    _train_case("--checkpoint-every", "0"),
    _train_case("--train-length", "0"),
    _train_case("--lora-rank", "0"),
    pytest.param(
        ["recommend", "RUN", "--max-trainable-params", "nan"], "--max-trainable-params", id="recommend budget nan"
    ),
    pytest.param(
        ["recommend", "RUN", "--max-trainable-params", "-3"], "--max-trainable-params", id="recommend budget -3"
    ),
    pytest.param(["analyze", "--max-trainable-params", "inf"], "--max-trainable-params", id="analyze budget inf"),
    pytest.param(["analyze", "--probe-images", "0"], "--probe-images", id="analyze probe 0"),
    pytest.param(["analyze", "--image-size", "-28"], "--image-size", id="analyze image size -28"),
    pytest.param(["analyze", "--rgn-batches", "0"], "--rgn-batches", id="analyze rgn batches 0"),
    pytest.param(["analyze", "--finetune-patience", "0"], "--finetune-patience", id="analyze patience 0"),
    pytest.param(["sweep", "--seeds", "0"], "--seeds", id="sweep seeds 0"),
    pytest.param(["sweep", "--lr", "nan"], "--lr", id="sweep lr nan"),
    pytest.param(["compare", "--models", "a", "b", "--batch-size", "0"], "--batch-size", id="compare batch 0"),
    pytest.param(["compare", "--models", "a", "b", "--seed", "-1"], "--seed", id="compare seed -1"),
    pytest.param(["evaluate", "RUN", "--mode", "slide", "--stride", "-5"], "--stride", id="evaluate stride -5"),
    pytest.param(["evaluate", "RUN", "--mode", "slide", "--stride", "0"], "--stride", id="evaluate stride 0"),
]


@pytest.mark.parametrize("args,option", NUMERIC_CASES)
def test_numeric_options_are_checked_at_parse_time(args, option, tmp_path, capsys, tripwire):
    args = [str(tmp_path / "run") if a == "RUN" else a for a in args]
    line = refused(
        capsys, option, *args, *(["--out", str(tmp_path / "o")] if args[0] not in ("evaluate", "recommend") else [])
    )
    assert "Invalid value" in line or "must be" in line
    assert not (tmp_path / "o").exists()  # no config.json left behind


@pytest.mark.parametrize("layers,problem", [("2,2,5,8", "twice"), ("2,,5", "empty"), ("-1,3", "")])
def test_prior_layers_duplicate_or_empty_are_refused(layers, problem, tmp_path, capsys, hf_dir, tripwire):
    refused(
        capsys,
        rf"--prior-layers.*{problem}",
        *train_args(hf_dir, tmp_path / "o", "--method", "vitsplit", "--k-t", "1", "--prior-layers", layers),
    )
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------- output folders
@pytest.mark.parametrize("case", OUT_CASES)
def test_train_out_that_cannot_be_written_is_refused_first(case, tmp_path, capsys, hf_dir, tripwire):
    out = bad_outs(tmp_path)[case]
    refused(capsys, OUT_MESSAGE, *train_args(hf_dir, out))


@pytest.mark.parametrize("case", OUT_CASES)
def test_analyze_out_that_cannot_be_written_is_refused_first(case, tmp_path, capsys, hf_dir, tripwire):
    out = bad_outs(tmp_path)[case]
    refused(capsys, OUT_MESSAGE, *analyze_args(hf_dir, out))


@pytest.mark.parametrize("case", ["existing folder", "under a file", "unwritable"])
def test_evaluate_out_that_cannot_be_written_is_refused_first(case, tmp_path, capsys, trained, tripwire):
    """``evaluate --out FILE`` (an existing file is simply replaced, as asked)."""
    out = {**bad_outs(tmp_path), "existing folder": tmp_path}[case]
    refused(
        capsys,
        r"--out .*(folder|directory|cannot|not writable|permitted|Permission|No such)",
        "evaluate",
        trained,
        "--device",
        "cpu",
        "--out",
        out,
    )


@pytest.mark.parametrize("case", OUT_CASES)
def test_demo_out_that_cannot_be_written_is_refused_first(case, tmp_path, capsys, tripwire, monkeypatch):
    monkeypatch.setenv("CKA_SPLIT_CACHE", str(tmp_path / "cache"))
    refused(capsys, OUT_MESSAGE, "demo", "--quick", "--out", bad_outs(tmp_path)[case])


@pytest.mark.parametrize("case", ["existing file", "unwritable"])
def test_demo_cache_that_cannot_be_written_is_refused_before_pretraining(case, tmp_path, capsys, tripwire, monkeypatch):
    """A checkout without the shipped demo-vit pretrains it into the cache: an unusable cache is refused
    first. (With the shipped weights the demo never writes to the cache.)"""
    import cka_split.pipelines.demo

    monkeypatch.setattr(cka_split.pipelines.demo, "find_demo_vit", lambda: None)
    monkeypatch.setenv("CKA_SPLIT_CACHE", str(bad_outs(tmp_path)[case]))
    refused(capsys, r"cache", "demo", "--quick", "--out", tmp_path / "demo")
    assert not (tmp_path / "demo").exists()


# --------------------------------------------------------------------------------- weights files
def test_symlink_loop_as_weights(tmp_path, capsys, hf_dir, tripwire):
    loop = tmp_path / "loop.pth"
    os.symlink(loop, loop)
    refused(capsys, r"loop\.pth", *train_args(hf_dir, tmp_path / "o", "--weights", str(loop)))
    refused(capsys, r"loop\.pth", *analyze_args(hf_dir, tmp_path / "a", "--weights", str(loop)))


def test_integer_tensor_weights_are_refused(tmp_path, capsys, hf_dir):
    from safetensors.torch import save_file

    from vitsplit.backbones import build_backbone

    state = {
        k: (v * 100).to(torch.int32)
        for k, v in build_backbone(f"hf:{hf_dir}", "random", seed=0).vit.state_dict().items()
    }
    save_file(state, str(tmp_path / "int.safetensors"))
    refused(
        capsys,
        r"int\.safetensors.*(int32|integer)",
        *train_args(hf_dir, tmp_path / "o", "--weights", str(tmp_path / "int.safetensors")),
    )
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- images, data
def _png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height RGB pixels (the pixel data is a few bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("reader", ["read_image", "read_label"])
def test_decompression_bomb_is_refused_naming_the_file(reader, tmp_path):
    from vitsplit.data import readers
    from vitsplit.errors import UserError

    _png_header(tmp_path / "huge.png", 30000, 30000)
    with pytest.raises(UserError, match=r"huge\.png.*900,000,000 pixels"):
        getattr(readers, reader)(tmp_path / "huge.png")


def test_decompression_bomb_in_a_dataset_stops_training_with_one_line(tmp_path, capsys, hf_dir):
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(2):
            (data / "images" / split).mkdir(parents=True, exist_ok=True)
            (data / "masks" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(
                data / "images" / split / f"{i}.png"
            )
            Image.fromarray(np.full((28, 28), i, np.uint8)).save(data / "masks" / split / f"{i}.png")
    _png_header(data / "images" / "train" / "1.png", 30000, 30000)
    args = train_args(hf_dir, tmp_path / "o")
    args[args.index(DATA)] = f"folder:{data}"
    code, err = cli(capsys, *args)
    assert code == 2 and re_search(r"1\.png.*900,000,000 pixels", error_line(err))
    assert not (tmp_path / "o" / "config.json").exists()  # a run that never checkpointed leaves nothing


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    from vitsplit.data.readers import read_image

    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    rgb = read_image(tmp_path / "deep.png")
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb[..., 0].astype(float) - ramp / 257.0).max() <= 0.5  # rounded v / 257, not min(v, 255)
    assert (rgb == 255).mean() < 0.01  # PIL's convert("RGB") clips 99.6 % of this ramp to white


@pytest.mark.parametrize(
    "mode,array",
    [
        ("I", np.arange(16, dtype=np.int32).reshape(4, 4) * 1000),
        ("F", np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)),
    ],
)
def test_images_without_a_defined_range_are_refused(mode, array, tmp_path):
    from vitsplit.data.readers import read_image
    from vitsplit.errors import UserError

    Image.fromarray(array).save(tmp_path / "x.tif")
    with pytest.raises(UserError, match=rf"x\.tif .*mode {mode}"):
        read_image(tmp_path / "x.tif")


def _coco(tmp_path: Path, breakage: str) -> str:
    img = tmp_path / "imgs"
    img.mkdir()
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(img / "a.png")
    ann = {
        "id": 1,
        "image_id": 1,
        "category_id": 1,
        "iscrowd": 0,
        "area": 16.0,
        "bbox": [2, 2, 4, 4],
        "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]],
    }
    image = {"id": 1, "file_name": "a.png", "height": 28, "width": 28}
    if breakage == "annotation without bbox":
        del ann["bbox"]
    elif breakage == "image without id":
        del image["id"]
    elif breakage == "bbox with nan":
        ann["bbox"] = [2, 2, float("nan"), 4]
    (tmp_path / "ann.json").write_text(
        json.dumps({"images": [image], "annotations": [ann], "categories": [{"id": 1, "name": "thing"}]})
    )
    return f"coco:{tmp_path / 'ann.json'}:{img}"


@pytest.mark.parametrize(
    "breakage,pattern",
    [
        ("annotation without bbox", r"annotation 1 in .*ann\.json has no 'bbox'"),
        ("image without id", r"image #0 in .*ann\.json lacks an integer 'id'"),
        ("bbox with nan", r"annotation 1 in .*ann\.json has no 'bbox'"),
    ],
)
def test_coco_files_missing_fields_are_refused(breakage, pattern, tmp_path, capsys, hf_dir):
    args = train_args(hf_dir, tmp_path / "o", "--task", "det")
    args[args.index(DATA)] = _coco(tmp_path, breakage)
    refused(capsys, pattern, *args)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- evaluate
def test_evaluate_broken_metadata_json(tmp_path, capsys, trained):
    from safetensors.torch import load_file, save_file

    from vitsplit.fileio import read_safetensors

    meta, _ = read_safetensors(trained / "model.safetensors")
    meta["train_config"] = meta["train_config"][:-5]  # cut short
    save_file(load_file(str(trained / "model.safetensors")), str(tmp_path / "model.safetensors"), metadata=meta)
    refused(
        capsys,
        r"model\.safetensors.*(metadata|train_config)",
        "evaluate",
        tmp_path / "model.safetensors",
        "--device",
        "cpu",
    )


def test_evaluate_class_count_mismatch(capsys, trained):
    # the model predicts 3 classes (synthetic classes=2 + background); this data has 6
    refused(capsys, r"3 classes.*6", "evaluate", trained, "--data", "synthetic:size=28,classes=5", "--device", "cpu")


def test_evaluate_stride_zero_is_not_the_default(capsys, trained):
    line = refused(capsys, "--stride", "evaluate", trained, "--mode", "slide", "--stride", "0", "--device", "cpu")
    assert "0" in line


# ----------------------------------------------------------------------------------------- training
def test_nan_loss_stops_training_naming_step_and_checkpoint(tmp_path, capsys, hf_dir):
    """lr 1e6 (finite, so parse-time checks pass) makes step 2's loss NaN for ViT-Split on this model."""
    out = tmp_path / "o"
    code, err = cli(
        capsys,
        *train_args(
            hf_dir,
            out,
            "--lr",
            "1e6",
            "--warmup-iters",
            "0",
            "--iters",
            "4",
            "--method",
            "vitsplit",
            "--k-t",
            "1",
            "--prior-layers",
            "0,1,2",
        ),
    )
    line = error_line(err)
    assert code == 2 and re_search(r"(nan|inf|overflow).* step \d", line), line
    assert re_search(rf"{out / 'last.pt'} \(step \d\)", line), line
    assert not (out / "eval.json").exists() and not (out / "model.safetensors").exists()
    for rec in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        assert math.isfinite(rec["loss"])  # nothing non-finite logged (and the file stays strict JSON)


def test_overflowing_lr_is_a_divergence_not_a_traceback(tmp_path, capsys, hf_dir):
    code, err = cli(capsys, *train_args(hf_dir, tmp_path / "o", "--lr", "1e38", "--warmup-iters", "0"))
    assert code == 2 and re_search(r"step 1", error_line(err)), err
    assert not (tmp_path / "o" / "config.json").exists()  # nothing to resume: nothing left behind


def test_resume_with_another_checkpoint_every_is_allowed(tmp_path, capsys, hf_dir):
    out = tmp_path / "o"
    code, err = cli(capsys, *train_args(hf_dir, out, "--iters", "3"))
    assert code == 0, err
    (out / "eval.json").unlink()
    code, err = cli(capsys, *train_args(hf_dir, out, "--iters", "3", "--checkpoint-every", "2", "--resume"))
    assert code == 0, err
    code, err = cli(capsys, *train_args(hf_dir, out, "--iters", "3", "--lr", "1e-3", "--resume"))
    assert code == 2 and "lr" in error_line(err)  # an option that changes the result still blocks


def test_finetuned_folder_says_it_is_a_folder(tmp_path, capsys, hf_dir, tripwire):
    line = refused(
        capsys,
        r"--finetuned seg=.* is a folder",
        *analyze_args(hf_dir, tmp_path / "o", "--finetuned", f"seg={tmp_path}"),
    )
    assert "no such file" not in line


# ------------------------------------------------------------------------------------------ report
def _analysis_run(tmp_path: Path, k_t) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    per = {
        "seg": {
            "k_t": k_t,
            "task_head_layers": [9, 10, 11],
            "prior_layers": [2, 5, 8, 11],
            "b": 2,
            "k_p": 4,
            "divergence_start": 9,
            "evidence": [],
        }
    }
    (run / "recommendation.json").write_text(json.dumps({"model": "demo-vit", "num_layers": 12, "per_task": per}))
    return run


def test_report_with_nan_recommendation_says_so(tmp_path, capsys):
    run = _analysis_run(tmp_path, float("nan"))
    code, err = cli(capsys, "report", run)
    assert code == 0
    html = (run / "report.html").read_text()
    assert "Copy the last nan" not in html and "last NaN" not in html
    assert re_search(r"cka-split: warning: .*k_t", err), err
    assert re_search(r"k_t .*(NaN|nan)", html)


def test_report_without_cka_npz_says_so(tmp_path, capsys):
    run = _analysis_run(tmp_path, 3)
    code, err = cli(capsys, "report", run)
    assert code == 0
    assert re_search(r"cka-split: warning: .*cka\.npz", err), err
    assert "cka.npz is missing" in (run / "report.html").read_text()


# -------------------------------------------------------------------------- one job per run directory
def _lock_of_live_process(folder: Path, command: str) -> subprocess.Popen:
    """A lock file in ``folder`` owned by a live process (a ``sleep``), as another job would leave it."""
    from vitsplit.runlock import LOCK_NAME, _proc_start

    proc = subprocess.Popen(["sleep", "60"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(
        json.dumps(
            {
                "pid": proc.pid,
                "host": socket.gethostname(),
                "started": "today",
                "command": command,
                "token": "other",
                "proc_start": _proc_start(proc.pid),
            }
        )
    )
    return proc


@pytest.mark.parametrize("command", ["train", "analyze", "evaluate", "sweep", "recommend"])
def test_second_job_on_a_run_directory_is_refused_naming_the_owner(
    command, tmp_path, capsys, hf_dir, trained, tripwire
):
    folder = trained if command == "evaluate" else tmp_path / "o"
    other = _lock_of_live_process(folder, "cka-split train --out X")
    try:
        args = {
            "train": train_args(hf_dir, folder),
            "analyze": analyze_args(hf_dir, folder),
            "evaluate": ["evaluate", folder, "--device", "cpu"],
            "sweep": ["sweep", *train_args(hf_dir, folder)[1:]],
            "recommend": ["recommend", folder],
        }[command]
        refused(capsys, rf"in use by pid {other.pid} .*cka-split train --out X", *args)
    finally:
        other.kill()
        other.wait()
        (folder / ".cka-split.lock").unlink()


def test_stale_lock_of_a_dead_job_is_named_and_taken_over(tmp_path, capsys, hf_dir):
    from vitsplit.runlock import LOCK_NAME

    out = tmp_path / "o"
    other = _lock_of_live_process(out, "cka-split train --crashed")
    other.kill()
    other.wait()
    code, err = cli(capsys, *train_args(hf_dir, out))
    assert code == 0, err
    err = " ".join(re.sub(r"\S+\.py:\d+", "", err).split())  # without rich's log-call tags, unwrapped
    assert re_search(rf"pid {other.pid} .*cka-split train --crashed.* no longer running", err), err
    assert not (out / LOCK_NAME).exists()  # released on exit


def test_lock_is_taken_by_exactly_one_of_many_racing_processes(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    n = 6
    start, done, results = ctx.Barrier(n), ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(tmp_path / "o", start, done, results)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    got = sorted(results.get(timeout=5) for _ in range(n))
    assert got.count("owner") == 1 and got.count("refused") == n - 1, got
    assert not (tmp_path / "o" / ".cka-split.lock").exists()


def _race(folder, start, done, results):
    from vitsplit.errors import UserError
    from vitsplit.runlock import RunLock

    lock = RunLock(folder, "race")
    start.wait()
    try:
        lock.acquire()
        results.put("owner")
    except UserError:
        results.put("refused")
    done.wait()  # the owner holds the lock until every racer has tried
    lock.release()


@pytest.mark.slow
def test_two_concurrent_trains_on_one_out(tmp_path, hf_dir):
    """Two real processes: the second is refused, the first finishes alone (one seed in metrics.jsonl)."""
    out = tmp_path / "o"
    first = _spawn_cli(train_args(hf_dir, out, "--iters", "200"))
    try:
        _wait_for(lambda: (out / ".cka-split.lock").exists(), first)
        second = subprocess.run(
            [sys.executable, "-m", CLI_MODULE, *train_args(hf_dir, out, "--seed", "1")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=_env(),
            timeout=300,
        )
        assert second.returncode == 2, second.stderr
        assert re_search(rf"in use by pid {first.pid}", second.stderr) and second.stderr.count("\n") == 1
        _wait_for(lambda: (out / "last.pt").exists(), first)
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert first.returncode == 130
    assert json.loads((out / "config.json").read_text())["seed"] == 0  # the first run's, untouched


# ------------------------------------------------------------------------------------------ Ctrl-C
def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))


def _default_sigint() -> None:
    """preexec_fn: Ctrl-C's default disposition in the child. A shell starts background jobs with SIGINT
    ignored, Python then installs no KeyboardInterrupt handler, and a test that sends SIGINT would only
    pass when the suite runs in the foreground."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn_cli(args: list[str]) -> subprocess.Popen:
    """The CLI in a child process that answers Ctrl-C (stderr piped, stdout dropped)."""
    return subprocess.Popen(
        [sys.executable, "-m", CLI_MODULE, *args],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else proc.returncode
        assert time.time() < deadline, "the subprocess did not get there in time"
        time.sleep(0.05)


@pytest.mark.slow
def test_ctrl_c_during_train_names_the_checkpoint_and_the_resume_command(tmp_path, hf_dir):
    out = tmp_path / "o"
    args = train_args(hf_dir, out, "--iters", "200")
    proc = _spawn_cli(args)
    _wait_for(lambda: (out / "last.pt").exists(), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    line = [ln for ln in err.splitlines() if ln.startswith("cka-split:")]
    assert len(line) == 1 and "Traceback" not in err, err
    found = re_search(
        rf"cka-split: interrupted: train .*step \d+.*{out / 'last.pt'} \(step \d+\).*resume with: cka-split ", line[0]
    )
    assert found, line[0]
    resume = shlex.split(line[0].split("resume with: ", 1)[1])
    assert resume == ["cka-split", *args, "--resume"]  # the exact command; resuming itself: tests/test_resume.py
    assert not (out / ".cka-split.lock").exists()


def test_interrupted_line_gives_the_command_that_resumes():
    """train resumes with --resume added; a sweep resumes by running the same command again."""
    from cka_split.cli.interrupt import Interrupted, interrupted_line

    from vitsplit.errors import RunInterrupted

    run = RunInterrupted("train vitsplit seg", 7, 40, "runs/s/k3-s0/last.pt", 6)
    line = interrupted_line(["sweep", "--k-t", "1-3", "--out", "runs/s"], Interrupted(run, resume_flag=None))
    assert line == (
        "cka-split: interrupted: train vitsplit seg stopped at step 7 of 40; the last checkpoint is "
        "runs/s/k3-s0/last.pt (step 6); resume with: cka-split sweep --k-t 1-3 --out runs/s"
    )
    assert interrupted_line(["train", "--out", "o x"], Interrupted(run)).endswith(
        "cka-split train --out 'o x' --resume"
    )
    fresh = RunInterrupted("train linear seg", 0, 40, None, None)
    assert interrupted_line(["train"], Interrupted(fresh)) == (
        "cka-split: interrupted: train linear seg stopped at "
        "step 0 of 40, before its first checkpoint: nothing to resume"
    )
    assert interrupted_line(["analyze", "--tasks", "seg"], None) == "cka-split: interrupted: analyze"


@pytest.mark.slow
def test_ctrl_c_during_analyze_says_what_was_interrupted(tmp_path, hf_dir):
    out = tmp_path / "a"
    args = analyze_args(hf_dir, out, "--finetune-steps", "500")
    proc = _spawn_cli(args)
    _wait_for(lambda: (out / ".cka-split.lock").exists(), proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    line = [ln for ln in err.splitlines() if ln.startswith("cka-split:")]
    assert len(line) == 1 and "Traceback" not in err and line[0].startswith("cka-split: interrupted: analyze"), err
    assert not (out / ".cka-split.lock").exists()
