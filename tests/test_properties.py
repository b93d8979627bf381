"""Property tests (hypothesis): random shapes, lengths, GQA groups, page shuffles, selections and predictors.

- every Triton kernel under the interpreter (fp32) against its PyTorch reference, with the tolerance rule of
  test_kernels.py (error against float64 at most 2x PyTorch's own fp32 error plus one rounding step);
- the identities PRR stands on, in float64 on the reference ops: PRR exact == serialized DSA, union ==
  attention over P ∪ S, merge is associative and order-free, a full selection == dense attention;
- selections with duplicates or out-of-range ids are rejected.

Examples are derandomized (the same cases on every run, so CI failures reproduce) and a failure prints the
falsifying example, the drawn ``seed`` of the tensor contents included, and a reproduction blob
(``@reproduce_failure``). ``test_zz_case_count`` checks that a full run generated at least 500 cases.
"""

from __future__ import annotations

import collections
import math

import pytest
import torch

import prr
from prr.ops import holt as holt_ops
from prr.ops.attention import reference as ref_attn
from prr.ops.backend import use_backend
from prr.ops.holt import reference as ref_holt
from prr.ops.metadata import reference as ref_meta
from prr.ops.repair import reference as ref_repair
from prr.ops.scoring import reference as ref_score
from prr.ops.select import reference as ref_select

from conftest import make_cache

# The test extra installs hypothesis (CI has it); a machine without it (the GPU image) skips this module.
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

RAN: collections.Counter = collections.Counter()


