"""Parsing of data specs: the one string that names a dataset on the command line.

Grammar (the ``--data`` option of every command)::

    synthetic[:key=value,...]        embedded procedural scenes; keys: size, classes, objects, length, zoom,
                                     rescale (0: no random rescale in training)
    ade20k:DIR                       mmseg layout (images/{training,validation}, annotations/...)
    cityscapes:DIR                   leftImg8bit/{train,val}/CITY/*_leftImg8bit.png + gtFine labelTrainIds
    folder:DIR                       images/ and masks/ with matching stems (optional train/ and val/)
    coco:ANNOTATIONS.json:IMAGE_DIR  COCO instances json + its image folder

Paths may contain ``:`` only in the last field of ``coco`` (so ``coco:a.json:C:/imgs`` is not
supported on Windows drive letters; use a relative path there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

KINDS = ("synthetic", "ade20k", "cityscapes", "folder", "coco")
SYNTHETIC_KEYS = ("size", "classes", "objects", "length", "zoom", "rescale")


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec: ``kind`` plus its paths (real data) or options (synthetic)."""

    kind: str
    root: Path | None = None  # ade20k / cityscapes / folder root; coco image folder
    annotations: Path | None = None  # coco annotations json
    options: dict[str, int] = field(default_factory=dict)  # synthetic key=value options


def parse_spec(spec: str) -> DataSpec:
    """Parse ``spec`` (see the module docstring); unknown prefixes and malformed specs raise UserError."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(
            "empty data spec; use 'synthetic', 'ade20k:DIR', 'cityscapes:DIR', 'folder:DIR' "
            "or 'coco:ANNOTATIONS.json:IMAGE_DIR'"
        )
    kind, _, rest = spec.strip().partition(":")
    if kind not in KINDS:
        raise UserError(
            f"unknown data spec prefix {kind!r} in {spec!r}; use one of "
            "synthetic, ade20k:DIR, cityscapes:DIR, folder:DIR, coco:ANNOTATIONS.json:IMAGE_DIR"
        )
    if kind == "synthetic":
        return DataSpec("synthetic", options=_parse_options(rest, spec))
    if kind == "coco":
        ann, sep, img = rest.partition(":")
        if not sep or not ann or not img:
            raise UserError(f"data spec {spec!r} must be coco:ANNOTATIONS.json:IMAGE_DIR")
        return DataSpec("coco", root=Path(img), annotations=Path(ann))
    if not rest:
        raise UserError(f"data spec {spec!r} needs a folder: {kind}:DIR")
    return DataSpec(kind, root=Path(rest))


def _parse_options(text: str, spec: str) -> dict[str, int]:
    options: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in SYNTHETIC_KEYS:
            raise UserError(
                f"bad synthetic option {part!r} in {spec!r}; use key=value with keys "
                f"{', '.join(SYNTHETIC_KEYS)} (e.g. synthetic:size=224,classes=8)"
            )
        try:
            options[key] = int(value)
        except ValueError:
            raise UserError(f"synthetic option {key} must be an integer, got {value!r} in {spec!r}") from None
    return options
