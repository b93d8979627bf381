"""The speculation budget: how many blocks to speculate, or whether to speculate at all, on this GPU.

PRR's step costs ``max(t_sel, t_spec(K')) + t_repair + t_rest`` against serialized DSA's ``t_sel + t_att``.
From times measured on the GPU in use, :func:`choose_budget` takes the largest K' whose speculation hides
under the selection (if none does, the cheapest), models the step at the measured hit rate, and switches
speculation off when the modelled gain is under ``min_gain`` (2%). Decisions are cached per (GPU, shapes,
context bucket) in a JSON file under the user cache directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os


@dataclasses.dataclass
class BudgetDecision:
    spec_k: int | None  # dynamic blocks to speculate; None = serialized DSA
    t_dsa_us: float
    t_prr_us: float  # modelled (or measured) PRR step at that K'
    gain: float  # 1 - t_prr / t_dsa
    reason: str

    @property
    def enabled(self) -> bool:
        return self.spec_k is not None


def choose_budget(t_sel: float, t_att: float, t_spec: dict[int, float], t_repair: dict[int, float],
                  t_rest: float = 0.0, min_gain: float = 0.02) -> BudgetDecision:
    """Pick K' from measured microseconds.

    Args:
        t_sel: selection (score + top-K); t_att: attention over S (serialized DSA's second half).
        t_spec: K' -> prediction + speculative attention over K' blocks.
        t_repair: K' -> reuse + repair + merge at the hit rate measured for that K'.
        t_rest: anything else PRR adds per step (the predictor update).
    """
    if not t_spec:
        raise ValueError("t_spec is empty: measure the speculation for at least one K'")
    if set(t_spec) != set(t_repair):
        raise ValueError("t_spec and t_repair must cover the same K' values")
    t_dsa = t_sel + t_att
    hidden = [k for k, t in t_spec.items() if t <= t_sel]
    k = max(hidden) if hidden else min(t_spec, key=t_spec.get)
    t_prr = max(t_sel, t_spec[k]) + t_repair[k] + t_rest
    gain = 1.0 - t_prr / t_dsa
    why = f"K'={k} {'hides under' if hidden else 'does not hide under'} the selection ({t_spec[k]:.1f} vs " \
          f"{t_sel:.1f} us); modelled {t_prr:.1f} vs serialized {t_dsa:.1f} us"
    if gain < min_gain:
        return BudgetDecision(None, t_dsa, t_prr, gain, f"off: gain {gain:+.1%} < {min_gain:.0%}; {why}")
    return BudgetDecision(k, t_dsa, t_prr, gain, f"on: gain {gain:+.1%}; {why}")


def context_bucket(tokens: int) -> int:
    """Contexts are cached per power-of-two bucket of tokens."""
    return 1 << max(0, math.ceil(math.log2(max(tokens, 1))))


class BudgetCache:
    """Decisions keyed by (GPU name, shapes, method, budget, context bucket), in a JSON file."""

    def __init__(self, path: str | None = None):
        root = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
        self.path = path or os.path.join(root, "prr", "speculation_budget.json")

    @staticmethod
    def key(gpu: str, batch: int, hq: int, hkv: int, d: int, method: str, budget: int, tokens: int,
            mode: str = "exact") -> str:
        return f"{gpu}|b{batch}|{hq}x{hkv}x{d}|{method}|{budget}|{mode}|ctx{context_bucket(tokens)}"

    def _load(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return {}

    def get(self, key: str) -> BudgetDecision | None:
        d = self._load().get(key)
        return BudgetDecision(**d) if d else None

    def put(self, key: str, decision: BudgetDecision) -> None:
        data = self._load()
        data[key] = dataclasses.asdict(decision)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self.path)  # atomic: a crash never leaves a half-written cache