def profile(n: int):
    return settings(max_examples=n, derandomize=True, deadline=None, print_blob=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


KERNEL, REF = profile(40), profile(80)  # interpreter kernels are ~0.1-0.4 s a call: fewer, smaller cases


# ---- strategies -----------------------------------------------------------------------------------------------
def draw_cache(data, dtype=torch.float64, max_len=130, d_choices=(16, 32), pages=(8, 16), min_capacity=1):
    """A paged cache with scattered pages, 1-2 sequences (one may be empty), 1-2 KV heads, and a query of G
    heads per KV head (1, 2 or 4) at a drawn scale (peaky or flat attention)."""
    b = data.draw(st.integers(1, 2), label="batch")
    hkv = data.draw(st.sampled_from([1, 2]), label="Hkv")
    g = data.draw(st.sampled_from([1, 2, 4]), label="G")
    d = data.draw(st.sampled_from(d_choices), label="D")
    page = data.draw(st.sampled_from(pages), label="page_size")
    lens = data.draw(st.lists(st.integers(0, max_len), min_size=b, max_size=b), label="seq_lens")
    lens[0] = max(lens[0], 1)
    spare = data.draw(st.integers(0, 40), label="spare capacity")
    seed = data.draw(st.integers(0, 2**20), label="seed")
    scale = data.draw(st.sampled_from([0.3, 1.0, 4.0]), label="q scale")
    cap = max(max(lens) + spare, min_capacity)
    cache = make_cache(lens, hkv, d, page_size=page, capacity=cap, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    q = (torch.randn(b, hkv * g, d, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return cache, q, gen


def draw_selection(data, cache, bs, gen, kmax=None, label="selection"):
    """Per (sequence, KV head): empty, full (up to K_max) or a random subset of the live blocks, sorted or
    shuffled, -1 padded."""
    nblk = prr.num_blocks(cache.seq_lens, bs).tolist()
    kmax = kmax or data.draw(st.integers(1, 10), label=f"{label} K_max")
    fill = data.draw(st.sampled_from(["empty", "full", "random"]), label=f"{label} fill")
    shuffled = data.draw(st.booleans(), label=f"{label} shuffled")
    idx = torch.full((cache.batch, cache.num_kv_heads, kmax), -1, dtype=torch.int32)
    cnt = torch.zeros(cache.batch, cache.num_kv_heads, dtype=torch.int32)
    for b, n in enumerate(nblk):
        for h in range(cache.num_kv_heads):
            most = min(n, kmax)
            c = {"empty": 0, "full": most}.get(fill, int(torch.randint(0, most + 1, (), generator=gen)))
            blocks = torch.randperm(n, generator=gen)[:c]
            blocks = blocks if shuffled else blocks.sort().values
            idx[b, h, :c] = blocks.to(torch.int32)
            cnt[b, h] = c
    return idx, cnt


def as_cache(cache, dtype):
    return prr.KVCache(cache.k.to(dtype), cache.v.to(dtype), cache.page_table, cache.seq_lens)


def assert_rule(out, ref64, own, what, cond=1.0):
    """Kernel error against float64 <= 2 x PyTorch's own fp32 error + one fp32 rounding step, propagated by the
    op's condition `cond` (fp32 errors of both are at rounding level, so either may be the smaller by chance):
    a length-D dot product's rounding bound is D eps |result| (``cond = D``); one rounding of a logit s moves
    exp(s) by |s| eps relative (``cond = 1 + max |s|``, :func:`logit_bound`)."""
    live = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(out.double()), live), f"{what}: finite entries differ"
    if not bool(live.any()):
        return
    err = (out.double() - ref64)[live].abs().max().item()
    own_err = (own.double() - ref64)[live].abs().max().item()
    step = cond * torch.finfo(torch.float32).eps * ref64[live].abs().max().item()
    assert err <= 2 * own_err + step, f"{what}: kernel error {err:.3g} > 2 x {own_err:.3g} + {step:.3g}"


def logit_bound(q, cache) -> float:
    """``1 + max |q.k| / sqrt(D)`` over all queries and cached keys (Cauchy-Schwarz)."""
    kn = cache.k.double().norm(dim=-1).max().item()
    return 1.0 + q.double().norm(dim=-1).max().item() * kn / math.sqrt(q.shape[-1])


def block_size_for(data, page):
    return data.draw(st.sampled_from([page, 2 * page, 4 * page]), label="block_size")


# ---- every kernel against its reference (interpreter, fp32) ---------------------------------------------------
@KERNEL
@given(data=st.data())
def test_sparse_decode_and_block_states_kernels(data):
    RAN["sparse_decode"] += 1
    c64, q64, gen = draw_cache(data)
    bs = block_size_for(data, c64.page_size)
    idx, cnt = draw_selection(data, c64, bs, gen)
    ref = ref_attn.sparse_decode(q64, c64, idx, cnt, bs, return_block_states=True)
    own = ref_attn.sparse_decode(q64.float(), as_cache(c64, torch.float32), idx, cnt, bs, return_block_states=True)
    with use_backend("triton"):
        out = prr.sparse_decode(q64.float(), as_cache(c64, torch.float32), idx, cnt, bs, return_block_states=True)
    for name, o, r, w in zip(("o", "lse", "block_o", "block_lse"), out, ref, own, strict=True):
        assert_rule(o, r, w, name, logit_bound(q64, c64))


@KERNEL
@given(data=st.data(), mode=st.sampled_from(["exact", "union"]))
def test_repair_combine_kernel(data, mode):
    RAN["repair_combine"] += 1
    c64, q64, gen = draw_cache(data)
    bs = block_size_for(data, c64.page_size)
    p_idx, p_cnt = draw_selection(data, c64, bs, gen, label="P")
    s_idx, s_cnt = draw_selection(data, c64, bs, gen, label="S")

    def run(q, cache):
        if mode == "exact":
            bo, blse = prr.ops.block_states(q, cache, p_idx, p_cnt, bs)
            spec = {"block_o": bo, "block_lse": blse}
        else:
            so, slse = prr.sparse_decode(q, cache, p_idx, p_cnt, bs)
            spec = {"spec_o": so, "spec_lse": slse}
        return prr.ops.repair_combine(q, cache, bs, p_idx, p_cnt, s_idx, s_cnt, mode=mode, **spec)

    ref, own = run(q64, c64), run(q64.float(), as_cache(c64, torch.float32))
    with use_backend("triton"):
        out = run(q64.float(), as_cache(c64, torch.float32))
    for name, o, r, w in zip(("o", "lse"), out, ref, own, strict=True):
        assert_rule(o, r, w, f"{mode} {name}", logit_bound(q64, c64))


@KERNEL
@given(data=st.data())
def test_select_blocks_kernel(data):
    RAN["select_blocks"] += 1
    b, hkv = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    nmax = data.draw(st.integers(1, 80), label="N_max")
    top_k, n_sink, n_local = data.draw(st.integers(1, 12)), data.draw(st.integers(0, 2)), data.draw(st.integers(1, 3))
    nblk = torch.tensor(data.draw(st.lists(st.integers(0, nmax), min_size=b, max_size=b), label="num_blocks"))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**20), label="seed"))
    # Distinct scores (ties may break differently), some -inf (never picked as dynamic blocks).
    scores = torch.stack([torch.randperm(nmax, generator=gen) for _ in range(b * hkv)]).view(b, hkv, nmax).float()
    scores = scores.masked_fill(torch.rand(scores.shape, generator=gen) < 0.1, float("-inf"))
    ref = ref_select.select_blocks(scores, nblk, top_k, n_sink, n_local)
    with use_backend("triton"):
        out = prr.select_blocks(scores, nblk, top_k, n_sink, n_local)
    assert torch.equal(out[1], ref[1]) and torch.equal(out[0], ref[0])


