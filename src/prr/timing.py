"""The one device timer (low layer: the runtime's budget profiler and the benchmarks both use it).

An op is captured in a CUDA graph (launch gaps and Python overhead stay out of device time), then
``triton.testing.do_bench`` replays it, flushing the L2 before every replay, and reports the median in
microseconds. Needs CUDA (and triton, which CUDA builds of torch bring).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["capture", "time_graph", "time_op"]


def capture(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """Capture `fn` (already warmed up: kernels compiled) into a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g


def time_graph(g: torch.cuda.CUDAGraph, rep_ms: int = 60) -> float:
    """Median microseconds of one replay, L2 flushed before each."""
    import triton.testing

    return 1e3 * triton.testing.do_bench(g.replay, warmup=10, rep=rep_ms, return_mode="median")


def time_op(fn: Callable[[], object], rep_ms: int = 60) -> float:
    return time_graph(capture(fn), rep_ms)
