"""Plain-text formatting shared by the report's parts (numbers, block lists, durations)."""

from __future__ import annotations

from typing import Any


def fmt_params(n: int | None) -> str:
    """12345678 -> '12.35 M (12,345,678)'."""
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} M ({n:,})" if n >= 10_000 else f"{n:,}"


def fmt_blocks(blocks: list[int]) -> str:
    """[9, 10, 11] -> '9-11'; non-contiguous lists are written out."""
    if not blocks:
        return "-"
    b = [int(x) for x in blocks]
    if len(b) > 1 and b == list(range(b[0], b[-1] + 1)):
        return f"{b[0]}-{b[-1]}"
    return ", ".join(map(str, b))


def fmt_seconds(s: Any) -> str:
    try:
        s = float(s)
    except (TypeError, ValueError):
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    return f"{m} min {sec} s" if m < 60 else f"{m // 60} h {m % 60} min"


def dig(d: Any, *path: str) -> Any:
    """d[path[0]][path[1]]..., or None where a key is missing or a level is not a dict."""
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d
