"""(slow) A DINOv3 model through the whole CLI: analyze with a planted task copy recovers K_t, the
report and PCA maps are written, and train --auto-split trains with the recommendation."""

from __future__ import annotations

import json

import pytest
import torch
from cka_split.cli.app import main
from safetensors.torch import save_file

from vitsplit.backbones import build_backbone

transformers = pytest.importorskip("transformers")

DEPTH, START = 6, 3


def dinov3_folder(tmp_path):
    cfg = transformers.DINOv3ViTConfig(
        hidden_size=64,
        num_hidden_layers=DEPTH,
        num_attention_heads=2,
        intermediate_size=128,
        num_register_tokens=4,
        layerscale_value=1.0,
    )
    model = transformers.DINOv3ViTModel(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights large enough that every block changes the tokens (HF's init: std 0.02)
        for n, p in model.named_parameters():
            if "layer_scale" not in n:
                p.copy_(
                    0.1 * torch.randn(p.shape, generator=g) + (1.0 if "norm" in n and n.endswith("weight") else 0.0)
                )
    model.save_pretrained(tmp_path / "dinov3-tiny")
    return tmp_path / "dinov3-tiny"


@pytest.mark.slow
def test_dinov3_analyze_recommend_train(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = dinov3_folder(tmp_path)
    name = f"hf:{folder}"
    vit = build_backbone(name, "auto").vit
    g = torch.Generator().manual_seed(1)
    # blocks >= START perturbed by twice their mean magnitude (HF initialises weights with std 0.02)
    seg = {
        k: (
            v + 2.0 * v.abs().mean().clamp_min(0.02) * torch.randn(v.shape, generator=g)
            if k.startswith("blocks.") and int(k.split(".")[1]) >= START
            else v
        ).contiguous()
        for k, v in vit.state_dict().items()
    }
    save_file(seg, str(tmp_path / "seg.safetensors"))
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(
            [
                "analyze",
                "--model",
                name,
                "--weights",
                "auto",
                "--tasks",
                "seg",
                "--finetuned",
                f"seg={tmp_path / 'seg.safetensors'}",
                "--probe-images",
                "16",
                "--batch-size",
                "8",
                "--image-size",
                "64",
                "--pca-images",
                "1",
                "--device",
                "cpu",
                "--out",
                str(run),
            ]
        )
    assert e.value.code == 0, capsys.readouterr().err
    rec = json.loads((run / "recommendation.json").read_text())
    assert rec["per_task"]["seg"]["divergence_start"] == START and rec["per_task"]["seg"]["k_t"] == DEPTH - START
    assert (run / "report.html").is_file() and json.loads((run / "pca" / "index.json").read_text())["grid_hw"] == [4, 4]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["models"]["pretrained"]["family"] == "eva" and cfg["models"]["pretrained"]["num_registers"] == 4
    capsys.readouterr()
    out = tmp_path / "train"
    with pytest.raises(SystemExit) as e:
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
                "2",
                "--batch-size",
                "2",
                "--crop",
                "64",
                "--checkpoint-every",
                "2",
                "--train-length",
                "4",
                "--val-length",
                "2",
                "--out",
                str(out),
            ]
        )
    assert e.value.code == 0, capsys.readouterr().err
    text = (out / "config.json").read_text()
    assert f'"k_t": {DEPTH - START}' in text and (out / "model.safetensors").is_file()
