"""The one timer and the one result schema every prr benchmark uses.

Timing (:mod:`prr.timing`): the op is captured in a CUDA graph (so launch gaps and Python overhead stay out of
device time), then ``triton.testing.do_bench`` replays it, flushing the L2 (a 256 MB write) before every replay, and
reports the median (``median_us``). One replay carries a fixed cost that a whole decode step's graph pays
once, not per op: ``overhead_us``, the median replay of a graph holding one one-element kernel, measured in
the same run. ``net_us = median_us - overhead_us``; bandwidth (``tbps``) is the bytes counted (each input read
once, each output written once) over ``net_us``, and ``x_floor`` is ``net_us`` over the byte floor at the
measured copy bandwidth. Both times are saved.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from ..provenance import environment, git_commit, source_digest  # noqa: F401 (re-exported)
from ..timing import time_op

SCHEMA = "prr-bench/1"
# Byte-floor bandwidth: the H200's measured device-to-device copy (DESIGN.md section 3; re-measured per run).
DEFAULT_COPY_TBPS = 4.18


@dataclasses.dataclass
class Row:
    bench: str  # e.g. "kernels"
    case: str  # shape label, e.g. "llama-3.1-8b/b1/128K/quest"
    op: str  # what was timed
    impl: str  # "triton", "torch", "sdpa", ...
    median_us: float
    bytes: int  # bytes counted for this op
    floor_us: float  # bytes / copy bandwidth
    overhead_us: float = 0.0  # one-kernel graph replay, same run
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def net_us(self) -> float:
        return max(self.median_us - self.overhead_us, 1e-3)

    @property
    def tbps(self) -> float:
        return self.bytes / (self.net_us * 1e-6) / 1e12

    @property
    def x_floor(self) -> float:
        return self.net_us / self.floor_us if self.floor_us > 0 else float("nan")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(net_us=round(self.net_us, 3), tbps=round(self.tbps, 4), x_floor=round(self.x_floor, 3))
        return d


def copy_bandwidth_tbps(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written) of this GPU: the best of an SM copy kernel in a
    graph and an eager ``copy_`` (a graph's memcpy node may take the slower copy engine)."""
    import triton.testing

    src = torch.empty(nbytes // 8, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    kernel_us = time_op(lambda: torch.mul(src, 1.0, out=dst), rep_ms=100)
    eager_us = 1e3 * triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return nbytes / (min(kernel_us, eager_us) * 1e-6) / 1e12


def graph_overhead_us() -> float:
    """Median replay of a graph holding one kernel on one element: the fixed cost of a replay."""
    x = torch.zeros(1, device="cuda")
    return time_op(lambda: x.add_(1.0), rep_ms=100)


def save(path: str, bench: str, rows: list[Row], meta: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"schema": SCHEMA, "bench": bench, "env": environment(), "meta": meta,
                   "rows": [r.to_dict() for r in rows]}, f, indent=1)


def table(rows: list[dict], cols=("case", "op", "impl", "median_us", "net_us", "tbps", "x_floor")) -> str:
    """A plain text table of result rows (dicts)."""
    fmt = {"median_us": "{:.1f}", "net_us": "{:.1f}", "tbps": "{:.2f}", "x_floor": "{:.2f}"}
    cells = [[fmt.get(c, "{}").format(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    out += ["  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(out)
