"""The speculation budget: how many blocks to speculate, or whether to speculate at all, on this GPU.

First the top-K: the guessed top-K (:func:`prr.ops.select_blocks_guessed`, its previous selection from the
step before) is timed against the full one, the selections and then DSA's whole steps; the guessed one is kept
only where both are cheaper by ``min_gain`` (the same S either way). Then, with that selection's time as
``t_sel``, PRR's step costs ``max(t_sel, t_spec(K')) + t_repair + t_rest`` against DSA's ``t_sel + t_att``.
From times measured on the GPU in use, :func:`choose_budget` takes the largest K' whose speculation hides
under the selection (if none does, the cheapest), models the step at the measured hit rate, and switches
speculation off when the modelled gain is under ``min_gain`` (2%). The model ignores that speculation and
selection share the GPU (at batch 8 the selection slows by half beside it), so when the model says "on", the
overlapped step itself is timed against serialized DSA at the few K' the model favours and the best is kept
(:func:`confirm_best`, :func:`confirm_budget`); any doubt (a measured gain under 2%, or no measurement that
succeeds) leaves speculation off. Decisions are cached per
(GPU, shapes, context bucket) in a JSON file under the user cache directory.
"""

from __future__ import annotations

import dataclasses
import math

from ..jsoncache import JsonCache


@dataclasses.dataclass
class BudgetDecision:
    spec_k: int | None  # dynamic blocks to speculate; None = serialized DSA (with `topk`'s search)
    t_dsa_us: float  # DSA with `topk`'s search
    t_prr_us: float  # modelled (or measured) PRR step at that K'
    gain: float  # 1 - t_prr / t_dsa
    reason: str
    topk: str = "full"  # "guessed" or "full": the top-K search that measured cheaper
    t_full_us: float | None = None  # serialized DSA with the full top-K (the paper's baseline)

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


def confirm_budget(decision: BudgetDecision, t_dsa_us: float, t_prr_us: float,
                   min_gain: float = 0.02) -> BudgetDecision:
    """Keep a modelled "on" only if the overlapped PRR step, timed, beats serialized DSA by ``min_gain``."""
    if not decision.enabled:
        return decision
    gain = 1.0 - t_prr_us / t_dsa_us
    why = (f"measured overlapped step {t_prr_us:.1f} vs serialized {t_dsa_us:.1f} us at K'={decision.spec_k} "
           f"(the model said {decision.t_prr_us:.1f} vs {decision.t_dsa_us:.1f} us)")
    if gain < min_gain:
        return BudgetDecision(None, t_dsa_us, t_prr_us, gain, f"off: gain {gain:+.1%} < {min_gain:.0%}; {why}")
    return BudgetDecision(decision.spec_k, t_dsa_us, t_prr_us, gain, f"on: gain {gain:+.1%}; {why}")


def confirm_best(decision: BudgetDecision, t_sel: float, t_att: float, t_spec: dict[int, float],
                 t_repair: dict[int, float], measure, min_gain: float = 0.02, limit: int = 3) -> BudgetDecision:
    """Confirm a modelled "on" by timing the overlapped step at up to ``limit`` K' the model gives a gain
    (best modelled first, the chosen K' always among them) and keep the K' that measured best: the model
    picks the largest K' that hides, which contention can make lose while a smaller one wins (GLM-4-9B b1
    32K, budget 8192: 1.5K measured -1.8%, K measured +6%). ``measure(k) -> (t_dsa, t_prr)``; a K' whose
    measurement fails is skipped, and with none measured speculation stays off."""
    if not decision.enabled:
        return decision
    modelled = {k: max(t_sel, t_spec[k]) + t_repair[k] for k in t_spec}
    cands = sorted((k for k in modelled if modelled[k] < t_sel + t_att), key=modelled.get)[:limit]
    if decision.spec_k not in cands:
        cands = [decision.spec_k, *cands[: limit - 1]]
    best, errors = None, []
    for k in cands:
        try:
            t_d, t_p = measure(k)
        except Exception as e:  # never speculate on a step that could not be measured
            errors.append(f"K'={k}: {e!r}")
            continue
        if best is None or t_p / t_d < best[2] / best[1]:
            best = (k, t_d, t_p)
    if best is None:
        return BudgetDecision(None, decision.t_dsa_us, decision.t_prr_us, 0.0,
                              f"off: the overlapped step could not be measured ({'; '.join(errors)}); "
                              f"{decision.reason}")
    k, t_d, t_p = best
    picked = BudgetDecision(k, decision.t_dsa_us, modelled[k], decision.gain, decision.reason)
    return confirm_budget(picked, t_d, t_p, min_gain=min_gain)


