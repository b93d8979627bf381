"""``attention="auto"``: dense attention below the context where DSA starts to pay, sparse above.

Below some context a dense decode (every block, one kernel) is cheaper than DSA's selection plus its sparse
attention; above it DSA wins and keeps winning (dense grows with the context, DSA's attention does not). That
crossover depends on the GPU and the shapes, so it is profiled once per (GPU, batch, heads, head dim, dtype,
DSA method, budget) by timing one layer's dense and DSA attention, each as a CUDA graph, at contexts of 1K,
2K, 4K, ... up to the model's window, and cached in a JSON file under the user cache directory (as the
speculation budget is). The rest of a decode step is the same for both, so one layer decides.

On the CPU the ops are PyTorch references whose costs say nothing about a GPU; there the crossover is a fixed
default, :data:`CPU_CROSSOVER` tokens, beyond the bundled SmolLM2's 8K window: the bundled model decodes densely
(exact answers) at every length it supports. That is a choice, not a speed claim: one decode step of SmolLM2
on the shared 2-core machine (median of 8, heavily loaded, so rough) took dense 965 / 1566 / 1289 ms and DSA
(1024-token budget) 1407 / 1084 / 702 ms at 2K / 4K / 7.9K tokens, so on an idle CPU DSA may well be faster
from about 4K; pass ``auto_crossover`` to choose otherwise.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from .. import ops
from ..algo.sparse import BlockMetadata, SparseConfig, select
from ..cache import KVCache
from ..jsoncache import JsonCache

CPU_CROSSOVER = 16384
NEVER = 1 << 62  # a crossover no context reaches: stay dense


def describe_crossover(crossover: int, batch: int | None = None) -> str:
    """The crossover in words, as the CLI prints it: ``"crossover 16384 tokens on this device"``, or, for
    :data:`NEVER` (no probed context up to the model's window where DSA beat dense), that sparse attention never
    pays on this device (at this batch, when `batch` is given)."""
    if crossover >= NEVER:
        at = f" at batch {batch}" if batch is not None else ""
        return f"sparse attention never pays on this device{at}: dense up to the model's window"
    return f"crossover {crossover} tokens on this device"


def resolve(context: int, crossover: int, sparse: str = "dsa") -> str:
    """The attention for a decode that starts at `context` tokens."""
    return "dense" if context < crossover else sparse


def probe_contexts(max_context: int, start: int = 1024) -> list[int]:
    """1K, 2K, 4K, ... and the window itself."""
    out, c = [], start
    while c < max_context:
        out.append(c)
        c *= 2
    return [*out, max_context]


class CrossoverCache(JsonCache):
    """Profiled crossovers keyed by GPU and shapes, in a JSON file (``{key: {"crossover": T, "times": ...}}``)."""

    def __init__(self, path: str | None = None):
        super().__init__("attention_crossover.json", path)

    @staticmethod
    def key(gpu: str, batch: int, hq: int, hkv: int, d: int, dtype: torch.dtype, cfg: SparseConfig,
            max_context: int) -> str:
        return (f"{gpu}|b{batch}|{hq}x{hkv}x{d}|{str(dtype).replace('torch.', '')}|{cfg.method}|"
                f"{cfg.budget_tokens}|bs{cfg.block_size}|max{max_context}")

    def get(self, key: str) -> dict | None:
        return self.get_entry(key)

    def put(self, key: str, entry: dict) -> None:
        self.put_entry(key, entry)


def find_crossover(measure: Callable[[int], tuple[float, float]], contexts: list[int]) -> tuple[int, dict]:
    """The smallest probed context from which DSA (``measure(ctx)[1]``) beats dense (``[0]``) at every larger
    probe; stops after two wins in a row, or at the first context that does not fit in memory."""
    cross, wins, times = NEVER, 0, {}
    for ctx in contexts:
        try:
            t_dense, t_dsa = measure(ctx)
        except torch.cuda.OutOfMemoryError:
            break
        times[str(ctx)] = [round(t_dense, 2), round(t_dsa, 2)]
        if t_dsa < t_dense:
            cross, wins = (ctx if wins == 0 else cross), wins + 1
            if wins == 2:
                break
        else:
            cross, wins = NEVER, 0
    return cross, times


def profile_crossover(num_q_heads: int, num_kv_heads: int, head_dim: int, batch: int, cfg: SparseConfig, *,
                      dtype: torch.dtype, device, max_context: int, cache: CrossoverCache | None = None,
                      refresh: bool = False, measure: Callable[[int], tuple[float, float]] | None = None,
                      gpu_name: str | None = None) -> int:
    """The crossover context (tokens) on this GPU for these shapes, profiled once and cached."""
    store = cache or CrossoverCache()
    gpu = gpu_name or torch.cuda.get_device_name(device)
    key = CrossoverCache.key(gpu, batch, num_q_heads, num_kv_heads, head_dim, dtype, cfg, max_context)
    if not refresh and (hit := store.get(key)) is not None:
        return int(hit["crossover"])
    if measure is None:
        def measure(ctx):
            return measure_layer(num_q_heads, num_kv_heads, head_dim, batch, cfg, ctx, dtype=dtype, device=device)
    cross, times = find_crossover(measure, probe_contexts(max_context))
    store.put(key, {"crossover": cross, "times_us": times})
    return cross


def measure_layer(hq: int, hkv: int, d: int, batch: int, cfg: SparseConfig, context: int, *, dtype, device
                  ) -> tuple[float, float]:
    """One layer's attention at `context` tokens, microseconds per CUDA-graph replay: ``(dense, dsa)``. Dense
    is the paged kernel over every block (what the engine runs on a GPU); DSA is selection then attention."""
    cache = KVCache.allocate(batch, context + 16, hkv, d, dtype=dtype, device=device)
    cache.k.normal_()
    cache.v.normal_()
    cache.seq_lens.fill_(context)
    meta = BlockMetadata(cfg, cache)
    q = torch.randn(batch, hq, d, dtype=dtype, device=device)
    idx = torch.arange(cache.max_pages, dtype=torch.int32, device=device).expand(batch, hkv, -1).contiguous()
    cnt = ops.num_blocks(cache.seq_lens, cache.page_size)[:, None].expand(batch, hkv).contiguous()

    def dsa():
        sel = select(q, cache, meta)
        return ops.sparse_decode(q, cache, sel.indices, sel.counts, cfg.block_size)

    return _time_graph(lambda: ops.sparse_decode(q, cache, idx, cnt, cache.page_size)), _time_graph(dsa)


def _time_graph(fn, reps: int = 20, trials: int = 5) -> float:
    """Median microseconds of one replay of `fn` captured in a CUDA graph (after two eager warm-up runs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    return statistics.median(times)
