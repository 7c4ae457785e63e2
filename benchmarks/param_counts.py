"""Trainable-parameter totals of the paper's comparison rows, exact, beside the published figures.

ViT-Adapter-S/B/L + UperNet (ViT-Adapter paper, ADE20K, 150 classes: 57.6 / 133.9 / 363.8 M) on the
timm backbones of the released configs, and on DINOv2; DINOv2-B/L + UperNet with full fine-tuning
(ViT-Split paper: 120.7 / 341.2 M). Every model is built on the meta device (no memory, no init),
with the toolkit's own modules: the counts are those ``cka-split train --method vit-adapter|full
--head upernet`` trains. "w/o aux" leaves out the auxiliary FCN head (used in training only).

    python benchmarks/param_counts.py
"""

from __future__ import annotations

import torch

from vitsplit.backbones import Backbone, create_vit, resolve_name
from vitsplit.model.upernet import UperNetSegHead
from vitsplit.model.vit_adapter import ViTAdapter

# (row, timm / toolkit backbone name, what it is, published total in M or None)
ROWS = [
    ("ViT-Adapter-S + UperNet", "deit_small_patch16_224", "released DeiT-S config (224 px pos. emb.)", 57.6),
    ("ViT-Adapter-B + UperNet", "vit_base_patch16_384", "released AugReg-B config (img_size 384)", 133.9),
    ("ViT-Adapter-B + UperNet", "deit_base_patch16_224", "released DeiT-B config (224 px pos. emb.)", 133.9),
    ("ViT-Adapter-L + UperNet", "vit_large_patch16_384", "released AugReg-L config (img_size 384)", 363.8),
    ("ViT-Adapter-L + UperNet", "vit_large_patch16_224", "AugReg-L at 224 px pos. emb.", 363.8),
    ("ViT-Adapter-S + UperNet", "dinov2_vits14", "on DINOv2-S (518 px pos. emb., layer scale)", None),
    ("ViT-Adapter-B + UperNet", "dinov2_vitb14", "on DINOv2-B", None),
    ("ViT-Adapter-L + UperNet", "dinov2_vitl14", "on DINOv2-L", None),
    ("DINOv2-B + UperNet (full)", "dinov2_vitb14", "full fine-tuning, parameter-free pyramid", 120.7),
    ("DINOv2-L + UperNet (full)", "dinov2_vitl14", "full fine-tuning, parameter-free pyramid", 341.2),
]


def trainable(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def count(row: str, name: str, num_classes: int = 150) -> tuple[int, int]:
    """(total, auxiliary head) trainable parameters of ``row`` on backbone ``name``."""
    with torch.device("meta"):
        bb = Backbone(create_vit(resolve_name(name)), name=name, weights_source="random")
        head = UperNetSegHead([bb.embed_dim] * 4, num_classes)
        body = bb if "(full)" in row else ViTAdapter(bb)
        return trainable(body) + trainable(head), trainable(head.aux)


def main() -> None:
    print(f"{'row':27}{'backbone':24}{'total':>14}{'M':>8}{'w/o aux M':>11}{'published':>11}  note")
    for row, name, note, published in ROWS:
        total, aux = count(row, name)
        pub = f"{published:.1f}" if published is not None else "-"
        mark = (
            "" if published is None else ("  = published" if round(total / 1e6, 1) == published else "  != published")
        )
        print(
            f"{row:27}{name:24}{total:14,}{total / 1e6:8.2f}{(total - aux) / 1e6:11.2f}{pub:>11}  {note}{mark}",
            flush=True,
        )


if __name__ == "__main__":
    main()