def _time_step_graph(step) -> float:
    """The default timer of the confirmations below: capture the step's CUDA graph and time its replay."""
    from ..timing import time_graph

    step.capture()
    return time_graph(step.graph)


def measure_steps(cache, meta, q, p_idx, p_cnt, spec_k: int, mode: str = "exact", timer=None, prev=None,
                  overlap: str = "selection"):
    """DSA and PRR's critical path (speculation over the given P beside the selection, or beside its top-K alone
    with ``overlap="topk"``, then the repair; no tail), each a :class:`prr.runtime.LayerStep` with the guessed
    top-K started from ``prev`` (a selection; default: this query's own, an optimistic guess): ``(t_dsa, t_prr)``
    from ``timer(step)`` (default: capture a CUDA graph and time its replay)."""
    from ..algo.sparse import select
    from ..algo.step import StepCounts
    from .layer import LayerStep, StepProbe

    cfg = meta.cfg
    timer = timer or _time_step_graph
    if prev is None:
        s = select(q, cache, meta)
        prev = (s.indices, s.counts)
    counts = StepCounts.of(cache.seq_lens, cfg, cache.num_kv_heads)  # counted once per token in a model
    hold = StepProbe(tail=False, hold_prediction=True)
    dsa = LayerStep(cache, meta, q.shape[1], method="dsa", topk="guessed", counts=counts, probe=hold)
    prr = LayerStep(cache, meta, q.shape[1], method="prr", ratio=spec_k / cfg.top_k, mode=mode, counts=counts,
                    probe=hold, overlap=overlap)
    if prr.spec_k != spec_k or tuple(prr.p_idx.shape) != tuple(p_idx.shape):
        raise ValueError(f"the step's K' ({prr.spec_k}, P {tuple(prr.p_idx.shape)}) does not match the "
                         f"prediction's ({spec_k}, {tuple(p_idx.shape)})")
    for step in (dsa, prr):
        step.seed(prev, (p_idx, p_cnt))
        step.q.copy_(q)
    return timer(dsa), timer(prr)


def measure_dsa_steps(cache, meta, q, prev, timer=None):
    """Serialized DSA's step on the full and on the guessed top-K (started from the selection ``prev``), each a
    :class:`prr.runtime.LayerStep`: ``(t_full, t_guessed)`` from ``timer(step)`` (default: capture a CUDA
    graph and time its replay)."""
    from ..algo.step import StepCounts
    from .layer import LayerStep, StepProbe

    timer = timer or _time_step_graph
    counts = StepCounts.of(cache.seq_lens, meta.cfg, cache.num_kv_heads)
    times = []
    for topk in ("full", "guessed"):
        step = LayerStep(cache, meta, q.shape[1], method="dsa", topk=topk, counts=counts,
                         probe=StepProbe(tail=False, hold_prediction=True))
        step.seed(prev)
        step.q.copy_(q)
        times.append(timer(step))
    return times[0], times[1]