@KERNEL
@given(data=st.data(), aggregate=st.sampled_from(["sum", "max"]))
def test_quest_scores_and_append_kernels(data, aggregate):
    RAN["quest"] += 1
    c64, q64, gen = draw_cache(data)
    bs = block_size_for(data, c64.page_size)
    c32 = as_cache(c64, torch.float32)
    ref = ref_score.quest_scores(q64, *ref_meta.quest_metadata(c64, bs), c64, bs, aggregate)
    own = ref_score.quest_scores(q64.float(), *ref_meta.quest_metadata(c32, bs), c32, bs, aggregate)
    kmin, kmax = ref_meta.quest_metadata(c32, bs)
    with use_backend("triton"):
        out = prr.quest_scores(q64.float(), kmin, kmax, c32, bs, aggregate)
    assert_rule(out, ref, own, "quest scores", 2 * c64.head_dim)  # two dot products
    if int(c32.seq_lens.max()) < c32.capacity:  # one appended token: min/max are exact in any order
        c32.append(torch.randn(c32.batch, c32.num_kv_heads, c32.head_dim, generator=gen),
                   torch.randn(c32.batch, c32.num_kv_heads, c32.head_dim, generator=gen))
        want = [t.clone() for t in (kmin, kmax)]
        ref_meta.quest_metadata_append(*want, c32, bs)
        with use_backend("triton"):
            prr.quest_metadata_append(kmin, kmax, c32, bs)
        assert torch.equal(kmin, want[0]) and torch.equal(kmax, want[1])


@KERNEL
@given(data=st.data())
def test_infllm_scores_and_append_kernels(data):
    RAN["infllm"] += 1
    c64, q64, gen = draw_cache(data, max_len=200, pages=(16,), min_capacity=32)
    bs = data.draw(st.sampled_from([32, 64]), label="block_size")
    c32 = as_cache(c64, torch.float32)
    ref = ref_score.infllm_scores(q64, ref_meta.infllm_metadata(c64), c64, bs)
    own = ref_score.infllm_scores(q64.float(), ref_meta.infllm_metadata(c32), c32, bs)
    ck = ref_meta.infllm_metadata(c32)
    with use_backend("triton"):
        out = prr.infllm_scores(q64.float(), ck, c32, bs)
    assert_rule(out, ref, own, "infllm scores", c64.head_dim)
    if int(c32.seq_lens.max()) < c32.capacity:
        c32.append(torch.randn(c32.batch, c32.num_kv_heads, c32.head_dim, generator=gen),
                   torch.randn(c32.batch, c32.num_kv_heads, c32.head_dim, generator=gen))
        want = ck.clone()
        ref_meta.infllm_metadata_append(want, c32)
        with use_backend("triton"):
            prr.infllm_metadata_append(ck, c32)
        torch.testing.assert_close(ck, want, rtol=0, atol=8 * torch.finfo(torch.float32).eps * want.abs().max())


@KERNEL
@given(data=st.data())
def test_holt_update_kernel(data):
    RAN["holt"] += 1
    b, hkv, n = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 2)), data.draw(st.integers(1, 70))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**20), label="seed"))
    alpha, beta = data.draw(st.floats(0.05, 1.0)), data.draw(st.floats(0.0, 1.0))
    gamma = data.draw(st.floats(0.0, 2.0))
    # Sequences only grow, so blocks known so far never exceed this step's blocks: known <= num_blocks.
    nblk = torch.randint(0, n + 1, (b,), generator=gen, dtype=torch.int32)
    known = (torch.rand(b, generator=gen) * (nblk + 1)).floor().to(torch.int32)
    state = [torch.randn(b, hkv, n, generator=gen), torch.randn(b, hkv, n, generator=gen) * 0.1, known]
    scores = torch.randn(b, hkv, n, generator=gen) * 5
    scores = scores.masked_fill(torch.rand(scores.shape, generator=gen) < 0.1, float("-inf"))
    ref = [t.clone() for t in state] + [torch.empty(b, hkv, n)]
    ref_holt.holt_update_(*ref[:3], scores, nblk, alpha, beta, gamma, ref[3])
    out = [t.clone() for t in state] + [torch.empty(b, hkv, n)]
    with use_backend("triton"):
        holt_ops.holt_update_(*out[:3], scores, nblk, alpha, beta, gamma, out[3])
    assert torch.equal(out[2], ref[2])
    for o, r in zip(out[:2] + out[3:], ref[:2] + ref[3:], strict=True):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


