"""Pretrained weights that are not a given file: the caches (torch.hub's ``checkpoints/`` folder,
the Hugging Face hub cache), the online check, and the download.

``"auto"`` looks in the caches first; downloads only when online (:func:`offline_reason` is None),
else the caller raises a fast ``UserError`` naming ``--weights PATH`` and ``--weights random``.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .spec import WAYS_FORWARD, BackboneSpec

# Where the online check connects, and how long it may take.
PROBE_ADDRESS: tuple[str, int] = ("huggingface.co", 443)
PROBE_TIMEOUT_S = 2.0


def torch_hub_checkpoints_dir() -> Path:
    """torch.hub's checkpoint folder: ``$TORCH_HOME/hub/checkpoints`` (default ~/.cache/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (``HF_HUB_CACHE``,
    else ``$HF_HOME/hub``, else huggingface_hub's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants  # noqa: PLC0415 - only needed when no environment variable is set

    return Path(constants.HF_HUB_CACHE)


def hub_id(spec: BackboneSpec) -> str | None:
    """The Hugging Face repo holding timm's pretrained weights for ``spec`` (its own ``hf_id``,
    else the default tag of timm's pretrained config)."""
    if spec.hf_id:
        return spec.hf_id
    try:
        from timm.models import get_pretrained_cfg  # noqa: PLC0415 - timm takes seconds to import

        cfg = get_pretrained_cfg(spec.timm_name)
    except (RuntimeError, KeyError, ValueError):
        return None
    return getattr(cfg, "hf_hub_id", None) or None


def cached_weights(spec: BackboneSpec) -> list[tuple[Path, str]]:
    """Cached weight files for ``spec`` as (path, label), best first: torch.hub's
    ``checkpoints/<official file>``, then the HF hub cache (``model.safetensors``,
    ``pytorch_model.bin``)."""
    found: list[tuple[Path, str]] = []
    if spec.hub_file:
        p = torch_hub_checkpoints_dir() / spec.hub_file
        if p.is_file():
            found.append((p, f"torch.hub {spec.hub_url or spec.hub_file}"))
    repo = hub_id(spec)
    if repo:
        from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415 - imports its hub client

        for filename in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(repo, filename, cache_dir=hf_cache_dir())
            if isinstance(hit, str):
                found.append((Path(hit), f"hub {repo}"))
                break
    return found


def offline_reason() -> str | None:
    """Why we are offline (``HF_HUB_OFFLINE`` set, or no TCP connection to
    ``PROBE_ADDRESS`` within ``PROBE_TIMEOUT_S``), or None when online. The probe runs in a
    daemon thread so that a slow DNS lookup cannot hold the caller past the timeout."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    result: dict[str, Any] = {}
    host, port = PROBE_ADDRESS

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            result["ok"] = True
        except OSError as e:
            result["error"] = e

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(PROBE_TIMEOUT_S)
    if result.get("ok"):
        return None
    return f"there is no network ({host}:{port} unreachable within {PROBE_TIMEOUT_S:g} s)"


def hf_download(repo: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download  # noqa: PLC0415 - imports its hub client
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()  # library code does not print; the CLI reports progress
    try:
        return hf_hub_download(repo, filename, cache_dir=hf_cache_dir())
    finally:
        if not was_disabled:
            enable_progress_bars()


def download(spec: BackboneSpec) -> tuple[Path, str]:
    """Download pretrained weights (timm's on the HF hub, else the official torch.hub URL)."""
    errors = []
    repo = hub_id(spec)
    if repo:
        for filename in ("model.safetensors", "pytorch_model.bin"):
            try:
                return Path(hf_download(repo, filename)), f"hub {repo}"
            except Exception as e:  # noqa: BLE001 - any hub failure falls through to the next source
                errors.append(f"{repo}/{filename}: {type(e).__name__}")
    if spec.hub_url and spec.hub_file:
        dest = torch_hub_checkpoints_dir() / spec.hub_file
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(spec.hub_url, str(dest), progress=False)  # writes a temp, then moves
            return dest, f"torch.hub {spec.hub_url}"
        except Exception as e:  # noqa: BLE001
            errors.append(f"{spec.hub_url}: {type(e).__name__}")
    why = "; ".join(errors) if errors else "no known download location"
    raise UserError(f"could not download pretrained weights for '{spec.name}' ({why}): {WAYS_FORWARD}")