# Hit rates measured on real-model traces (DESIGN.md section 3: Holt, K = 64, SmolLM2): 0.80 at K' = K,
# 0.94 at K' = 1.5K; linear in between, and assumed to fall at the same rate below K.
def trace_hit_rate(ratio: float) -> float:
    return float(min(1.0, max(0.0, 0.80 + (ratio - 1.0) * (0.94 - 0.80) / 0.5)))


def profile_budget(cache, meta, q, *, q_prev=None, ratios=(0.5, 0.75, 1.0, 1.25, 1.5), hit_rate=trace_hit_rate,
                   mode: str = "exact", min_gain: float = 0.02, budget_cache: BudgetCache | None = None,
                   refresh: bool = False, gpu_name: str | None = None, overlap: str = "selection") -> BudgetDecision:
    """Time the full and the guessed top-K, then selection, attention, speculation and repair over a sweep of K'
    on the GPU in use, choose K' (:func:`choose_budget`) and cache the decision per (GPU, shapes, context
    bucket).

    ``q_prev``: the step before's query (its selection starts the guessed top-K, as in decoding; default:
    ``q`` itself, which flatters the guess). `hit_rate(ratio)` gives the hit rate to model for each K'/K
    (default: the real-trace rates); the repair is timed with a prediction that hits exactly that share of
    the true selection. ``overlap``: where the confirming step runs the speculation
    (:class:`prr.runtime.StepSettings`).
    """
    import torch

    from .. import ops
    from ..algo.sparse import GuessedTopK, select
    from ..algo.step import speculative_top_k
    from ..timing import time_op

    cfg = meta.cfg
    bsz, hq, d = q.shape
    store = budget_cache or BudgetCache()
    gpu = gpu_name or torch.cuda.get_device_name(q.device)
    key = BudgetCache.key(gpu, bsz, hq, cache.num_kv_heads, d, cfg.method, cfg.budget_tokens,
                          int(cache.seq_lens.max()), mode, overlap)
    if not refresh and (hit := store.get(key)) is not None:
        return hit
    nblk = ops.num_blocks(cache.seq_lens, cfg.block_size)
    sel = select(q, cache, meta, nblk=nblk)
    before = select(q if q_prev is None else q_prev, cache, meta, nblk=nblk)
    prev = (before.indices.clone(), before.counts.clone())
    guessed = GuessedTopK(bsz, cache.num_kv_heads, cfg, device=q.device, hold=True)
    guessed.seed(*prev)
    t_full = time_op(lambda: select(q, cache, meta, nblk=nblk))
    t_guess = time_op(lambda: guessed.select(q, cache, meta, nblk))
    t_att = time_op(lambda: ops.sparse_decode(q, cache, sel.indices, sel.counts, cfg.block_size))
    why = f"selection {t_guess:.1f} vs {t_full:.1f} us with the full one"
    pays = guessed_pays(t_full, t_guess, t_att, min_gain)
    if pays:  # the selections alone can mislead (GLM-4-9B b1 32K / 8192, H100: 18.2 vs 19.0 us, yet its DSA step
        # measured 28.9 vs 27.9): confirm on DSA's whole step, each top-K's
        s_full, s_guess = measure_dsa_steps(cache, meta, q, prev)
        pays = guessed_pays(s_full, s_guess, 0.0, min_gain)
        why += f"; DSA step {s_guess:.1f} vs {s_full:.1f} us"
    if not pays:
        dec = BudgetDecision(None, t_full + t_att, t_full + t_att, 0.0,
                             f"off: the guessed top-K does not pay here ({why}): serialized DSA", topk="full",
                             t_full_us=t_full + t_att)
        store.put(key, dec)
        return dec
    t_sel = t_guess
    t_spec, t_rep = {}, {}
    for r in ratios:
        k = speculative_top_k(cfg.top_k, r)
        p_idx, p_cnt = _prediction_with_hit_rate(sel, nblk, cfg, k, hit_rate(r))
        exact = mode == "exact"
        spec_op = ops.block_states if exact else ops.sparse_decode
        t_spec[k] = time_op(lambda p=p_idx, c=p_cnt, f=spec_op: f(q, cache, p, c, cfg.block_size))
        o_p = spec_op(q, cache, p_idx, p_cnt, cfg.block_size)
        spec = {"block_o": o_p[0], "block_lse": o_p[1]} if exact else {"spec_o": o_p[0], "spec_lse": o_p[1]}
        t_rep[k] = time_op(lambda p=p_idx, c=p_cnt, sp=spec: ops.repair_combine(
            q, cache, cfg.block_size, p, c, sel.indices, sel.counts, mode=mode, **sp))
    dec = choose_budget(t_sel, t_att, t_spec, t_rep, min_gain=min_gain)

    def measure(k):
        p_idx, p_cnt = _prediction_with_hit_rate(sel, nblk, cfg, k, hit_rate(k / cfg.top_k))
        return measure_steps(cache, meta, q, p_idx, p_cnt, k, mode, prev=prev, overlap=overlap)

    # the model ignores contention between the branches: time the overlapped step itself
    dec = confirm_best(dec, t_sel, t_att, t_spec, t_rep, measure, min_gain=min_gain)
    dec = dataclasses.replace(dec, topk="guessed", t_full_us=t_full + t_att,
                              reason=f"{dec.reason}; guessed top-K: selection {t_guess:.1f} vs {t_full:.1f} us")
    store.put(key, dec)
    return dec