@KERNEL
@given(data=st.data())
def test_merge_states_kernel(data):
    RAN["merge"] += 1
    rows, n = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 40))
    d = data.draw(st.sampled_from([16, 32, 64]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**20), label="seed"))
    o = torch.randn(rows, n, d, generator=gen, dtype=torch.float64)
    lse = torch.randn(rows, n, generator=gen, dtype=torch.float64) * 10
    lse = lse.masked_fill(torch.rand(rows, n, generator=gen) < data.draw(st.sampled_from([0.0, 0.5, 1.0])), -math.inf)
    ref, own = prr.merge_states(o, lse), prr.merge_states(o.float(), lse.float())
    with use_backend("triton"):
        out = prr.merge_states(o.float(), lse.float())
    for name, x, r, w in zip(("o", "lse"), out, ref, own, strict=True):
        assert_rule(x, r, w, name, 1 + lse.abs().nan_to_num(posinf=0).max().item())


# ---- identities on the reference ops (float64) ----------------------------------------------------------------
def union_selection(a_idx, a_cnt, b_idx, b_cnt, n_max):
    mask = ref_select.selection_mask(a_idx, a_cnt, n_max) | ref_select.selection_mask(b_idx, b_cnt, n_max)
    return ref_select._mask_to_selection(mask, n_max)


@REF
@given(data=st.data(), ratio=st.sampled_from([0.5, 1.0, 1.5, 2.0]), steps=st.integers(0, 3))
def test_prr_exact_equals_dsa(data, ratio, steps):
    """prr_step (exact) == dsa_step for any predictor state: a random score history of `steps` updates."""
    RAN["prr_exact"] += 1
    cache, q, gen = draw_cache(data)
    cfg = prr.SparseConfig(method=data.draw(st.sampled_from(["quest", "oracle"])), block_size=cache.page_size,
                           top_k=data.draw(st.integers(1, 6)), n_sink=data.draw(st.integers(0, 2)),
                           n_local=data.draw(st.integers(1, 2)))
    meta = prr.BlockMetadata(cfg, cache)
    nmax = cache.max_blocks(cfg.block_size)
    pred = prr.HoltPredictor(1, cache.batch, cache.num_kv_heads, nmax)
    nblk = prr.num_blocks(cache.seq_lens, cfg.block_size)
    for _ in range(steps):
        pred.update(0, torch.randn(cache.batch, cache.num_kv_heads, nmax, generator=gen), nblk)
    dsa = prr.dsa_step(q, cache, meta)
    out = prr.prr_step(q, cache, meta, pred, 0, ratio=ratio, mode="exact")
    torch.testing.assert_close(out.o, dsa.o, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.lse, dsa.lse, rtol=1e-10, atol=1e-12)
    assert torch.equal(out.selection.indices, dsa.selection.indices)


@REF
@given(data=st.data())
def test_union_is_attention_over_p_or_s(data):
    RAN["union"] += 1
    cache, q, gen = draw_cache(data)
    bs = block_size_for(data, cache.page_size)
    p_idx, p_cnt = draw_selection(data, cache, bs, gen, label="P")
    s_idx, s_cnt = draw_selection(data, cache, bs, gen, label="S")
    so, slse = prr.sparse_decode(q, cache, p_idx, p_cnt, bs)
    o, lse = ref_repair.repair_combine(q, cache, bs, p_idx, p_cnt, s_idx, s_cnt, spec_o=so, spec_lse=slse,
                                       mode="union")
    u_idx, u_cnt = union_selection(p_idx, p_cnt, s_idx, s_cnt, cache.max_blocks(bs))
    o_u, lse_u = prr.sparse_decode(q, cache, u_idx, u_cnt, bs)
    torch.testing.assert_close(o, o_u, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, lse_u, rtol=1e-10, atol=1e-12)


