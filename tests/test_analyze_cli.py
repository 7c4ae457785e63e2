"""`cka-split analyze` / `recommend`: the user errors, the run-directory helpers, and (slow) a
planted-divergence run through the CLI that recovers the planted K_t per task and trains with it."""

import json
import os
from pathlib import Path

import pytest
import torch
from cka_split.cli.app import main

from cka_split.pipelines.analyze import AnalyzeConfig, parse_data_options, resolve_run_dir, update_latest, validate
from vitsplit.errors import UserError


def cli_error(args, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cka-split: error:") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--tasks", "seg", "--tasks", "segm"], "unknown task 'segm'"),
        (["--tasks", "seg", "det", "depht"], "unknown task 'depht'"),
        (["--tasks", "seg", "--finetuned", "det=x.safetensors"], "names task 'det', which is not in --tasks"),
        (["--tasks", "seg", "--finetuned", "seg=/nonexistent/seg.safetensors"], "no such file"),
        (["--weights", "/nonexistent/w.pth"], "no such file"),
        (["--probe-images", "16", "--batch-size", "32"], "smaller than one minibatch"),
        (["--batch-size", "3", "--probe-images", "8"], "at least 4 images per minibatch"),
        (["--features", "pooled"], "use tokens, mean or cls"),
        (["--finetuned", "seg"], "TASK=VALUE"),
    ],
)
def test_analyze_user_errors_exit_2_with_one_line(args, needle, capsys, tmp_path):
    err = cli_error(
        ["analyze", "--weights", "random", "--out", str(tmp_path / "r"), *args]
        if "--weights" not in args
        else ["analyze", "--out", str(tmp_path / "r"), *args],
        capsys,
    )
    assert needle in err
    assert not (tmp_path / "r").exists()  # nothing written before the options are valid


def test_recommend_errors(capsys, tmp_path):
    assert "not a run directory" in cli_error(["recommend", str(tmp_path / "missing")], capsys)
    (tmp_path / "run").mkdir()
    assert "config.json is missing" in cli_error(["recommend", str(tmp_path / "run")], capsys)


def test_data_options_and_probe_spec():
    assert parse_data_options(["synthetic"]) == {"*": "synthetic"}
    m = parse_data_options(["seg=ade20k:/d/ade", "det=coco:/a=b.json:/img"])
    assert m == {"seg": "ade20k:/d/ade", "det": "coco:/a=b.json:/img"}
    assert parse_data_options(["coco:/x=y.json:/img"]) == {"*": "coco:/x=y.json:/img"}  # '=' inside a spec
    cfg = AnalyzeConfig(tasks=["det", "seg"], data=m)
    assert cfg.probe_spec() == "coco:/a=b.json:/img" and cfg.data_for("seg") == "ade20k:/d/ade"
    assert AnalyzeConfig(tasks=["seg"]).probe_spec() == "synthetic"
    with pytest.raises(UserError, match="twice"):
        parse_data_options(["seg=a", "seg=b"])
    with pytest.raises(UserError, match="--data det="):
        validate(AnalyzeConfig(tasks=["seg"], weights="random", data={"det": "synthetic"}))


def test_latest_points_at_the_newest_run(tmp_path):
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    for d in (a, b):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    update_latest(a)
    update_latest(b)
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and os.readlink(latest) == "b"
    assert resolve_run_dir(latest).resolve() == b.resolve()
    (tmp_path / "pointer").write_text(str(a) + "\n")  # the text-file form
    assert resolve_run_dir(tmp_path / "pointer") == a


