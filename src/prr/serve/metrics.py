"""The server's counters and histograms, written in Prometheus' text exposition format (version 0.0.4).

Written by hand (a few lines) rather than through prometheus_client: the server then needs nothing beyond its
ASGI stack. Every metric is prefixed ``prr_``. Updated by the engine thread, read by the HTTP thread: one lock.
"""

from __future__ import annotations

import math
import threading

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last: +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        i = next((j for j, b in enumerate(self.buckets) if v <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cum = [], 0
        for b, n in zip((*self.buckets, math.inf), self.counts, strict=True):
            cum += n
            le = "+Inf" if b == math.inf else repr(float(b))
            out.append(f'{name}_bucket{{le="{le}"}} {cum}')
        return [*out, f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]


class Metrics:
    """What ``GET /metrics`` shows; the gauges are read from the scheduler when rendered."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.requests = {"completed": 0, "cancelled": 0, "rejected": 0, "failed": 0}
        self.blocks = [0, 0, 0]  # PRR: selected, forced, hits, summed over steps, sparse layers and sequences

    def finished(self, outcome: str) -> None:
        with self.lock:
            self.requests[outcome] += 1

    def add_blocks(self, counts) -> None:
        with self.lock:
            self.blocks = [a + b for a, b in zip(self.blocks, counts, strict=True)]

    def hit_rate(self) -> float:
        """Dynamic hit rate of PRR's predictions, ``(hits - forced) / (selected - forced)``; NaN before any."""
        sel, forced, hits = self.blocks
        return (hits - forced) / (sel - forced) if sel > forced else math.nan

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """``gauges``: name -> (help, value), read by the caller at this moment."""
        out = []

        def head(name, kind, text):
            out.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}"])

        with self.lock:
            for name, (text, value) in gauges.items():
                head(name, "gauge", text)
                out.append(f"{name} {float(value)!r}")
            head("prr_prr_hit_rate", "gauge", "PRR: share of the selected dynamic blocks that were predicted "
                                              "(NaN before the first PRR step)")
            out.append(f"prr_prr_hit_rate {self.hit_rate()!r}")
            head("prr_generation_tokens_total", "counter", "Tokens generated")
            out.append(f"prr_generation_tokens_total {self.generated_tokens}")
            head("prr_prompt_tokens_total", "counter", "Prompt tokens of admitted requests")
            out.append(f"prr_prompt_tokens_total {self.prompt_tokens}")
            head("prr_requests_total", "counter", "Requests by outcome")
            out.extend(f'prr_requests_total{{outcome="{k}"}} {v}' for k, v in self.requests.items())
            head("prr_time_to_first_token_seconds", "histogram", "From arrival to the first token")
            out.extend(self.ttft.lines("prr_time_to_first_token_seconds"))
            head("prr_time_per_output_token_seconds", "histogram", "Between consecutive tokens of a sequence")
            out.extend(self.tpot.lines("prr_time_per_output_token_seconds"))
        return "\n".join(out) + "\n"
