"""``prr eval``: task accuracy and teacher-forced perplexity of dense, DSA and PRR attention on a real model.

Each task instance is prefilled once, densely; every method starts from that prefill (:meth:`Engine.
adopt_prefill`) and decodes greedily. Perplexity feeds the true next tokens of real text through the decode
path (every token after the prefix goes through the method's attention), so sparse attention and its repair
affect every scored token.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
import warnings

import torch
from tqdm import tqdm

from ..algo.sparse import SparseConfig
from ..model.engine import Engine
from ..model.prompts import pydoc_text
from .tasks import make_task

# name -> (engine attention, selector, PRR mode)
METHODS = {
    "dense": ("dense", "quest", None),
    "quest": ("dsa", "quest", None),
    "infllm_v2": ("dsa", "infllm_v2", None),
    "prr_exact": ("prr", "quest", "exact"),
    "prr_union": ("prr", "quest", "union"),
    "predicted": ("prr", "quest", "predicted"),  # the ablation: P alone, no repair
}


def make_engine(model, tok, method: str, budget: int, ratio: float = 1.0, n_dense_layers: int = 2) -> Engine:
    from .amortized import make_amortized_engine, parse_method  # quest_m16c4 etc. (issue #12)

    if method not in METHODS and parse_method(method):
        return make_amortized_engine(model, tok, method, budget, n_dense_layers)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    attention, selector, mode = METHODS[method]
    return Engine(model, tok, attention=attention, sparse=SparseConfig.from_budget(selector, budget), ratio=ratio,
                  mode=mode or "exact", n_dense_layers=n_dense_layers)


def _configs(methods, budgets):
    for m in methods:
        for b in ([None] if m == "dense" else budgets):
            yield m, b


def run_tasks(model, tok, tasks, lengths, methods, budgets, seeds=(0,), ratio=1.0, progress=True) -> list[dict]:
    rows = []
    jobs = [(t, n, s) for n in lengths for t in tasks for s in seeds]
    for task, length, seed in tqdm(jobs, desc="eval tasks", unit="instance", disable=not progress):
        inst = make_task(tok, task, length, seed=seed)
        base = Engine(model, tok)
        base.prefill(inst.ids, inst.max_new_tokens)
        tokens_by = {}
        for method, budget in _configs(methods, budgets):
            eng = make_engine(model, tok, method, budget or 1024, ratio)
            out, st = eng.generate(inst.ids, inst.max_new_tokens, prefilled_from=base)
            text = tok.decode(out)
            tokens_by[(method, budget)] = out
            rows.append({"task": task, "length": length, "prompt_tokens": len(inst.ids), "seed": seed,
                         "method": method, "budget": budget, "score": inst.score(text), "output": text,
                         "answers": inst.answers, "hit_rate": st.hit_rate,
                         "ms_per_token": round(st.ms_per_token, 2)})
        for r in rows[-len(tokens_by):]:  # does PRR exact reproduce DSA (Quest, same budget) token for token?
            if r["method"] == "prr_exact":
                quest = tokens_by.get(("quest", r["budget"]))
                r["same_tokens_as_quest"] = tokens_by[("prr_exact", r["budget"])] == quest
    return rows


@torch.inference_mode()
def teacher_forced_nll(eng: Engine, ids: list[int], prefix: int, steps: int) -> float:
    """Mean NLL of ``ids[prefix : prefix+steps]``, each predicted after feeding the true previous token
    through the engine's decode path (the first from the prefill's last logits).

    The user's decode path: on a GPU (``eng.graphs``) the first step runs eagerly (it compiles the kernels),
    then the step is captured in one CUDA graph and replayed, as generation does; the NLL is summed on the
    device (float64, in step order: the same number as summing on the host) and read once at the end."""
    logits = eng._last_logits
    # The targets live where the logits do (a CPU target beside CUDA logits fails in cross_entropy).
    targets = torch.tensor(ids[prefix:prefix + steps], device=logits.device)
    use_graph = bool(getattr(eng, "graphs", False)) and eng.model.device.type == "cuda"
    graph, total = None, None
    for i in range(steps):
        target = targets[i:i + 1]
        ce = torch.nn.functional.cross_entropy(logits.float(), target).double()
        total = ce if total is None else total + ce
        tokens = target.to(eng.model.device)
        logits = graph.run(tokens) if graph is not None else eng.step(tokens)
        if use_graph and graph is None:
            try:
                graph = eng.capture(eng.decode_step)
            except RuntimeError as e:  # keep going eagerly, and say why
                use_graph = False
                warnings.warn(f"perplexity: decode step not captured in a CUDA graph, stepping eagerly: {e}",
                              stacklevel=2)
    return float(total) / steps


def run_perplexity(model, tok, length: int, steps: int, methods, budgets, ratio=1.0, progress=True) -> list[dict]:
    ids = tok.encode(pydoc_text())[: length + steps]
    prefix = length
    base = Engine(model, tok)
    base.prefill(ids[:prefix], steps + 1)
    rows = []
    for method, budget in tqdm(list(_configs(methods, budgets)), desc=f"perplexity {length}", disable=not progress):
        eng = make_engine(model, tok, method, budget or 1024, ratio)
        eng.adopt_prefill(base)
        t0 = time.perf_counter()
        nll = teacher_forced_nll(eng, ids, prefix, steps)
        rows.append({"length": length, "steps": steps, "method": method, "budget": budget, "nll": nll,
                     "perplexity": math.exp(nll), "seconds": round(time.perf_counter() - t0, 1)})
    dense = next((r["perplexity"] for r in rows if r["method"] == "dense"), None)
    for r in rows:
        r["vs_dense_pct"] = None if dense is None else round(100 * (r["perplexity"] / dense - 1), 2)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean score per (length, method, budget) over tasks and seeds."""
    acc: dict = {}
    for r in rows:
        acc.setdefault((r["length"], r["method"], r["budget"]), []).append(r["score"])
    return [{"length": k[0], "method": k[1], "budget": k[2], "accuracy": round(100 * sum(v) / len(v), 1),
             "instances": len(v)} for k, v in sorted(acc.items(), key=lambda x: (x[0][0], x[0][1], x[0][2] or 0))]


def save(out: str, payload: dict, csv_rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(payload, f, indent=1)
    if csv_rows:
        with open(os.path.splitext(out)[0] + ".csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
            w.writeheader()
            w.writerows(csv_rows)


def _budget_axis(ax, ylabel: str, title: str, legend_size: int) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)


def plot(result: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    summ = result.get("summary", [])
    for length in sorted({s["length"] for s in summ}):
        dense = [s["accuracy"] for s in summ if s["length"] == length and s["method"] == "dense"]
        for m in sorted({s["method"] for s in summ} - {"dense"}):
            pts = sorted((s["budget"], s["accuracy"]) for s in summ if s["length"] == length and s["method"] == m)
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{m} @{length}")
        if dense:
            axes[0].axhline(dense[0], ls="--", lw=0.8, color="k")
    _budget_axis(axes[0], "accuracy (%)", "task accuracy (dashed: dense)", legend_size=6)
    ppl = result.get("perplexity", [])
    dense = [r["perplexity"] for r in ppl if r["method"] == "dense"]
    for m in sorted({r["method"] for r in ppl} - {"dense"}):
        pts = sorted((r["budget"], r["perplexity"]) for r in ppl if r["method"] == m)
        axes[1].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    if dense:
        axes[1].axhline(dense[0], ls="--", lw=0.8, color="k")
    _budget_axis(axes[1], "perplexity", "teacher-forced perplexity through the decode path", legend_size=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
