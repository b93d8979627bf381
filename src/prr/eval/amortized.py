"""Amortized selection (issue #12) in the evaluation: methods named ``quest_m16c4`` / ``infllm_v2_m16c4`` run
serialized DSA whose selection scans every m = 16 steps and re-scores c·K = 4K candidates in between
(:class:`prr.algo.amortized.AmortizedSelector` attached to every sparse layer's metadata), and their agreement
with the full-scan method of the same budget."""

from __future__ import annotations

import re

from ..algo.amortized import AmortizedSelector
from ..algo.sparse import SparseConfig
from ..model.engine import Engine

_NAME = re.compile(r"^(quest|infllm_v2)_m(\d+)c(\d+(?:\.\d+)?)$")


def method_name(selector: str, every: int, factor: float) -> str:
    return f"{selector}_m{every}c{factor:g}"


def parse_method(method: str) -> tuple[str, int, float] | None:
    """``"quest_m16c4"`` -> ``("quest", 16, 4.0)``; None for a name that is not an amortized method."""
    m = _NAME.match(method)
    return (m.group(1), int(m.group(2)), float(m.group(3))) if m else None


class AmortizedEngine(Engine):
    """Serialized DSA whose sparse layers select through an :class:`AmortizedSelector` each."""

    def __init__(self, model, tok, *, every: int, factor: float, **kw):
        self.every, self.factor = every, factor
        super().__init__(model, tok, attention="dsa", **kw)

    def _build_sparse_state(self) -> None:
        super()._build_sparse_state()
        for i, meta in enumerate(self.metas):
            if meta is not None:  # built fresh after every prefill: the first decode step scans
                meta.amortized = AmortizedSelector(meta, self.caches[i], self.every, self.factor)

    def scan_share(self) -> float:
        """Share of (layer, sequence) steps that ran a full scan so far."""
        sels = [m.amortized for m in self.metas if m is not None]
        steps = sum(int(s.step) * s.scans.numel() for s in sels)
        return sum(int(s.scans.sum()) for s in sels) / max(steps, 1)


def make_amortized_engine(model, tok, method: str, budget: int, n_dense_layers: int = 2) -> Engine:
    selector, every, factor = parse_method(method)
    return AmortizedEngine(model, tok, every=every, factor=factor, sparse=SparseConfig.from_budget(selector, budget),
                           n_dense_layers=n_dense_layers)


def agreement(rows: list[dict]) -> list[dict]:
    """Per amortized method and budget: the share of task instances whose output is identical to (and whose
    score equals) the full-scan method's on the same instance."""
    full = {(r["task"], r["length"], r["seed"], r["method"], r["budget"]): r for r in rows}
    acc: dict = {}
    for r in rows:
        p = parse_method(r["method"])
        if p is None:
            continue
        base = full.get((r["task"], r["length"], r["seed"], p[0], r["budget"]))
        if base is None:
            continue
        a = acc.setdefault((r["method"], r["budget"]), [0, 0, 0])
        a[0] += 1
        a[1] += r["output"] == base["output"]
        a[2] += r["score"] == base["score"]
    return [{"method": m, "budget": b, "instances": n, "same_output": round(s / n, 4), "same_score": round(t / n, 4)}
            for (m, b), (n, s, t) in sorted(acc.items())]