@REF
@given(data=st.data())
def test_merge_is_associative_and_order_free(data):
    RAN["merge_assoc"] += 1
    n = data.draw(st.integers(1, 12), label="parts")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**20), label="seed"))
    o = torch.randn(3, n, 8, generator=gen, dtype=torch.float64)
    lse = (torch.randn(3, n, generator=gen, dtype=torch.float64) * 20).masked_fill(
        torch.rand(3, n, generator=gen) < data.draw(st.sampled_from([0.0, 0.3, 1.0])), -math.inf)
    cut = data.draw(st.integers(0, n), label="cut")
    whole = prr.merge_states(o, lse)
    left, right = prr.merge_states(o[:, :cut], lse[:, :cut]), prr.merge_states(o[:, cut:], lse[:, cut:])
    two = prr.merge_two(*left, *right)
    perm = torch.randperm(n, generator=gen)
    shuffled = prr.merge_states(o[:, perm], lse[:, perm])
    for other in (two, shuffled):
        torch.testing.assert_close(other[0], whole[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(other[1], whole[1], rtol=1e-12, atol=1e-12)
    assert not torch.isnan(whole[0]).any()


@REF
@given(data=st.data())
def test_full_selection_equals_dense(data):
    RAN["full_dense"] += 1
    cache, q, _ = draw_cache(data)
    bs = block_size_for(data, cache.page_size)
    nmax = cache.max_blocks(bs)
    idx = torch.arange(nmax, dtype=torch.int32).expand(cache.batch, cache.num_kv_heads, nmax)
    cnt = prr.num_blocks(cache.seq_lens, bs)[:, None].expand(cache.batch, cache.num_kv_heads).contiguous()
    idx = torch.where(idx < cnt[..., None], idx, -1).contiguous()
    o, lse = prr.sparse_decode(q, cache, idx, cnt, bs)
    o_d, lse_d = prr.dense_decode(q, cache)
    torch.testing.assert_close(o, o_d, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, lse_d, rtol=1e-10, atol=1e-12)


@REF
@given(data=st.data(), bad=st.sampled_from(["duplicate", "past_end", "negative", "count"]))
def test_bad_selections_are_rejected(data, bad):
    RAN["rejected"] += 1
    cache, q, gen = draw_cache(data)
    bs = block_size_for(data, cache.page_size)
    idx, cnt = draw_selection(data, cache, bs, gen, kmax=data.draw(st.integers(2, 10)))
    nblk = prr.num_blocks(cache.seq_lens, bs)
    b = data.draw(st.integers(0, cache.batch - 1), label="row b")
    h = data.draw(st.integers(0, cache.num_kv_heads - 1), label="row h")
    kmax = idx.shape[-1]
    if bad == "duplicate":
        if int(nblk[b]) == 0:
            return
        cnt[b, h] = max(int(cnt[b, h]), 1)
        idx[b, h, 0] = max(int(idx[b, h, 0]), 0)
        cnt[b, h] = min(int(cnt[b, h]) + 1, kmax)
        idx[b, h, int(cnt[b, h]) - 1] = idx[b, h, 0]
        match = "twice"
    elif bad == "count":
        cnt[b, h] = kmax + data.draw(st.integers(1, 5))
        match = "capacity K_max"
    else:
        cnt[b, h] = max(int(cnt[b, h]), 1)
        # past the cache's last block (a block past a sequence's current end but inside the cache is empty, not
        # an error: a finished sequence shrinks under its prediction)
        past = cache.max_blocks(bs) + data.draw(st.integers(0, 1000))
        idx[b, h, 0] = past if bad == "past_end" else -2
        match = "out of range"
    with pytest.raises(ValueError, match=match):
        prr.sparse_decode(q, cache, idx, cnt, bs)


def test_zz_case_count():
    """A full run of this module generates >= 500 cases (skipped when only some of its tests ran)."""
    tests = {"sparse_decode", "repair_combine", "select_blocks", "quest", "infllm", "holt", "merge", "prr_exact",
             "union", "merge_assoc", "full_dense", "rejected"}
    if set(RAN) != tests:
        pytest.skip(f"only {sorted(RAN)} ran")
    print(f"generated cases: {sum(RAN.values())} {dict(RAN)}")
    assert sum(RAN.values()) >= 500, dict(RAN)