def guessed_pays(t_full: float, t_guess: float, t_att: float, min_gain: float = 0.02) -> bool:
    """Whether DSA's step on the guessed top-K beats it on the full one by at least ``min_gain`` of the step
    (selection + attention): a smaller edge is within the timing's noise, and a whole model measured it as a
    loss (H100, Llama-3.1-8B 128K b1: selections 34.3 against 34.7 us, 0.98x DSA's tokens/s)."""
    return t_full - t_guess >= min_gain * (t_full + t_att)


def _prediction_with_hit_rate(sel, nblk, cfg, spec_k: int, hit: float, seed: int = 0):
    """A selection P of K' dynamic blocks (plus forced ones) holding `hit` of S's dynamic blocks."""
    import torch

    from .. import ops

    gen = torch.Generator().manual_seed(seed)
    scores = torch.where(ops.selection_mask(sel.indices.cpu(), sel.counts.cpu(), sel.scores.shape[-1]), 1.0, 0.0)
    keep = torch.rand(scores.shape, generator=gen) < hit
    fill = torch.rand(scores.shape, generator=gen) * 0.5
    pred = torch.where(scores > 0, torch.where(keep, 2.0, 0.0), fill).to(sel.scores.device)
    return ops.select_blocks(pred, nblk, spec_k, cfg.n_sink, cfg.n_local)


def context_bucket(tokens: int) -> int:
    """Contexts are cached per power-of-two bucket of tokens."""
    return 1 << max(0, math.ceil(math.log2(max(tokens, 1))))


class BudgetCache(JsonCache):
    """Decisions keyed by (GPU name, shapes, method, budget, context bucket), in a JSON file."""

    def __init__(self, path: str | None = None):
        super().__init__("speculation_budget.json", path)

    @staticmethod
    def key(gpu: str, batch: int, hq: int, hkv: int, d: int, method: str, budget: int, tokens: int,
            mode: str = "exact", overlap: str = "selection") -> str:
        tail = "" if overlap == "selection" else f"|overlap-{overlap}"
        return f"{gpu}|b{batch}|{hq}x{hkv}x{d}|{method}|{budget}|{mode}|ctx{context_bucket(tokens)}|guessed{tail}"

    def get(self, key: str) -> BudgetDecision | None:
        d = self.get_entry(key)
        return BudgetDecision(**d) if d else None

    def put(self, key: str, decision: BudgetDecision) -> None:
        self.put_entry(key, dataclasses.asdict(decision))
