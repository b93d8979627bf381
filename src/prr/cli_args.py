"""Argument parsing shared by the subcommands of several layers (bench, eval): no prr imports at module level."""

from __future__ import annotations


def parse_contexts(text: str) -> list[int]:
    """``"2K,4K,8000,1M"`` -> ``[2048, 4096, 8000, 1048576]`` (a K suffix multiplies by 1024, M by 1024²)."""
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        try:
            mult = {"K": 1024, "M": 1024 * 1024}.get(part[-1:], 1)
            out.append(int(part[:-1] if mult > 1 else part) * mult)
        except ValueError:
            raise ValueError(f"cannot read {part!r} as a length (e.g. 4096, 4K or 1M)") from None
    return out


def parse_amortized(text: str) -> list[tuple[int, float]]:
    """``"8x3,16x4"`` -> ``[(8, 3.0), (16, 4.0)]``: (m, c) settings of amortized selection (a full scan every m
    steps keeps c·K candidates)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m, sep, c = part.lower().partition("x")
        try:
            out.append((int(m), float(c)))
        except ValueError:
            raise ValueError(f"cannot read {part!r} as an amortized setting MxC (e.g. 16x4)") from None
        if not sep or out[-1][0] < 1 or out[-1][1] < 1:
            raise ValueError(f"amortized setting {part!r}: need MxC with m >= 1 and c >= 1")
    return out


def parse_ratio(text: str):
    """PRR's speculation ratio: ``"auto"`` (the budget profiler decides on a GPU) or a positive number."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        r = float(text)
    except ValueError:
        raise ValueError(f"ratio {text!r}: need a positive number or 'auto'") from None
    if not r > 0 or r != r or r == float("inf"):
        raise ValueError(f"ratio {text!r}: need a positive number or 'auto'")
    return r
