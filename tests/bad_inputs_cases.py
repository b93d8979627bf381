"""The table of bad inputs (part 1: queries, selections, indices, budgets, names, prompts and generation).

A case runs a call that must raise `exc` with exactly `message` (``{tmp}``: the test's temporary directory). CLI
cases run ``prr.cli.main`` and raise :class:`CLIError` with the line it printed to stderr (exit status 2). The
cases are run by tests/test_bad_inputs.py, which also renders them as docs/ERRORS.md.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import torch

import prr
import prr.cli
from prr.model.config import ModelConfig
from prr.model.engine import CacheFull, Engine
from prr.model.llama import Llama
from prr.model.weights import load_model, random_weights

from conftest import all_blocks, make_cache, make_query


class CLIError(Exception):
    """What ``prr ...`` printed to stderr when it exited with status 2."""


@dataclass
class Case:
    id: str
    what: str  # the bad input, in words
    api: str  # the entry point that rejects it
    exc: type
    message: str
    fn: object


CASES: list[Case] = []


def case(id, what, api, exc, message):
    def deco(fn):
        CASES.append(Case(id, what, api, exc, message, fn))
        return fn

    return deco


def cli(*argv) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = prr.cli.main(list(argv))
    lines = [x for x in err.getvalue().splitlines() if x.strip()]
    assert rc == 2, f"exit status {rc}, stderr: {err.getvalue()}"
    raise CLIError(lines[-1])


def setup():
    """A float64 cache of two sequences (100 and 50 tokens, capacity 128, 2 KV heads, d 64), 8 query heads,
    and a selection of every live block (16-token blocks: 7 and 4 blocks, K_max = 8)."""
    cache = make_cache([100, 50], hkv=2, d=64, capacity=128)
    q = make_query(cache, 4)
    idx, cnt = all_blocks(cache, 16)
    return cache, q, idx, cnt


TINY = ModelConfig(vocab_size=64, hidden=32, ffn=64, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8,
                   max_context=64)


def tiny_model():
    return Llama(TINY, random_weights(TINY, dtype=torch.float32))


# ---- queries ------------------------------------------------------------------------------------------------
@case("q-shape", "q with the wrong head dimension", "prr.sparse_decode (every op taking q)", ValueError,
      "q must have shape [2, *, 64], got [2, 8, 32]")
def _(tmp):
    cache, q, idx, cnt = setup()
    prr.sparse_decode(q[..., :32], cache, idx, cnt, 16)


@case("q-ndim", "q without the batch dimension", "prr.dense_decode", ValueError,
      "q must have 3 dimensions, got shape (8, 64)")
def _(tmp):
    cache, q, _, _ = setup()
    prr.dense_decode(q[0], cache)


@case("q-dtype", "q in another dtype than the cache", "prr.dense_decode", TypeError,
      "q has dtype torch.float32 but the cache has torch.float64; they must match")
def _(tmp):
    cache, q, _, _ = setup()
    prr.dense_decode(q.float(), cache)


@case("q-device", "q on another device than the cache", "prr.dense_decode", ValueError,
      "q is on meta but must be on cpu (same device as the cache)")
def _(tmp):
    cache, q, _, _ = setup()
    prr.dense_decode(q.to("meta"), cache)


@case("q-nan", "NaN in q", "prr.sparse_decode", ValueError, "q contains NaN (first at [1, 3, 5])")
def _(tmp):
    cache, q, idx, cnt = setup()
    q[1, 3, 5] = float("nan")
    prr.sparse_decode(q, cache, idx, cnt, 16)


@case("q-inf", "inf in q", "prr.quest_scores (every op taking q)", ValueError, "q contains inf (first at [0, 2, 7])")
def _(tmp):
    cache, q, _, _ = setup()
    q[0, 2, 7] = float("-inf")
    kmin, kmax = prr.quest_metadata(cache, 16)
    prr.quest_scores(q, kmin, kmax, cache, 16)


@case("gqa-ratio", "query heads not a multiple of the KV heads", "prr.sparse_decode", ValueError,
      "the number of query heads (Hq=5) must be a multiple of the number of KV heads (Hkv=2)")
def _(tmp):
    cache, q, idx, cnt = setup()
    prr.sparse_decode(q[:, :5], cache, idx, cnt, 16)


@case("model-gqa", "a model config whose query heads do not divide into the KV heads", "prr.model.ModelConfig",
      ValueError, "the number of query heads (Hq=6) must be a multiple of the number of KV heads (Hkv=4)")
def _(tmp):
    TINY.replace(num_q_heads=6, num_kv_heads=4)


# ---- selections and other indices ------------------------------------------------------------------------------
@case("indices-dtype", "float block indices", "prr.sparse_decode", TypeError,
      "indices must have dtype in (int32, int64), got float32")
def _(tmp):
    cache, q, idx, cnt = setup()
    prr.sparse_decode(q, cache, idx.float(), cnt, 16)


@case("indices-shape", "a selection for the wrong number of KV heads", "prr.sparse_decode", ValueError,
      "indices must have shape [2, 2, *], got [2, 1, 8]")
def _(tmp):
    cache, q, idx, cnt = setup()
    prr.sparse_decode(q, cache, idx[:, :1], cnt, 16)


@case("block-id-past-end", "a block id past the cache's end (300 tokens = 19 blocks, id 999)",
      "prr.sparse_decode (every op taking a selection)", ValueError,
      "indices[0, 0, 1] = 999 is out of range: the cache holds 19 blocks per sequence, so a block id must lie in "
      "[0, 18] (or be -1, padding)")
def _(tmp):
    cache = make_cache([300], hkv=1, d=64)
    q = make_query(cache, 2)
    idx = torch.tensor([[[0, 999, 18]]], dtype=torch.int32)
    prr.sparse_decode(q, cache, idx, torch.tensor([[3]], dtype=torch.int32), 16)


@case("block-id-negative", "a negative block id other than the padding -1", "prr.block_states", ValueError,
      "indices[1, 0, 0] = -7 is out of range: the cache holds 8 blocks per sequence, so a block id must lie in "
      "[0, 7] (or be -1, padding)")
def _(tmp):
    cache, q, idx, cnt = setup()
    idx[1, 0, 0] = -7
    prr.ops.block_states(q, cache, idx, cnt, 16)


@case("counts-over-capacity", "a count larger than the selection's capacity", "prr.sparse_decode", ValueError,
      "counts[0, 1] = 9 is out of range: it must lie in [0, 8] (the selection's capacity K_max = 8)")
def _(tmp):
    cache, q, idx, cnt = setup()
    cnt[0, 1] = 9
    prr.sparse_decode(q, cache, idx, cnt, 16)


@case("counts-negative", "a negative count", "prr.sparse_decode", ValueError,
      "counts[1, 0] = -1 is out of range: it must lie in [0, 8] (the selection's capacity K_max = 8)")
def _(tmp):
    cache, q, idx, cnt = setup()
    cnt[1, 0] = -1
    prr.sparse_decode(q, cache, idx, cnt, 16)


@case("duplicate-block", "a block twice in one selection row", "prr.sparse_decode", ValueError,
      "indices[0, 1] holds block 3 twice: a selection must not repeat a block (it would be attended and weighted "
      "twice)")
def _(tmp):
    cache, q, idx, cnt = setup()
    idx[0, 1, 5] = 3
    prr.sparse_decode(q, cache, idx, cnt, 16)


@case("duplicate-in-p", "a repeated block in PRR's speculated set P", "prr.ops.repair_combine", ValueError,
      "p_idx[0, 0] holds block 2 twice: a selection must not repeat a block (it would be attended and weighted "
      "twice)")
def _(tmp):
    cache, q, idx, cnt = setup()
    bo, blse = prr.ops.block_states(q, cache, idx, cnt, 16)
    p = idx.clone()
    p[0, 0, 4] = 2
    prr.ops.repair_combine(q, cache, 16, p, cnt, idx, cnt, block_o=bo, block_lse=blse)


@case("repair-states-shape", "speculation states of the wrong shape", "prr.ops.repair_combine", ValueError,
      "block_o must have shape [2, 8, 8, 64], got [2, 8, 4, 64]")
def _(tmp):
    cache, q, idx, cnt = setup()
    bo, blse = prr.ops.block_states(q, cache, idx, cnt, 16)
    prr.ops.repair_combine(q, cache, 16, idx, cnt, idx, cnt, block_o=bo[:, :, :4], block_lse=blse)


@case("repair-mode-states", "union mode without the speculation's merged state", "prr.ops.repair_combine",
      ValueError, "union mode needs spec_o and spec_lse (the merged state of P)")
def _(tmp):
    cache, q, idx, cnt = setup()
    prr.ops.repair_combine(q, cache, 16, idx, cnt, idx, cnt, mode="union")


@case("page-table-range", "a page-table entry outside the page pool", "prr.KVCache (and every op on it)", ValueError,
      "cache.page_table[0, 1] = 99 is out of range: sequence 0 uses 2 pages, each must lie in [0, 3] (the pool "
      "holds 4 pages)")
def _(tmp):
    z = torch.zeros(4, 1, 16, 8)
    prr.KVCache(z, z.clone(), torch.tensor([[0, 99]], dtype=torch.int32), torch.tensor([20], dtype=torch.int32))


@case("page-table-edited", "a page table corrupted after the cache was built", "prr.dense_decode", ValueError,
      "cache.page_table[1, 2] = -1 is out of range: sequence 1 uses 4 pages, each must lie in [0, 15] (the pool "
      "holds 16 pages)")
def _(tmp):
    cache, q, _, _ = setup()
    cache.page_table[1, 2] = -1
    prr.dense_decode(q, cache)


@case("seq-len-capacity", "a sequence length beyond the cache's capacity", "prr.KVCache", ValueError,
      "seq_lens must lie in [0, capacity=32] (max_pages=2 x page_size=16); got up to 40")
def _(tmp):
    z = torch.zeros(2, 1, 16, 8)
    prr.KVCache(z, z.clone(), torch.tensor([[0, 1]]), torch.tensor([40]))


@case("append-full", "appending to a full cache", "prr.KVCache.append", ValueError,
      "seq_lens must lie in [0, capacity=32] (max_pages=2 x page_size=16); got up to 33")
def _(tmp):
    cache = prr.KVCache.allocate(1, 32, 1, 8)
    cache.write(torch.randn(1, 1, 32, 8), torch.randn(1, 1, 32, 8), torch.tensor([32], dtype=torch.int32))
    cache.append(torch.randn(1, 1, 8), torch.randn(1, 1, 8))


@case("metadata-empty", "a metadata append on an empty sequence", "prr.quest_metadata_append", ValueError,
      "cache.seq_lens[0] = 0 is out of range: it must lie in [1, 32] (metadata appends run after KVCache.append: "
      "every sequence needs a newest token)")
def _(tmp):
    cache = prr.KVCache.allocate(1, 32, 1, 8)
    kmin, kmax = prr.quest_metadata(cache, 16)
    prr.quest_metadata_append(kmin, kmax, cache, 16)


@case("num-blocks-range", "more blocks than the scores cover", "prr.select_blocks", ValueError,
      "num_blocks[0] = 9 is out of range: it must lie in [0, 8] (scores cover N_max = 8 blocks)")
def _(tmp):
    prr.select_blocks(torch.zeros(1, 1, 8), torch.tensor([9]), top_k=2)


@case("scores-nan", "NaN in block scores", "prr.select_blocks", ValueError, "scores contains NaN (first at [0, 0, 3])")
def _(tmp):
    s = torch.zeros(1, 2, 8)
    s[0, 0, 3] = float("nan")
    prr.select_blocks(s, torch.tensor([8]), top_k=2)


@case("guess-and-prev", "both a threshold and a previous selection for the guessed top-K",
      "prr.select_blocks_guessed", ValueError,
      "give exactly one of guess (a threshold per row) and prev (a selection whose blocks bound the threshold)")
def _(tmp):
    idx, cnt = prr.select_blocks(torch.zeros(1, 2, 40), torch.tensor([40]), top_k=4)
    prr.select_blocks_guessed(torch.zeros(1, 2, 40), torch.tensor([40]), 4, guess=torch.zeros(1, 2), prev=(idx, cnt))


@case("prev-shape", "a previous selection of another batch or head count", "prr.select_blocks_guessed", ValueError,
      "prev indices must have shape [1, 2, *], got [1, 3, 7]")
def _(tmp):
    idx, cnt = prr.select_blocks(torch.zeros(1, 3, 40), torch.tensor([40]), top_k=4)
    prr.select_blocks_guessed(torch.zeros(1, 2, 40), torch.tensor([40]), 4, prev=(idx, cnt))


@case("guess-k-small", "a next-guess count below K", "prr.select_blocks_guessed", ValueError,
      "guess_k (3) must be at least top_k (4)")
def _(tmp):
    prr.select_blocks_guessed(torch.zeros(1, 2, 40), torch.tensor([40]), 4, guess=torch.zeros(1, 2), guess_k=3)


@case("ckeys-shape", "compressed keys not covering the cache", "prr.infllm_scores", ValueError,
      "ckeys must have shape [2, 2, 7, 64], got [2, 2, 3, 64]")
def _(tmp):
    cache, q, _, _ = setup()
    ck = prr.infllm_metadata(cache)
    prr.infllm_scores(q, ck[:, :, :3], cache)


@case("lse-nan", "NaN in a partial state's log-sum-exp", "prr.merge_states", ValueError,
      "lse contains NaN (first at [1, 0])")
def _(tmp):
    lse = torch.zeros(2, 3)
    lse[1, 0] = float("nan")
    prr.merge_states(torch.zeros(2, 3, 8), lse)


@case("merge-shape", "partial outputs and log-sum-exps that do not match", "prr.merge_states", ValueError,
      "o must be [..., N, D] and lse [..., N]; got o [2, 3, 8], lse [2, 4]")
def _(tmp):
    prr.merge_states(torch.zeros(2, 3, 8), torch.zeros(2, 4))


# ---- budgets, ratios, names ------------------------------------------------------------------------------------
@case("block-size-pow2", "a block size that is not a power of two", "prr.sparse_decode, prr.SparseConfig",
      ValueError, "block_size must be a power of two, got 24")
def _(tmp):
    cache, q, idx, cnt = setup()
    prr.sparse_decode(q, cache, idx, cnt, 24)


@case("block-size-page", "a block smaller than a page", "prr.quest_metadata (every op taking block_size)",
      ValueError, "block_size=8 must be a multiple of the page size (16)")
def _(tmp):
    cache, _, _, _ = setup()
    prr.quest_metadata(cache, 8)


@case("top-k-zero", "a budget of no dynamic block", "prr.SparseConfig, prr.select_blocks", ValueError,
      "top_k must be > 0, got 0")
def _(tmp):
    prr.SparseConfig(top_k=0)


@case("budget-too-small", "a token budget that the forced blocks use up", "prr.SparseConfig.from_budget, --budget",
      ValueError, "budget_tokens=32 leaves no dynamic block (block_size=16, n_sink=1, n_local=2)")
def _(tmp):
    prr.SparseConfig.from_budget("quest", 32)


@case("ratio-zero", "a speculation ratio of 0", "prr.prr_step, prr.speculative_top_k, --ratio", ValueError,
      "ratio must be a positive number, got 0.0")
def _(tmp):
    prr.speculative_top_k(8, 0.0)


@case("ratio-nan", "a NaN speculation ratio", "prr.model.Engine", ValueError,
      "ratio must be a positive number, got nan")
def _(tmp):
    Engine(tiny_model(), attention="prr", ratio=float("nan"))


@case("unknown-method", "an unknown DSA method", "prr.SparseConfig", ValueError,
      "unknown method 'qwest'; expected one of 'quest', 'infllm_v2', 'oracle'")
def _(tmp):
    prr.SparseConfig(method="qwest")


@case("unknown-attention", "an unknown attention for the engine", "prr.model.Engine", ValueError,
      "unknown attention 'sparse'; expected one of 'dense', 'dsa', 'prr', 'auto'")
def _(tmp):
    Engine(tiny_model(), attention="sparse")


@case("unknown-overlap", "an unknown place for PRR's speculation", "prr.model.Engine, prr.runtime.StepSettings",
      ValueError, "unknown overlap 'attention'; expected one of 'selection', 'topk'")
def _(tmp):
    Engine(tiny_model(), attention="prr", overlap="attention")


@case("previous-predictor-ratio", "P from the previous selection with K' other than K", "prr.model.Engine",
      ValueError, "predictor='previous' speculates over the previous selection (K' = K): ratio must be 1, got 1.5")
def _(tmp):
    Engine(tiny_model(), attention="prr", predictor="previous", ratio=1.5)


@case("unknown-preset", "an unknown model preset", "prr.model.ModelConfig.from_name", ValueError,
      "unknown model 'llama-9'; expected one of smollm2-135m, llama-3.1-8b, llama-3.1-70b, glm-4-9b, glm-4-9b-1m, "
      "qwen3-8b")
def _(tmp):
    ModelConfig.from_name("llama-9")


@case("unknown-model", "a --model that is no file, directory or preset", "prr.model.load_model, --model",
      ValueError, "unknown model 'llama-9': expected smollm2, a .gguf file, a checkpoint directory, or one of "
      "smollm2-135m, llama-3.1-8b, llama-3.1-70b, glm-4-9b, glm-4-9b-1m, qwen3-8b (random weights)")
def _(tmp):
    load_model("llama-9")


@case("unknown-backend", "an unknown kernel backend", "prr.ops.backend.use_backend, PRR_BACKEND", ValueError,
      "unknown backend 'cuda'; expected one of auto, triton, reference")
def _(tmp):
    with prr.ops.backend.use_backend("cuda"):
        pass


@case("unknown-pdl-mode", "an unknown programmatic-dependent-launch mode", "prr.ops.backend.use_pdl, PRR_PDL",
      ValueError, "unknown PDL mode 'yes'; expected one of auto, on, off")
def _(tmp):
    with prr.ops.backend.use_pdl("yes"):
        pass


# ---- prompts and generation ------------------------------------------------------------------------------------
@case("prompt-over-window", "a prompt plus new tokens longer than the model's context", "prr.model.Engine.generate",
      ValueError, "prompt (60 tokens) + max_new_tokens (8) exceeds the model's context of 64 tokens")
def _(tmp):
    Engine(tiny_model()).generate(list(range(60)), 8)


@case("prompt-empty", "an empty prompt", "prr.model.Engine.generate", ValueError, "the prompt is empty")
def _(tmp):
    Engine(tiny_model()).generate([], 4)


@case("cache-full", "a generation that outgrows the cache it was given (prefilled for 2 new tokens, asked for 10)",
      "prr.model.Engine.generate (raises CacheFull, a ValueError, with .tokens)", CacheFull,
      "the KV cache is full (32 tokens: a 30-token prompt and 3 generated tokens); the tokens generated so far are "
      "returned with this error (CacheFull.tokens)")
def _(tmp):
    # The caches hold whole 16-token pages: 30 + 2 tokens fill two pages exactly.
    model, prompt = tiny_model(), list(range(1, 31))
    base = Engine(model)
    base.prefill(prompt, 2)
    Engine(model).generate(prompt, 10, prefilled_from=base)


@case("tp-size", "a tensor-parallel size that does not divide the KV heads (3 ranks, 8 KV heads)",
      "prr.model.tp (torchrun --nproc-per-node N, --tp N)", ValueError,
      "tensor parallelism over 3 ranks needs the KV heads (8) divisible by 3; this model runs on 1, 2, 4, 8 ranks")
def _(tmp):
    from prr.model.tp import check_divides

    check_divides(ModelConfig.from_name("llama-3.1-8b"), 3)