def _find_key(obj, key):
    """The first value stored under ``key`` anywhere in a nested JSON object."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        obj = list(obj.values())
    if isinstance(obj, list):
        for v in obj:
            found = _find_key(v, key)
            if found is not None:
                return found
    return None


def _planted_checkpoints(tmp_path: Path, starts: dict[str, int]) -> tuple[Path, dict[str, Path]]:
    """A demo-vit 'pretrained' checkpoint (timm layout; layer scale 1 so that every block matters)
    and one 'finetuned' copy per task, equal below block starts[task] and moved from there on."""
    from safetensors.torch import save_file

    from vitsplit.backbones import create_vit, resolve_name

    torch.manual_seed(0)
    vit = create_vit(resolve_name("demo-vit"))
    with torch.no_grad():
        for blk in vit.blocks:
            blk.ls1.gamma.fill_(1.0)
            blk.ls2.gamma.fill_(1.0)
    base = {k: v.detach().clone().contiguous() for k, v in vit.state_dict().items()}
    pre = tmp_path / "pretrained.safetensors"
    save_file(base, str(pre))
    out = {}
    for task, s in starts.items():
        g = torch.Generator().manual_seed(s)
        sd = {}
        for k, v in base.items():
            block = int(k.split(".")[1]) if k.startswith("blocks.") else -1
            sd[k] = (v + torch.randn(v.shape, generator=g) * 0.05).contiguous() if block >= s else v.clone()
        out[task] = tmp_path / f"{task}.safetensors"
        save_file(sd, str(out[task]))
    return pre, out


@pytest.mark.slow
def test_planted_divergence_run_recovers_k_t_and_trains_with_it(tmp_path, capsys):
    starts = {"seg": 6, "det": 9}  # demo-vit has 12 blocks: K_t should be 6 and 3
    pre, ft = _planted_checkpoints(tmp_path, starts)
    run = tmp_path / "runs" / "planted"
    with pytest.raises(SystemExit) as e:
        main(
            [
                "analyze",
                "--model",
                "demo-vit",
                "--weights",
                str(pre),
                "--tasks",
                "seg",
                "det",
                "--finetuned",
                f"seg={ft['seg']}",
                "--finetuned",
                f"det={ft['det']}",
                "--probe-images",
                "64",
                "--batch-size",
                "8",
                "--image-size",
                "56",
                "--pca-images",
                "2",
                "--device",
                "cpu",
                "--out",
                str(run),
            ]
        )
    assert e.value.code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "ViT-Split recommendation" in printed
    rec = json.loads((run / "recommendation.json").read_text())
    for task, s in starts.items():
        assert rec["per_task"][task]["divergence_start"] == s
        assert rec["per_task"][task]["k_t"] == 12 - s
    assert rec["per_task"]["seg"]["prior_layers"] == [2, 5, 8, 11]  # flat pretrained evidence: the paper's rule
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["options"]["tasks"] == ["seg", "det"] and cfg["seed"] == 0
    assert cfg["models"]["pretrained"]["state_sha256"] != cfg["models"]["seg"]["state_sha256"]
    assert cfg["resolved"]["probe_images_used"] == 64
    assert rec["per_task"]["seg"]["se_batches"] == 8 and rec["per_task"]["seg"]["se_reliable"]
    assert (run / "cka.npz").is_file() and (run / "pca" / "index.json").is_file() and (run / "report.html").is_file()
    assert os.readlink(run.parent / "latest") == "planted"

    # recommend recomputes from the saved run alone, with a budget that forces det's K_t down by one
    det_params = rec["per_task"]["det"]["trainable_params"]
    assert rec["per_task"]["seg"]["trainable_params"] < det_params  # Mask R-CNN is the big one
    with pytest.raises(SystemExit) as e:
        main(["recommend", str(run), "--max-trainable-params", str((det_params - 1) / 1e6)])
    assert e.value.code == 0, capsys.readouterr().err
    tight = json.loads((run / "recommendation.json").read_text())
    assert tight["per_task"]["det"]["k_t"] == 2 and tight["per_task"]["det"]["k_t_from_cka"] == 3
    assert tight["per_task"]["seg"]["k_t"] == 6  # seg already fits
    with pytest.raises(SystemExit) as e:  # back to the unconstrained recommendation
        main(["recommend", str(run)])
    assert e.value.code == 0
    capsys.readouterr()

    out = tmp_path / "train_seg"
    with pytest.raises(SystemExit) as e:
        # model and weights come from the run too
        main(
            [
                "train",
                "--auto-split",
                str(run),
                "--task",
                "seg",
                "--data",
                "synthetic",
                "--iters",
                "5",
                "--batch-size",
                "2",
                "--crop",
                "56",
                "--checkpoint-every",
                "5",
                "--train-length",
                "10",
                "--val-length",
                "2",
                "--out",
                str(out),
            ]
        )
    assert e.value.code == 0, capsys.readouterr().err
    tcfg = json.loads((out / "config.json").read_text())
    assert _find_key(tcfg, "k_t") == 6
    assert _find_key(tcfg, "prior_layers") == [2, 5, 8, 11]
    assert "recommendation" in _find_key(tcfg, "split_source") and _find_key(tcfg, "model") == "demo-vit"
    assert _find_key(tcfg, "weights") == str(pre.resolve())
