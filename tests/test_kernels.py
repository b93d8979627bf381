"""Every Triton kernel against its PyTorch twin.

Without a GPU the kernels run in Triton's CPU interpreter, in float32 and float16 (bf16 loads are wrong in
the interpreter). On a GPU (tests marked ``gpu``) they run natively in bf16 and fp16. Outputs allocated with
``torch.empty`` are poisoned with NaN (ints with a sentinel) so an element a kernel forgets to write fails.
Tolerance rule (flash-attention's): the kernel's error against a float64 reference of the same rounded inputs
is at most twice the error of PyTorch computing the same thing in the input dtype, plus one rounding step.
"""

import math

import pytest
import torch

import prr
from prr.ops.attention import reference as ref_attn
from prr.ops.backend import use_backend

from conftest import all_blocks, make_cache, make_query

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
LOWP = [torch.bfloat16, torch.float16] if CUDA else [torch.float32, torch.float16]
gpu = pytest.mark.gpu


pytestmark = pytest.mark.usefixtures("poison_empty")


def _to(cache, dtype):
    """The cache moved to DEVICE in `dtype` (pages stay scattered)."""
    return prr.KVCache(cache.k.to(DEVICE, dtype), cache.v.to(DEVICE, dtype), cache.page_table.to(DEVICE),
                       cache.seq_lens.to(DEVICE))


def _lowp_attention(q, cache, idx, cnt, bs):
    """PyTorch's own attention computed in the input dtype (the error yardstick)."""
    k, v, valid = ref_attn.gather_blocks(cache, idx, cnt, bs)
    b, hkv, _kk, _, d = k.shape
    g = q.shape[1] // hkv
    qg = q.view(b, hkv, g, d)
    s = torch.einsum("bhgd,bhktd->bhgkt", qg, k).float() / math.sqrt(d)
    s = s.masked_fill(~valid[:, :, None], float("-inf")).flatten(-2)
    p = torch.softmax(s, -1).nan_to_num(0).to(q.dtype)
    vv = torch.where(valid[..., None], v, 0).flatten(2, 3)
    return torch.einsum("bhgt,bhtd->bhgd", p, vv).reshape(b, hkv * g, d)


def _assert_rule(out, ref, own, dtype):
    err = (out.double() - ref.double()).abs().max().item()
    own_err = (own.double() - ref.double()).abs().max().item()
    step = torch.finfo(dtype).eps * ref.double().abs().max().item()
    assert not torch.isnan(out).any()
    assert err <= 2 * own_err + step, f"kernel error {err:.3g} > 2 x PyTorch's {own_err:.3g} + {step:.3g}"


def _random_selection(cache, bs, kmax, seed, fill=0.7):
    gen = torch.Generator().manual_seed(seed)
    nblk = prr.num_blocks(cache.seq_lens.cpu(), bs).tolist()
    idx = torch.full((cache.batch, cache.num_kv_heads, kmax), -1, dtype=torch.int32)
    cnt = torch.zeros(cache.batch, cache.num_kv_heads, dtype=torch.int32)
    for b, n in enumerate(nblk):
        for h in range(cache.num_kv_heads):
            c = max(1, min(n, kmax, round(fill * n)))
            blocks = torch.cat([torch.tensor([n - 1]), torch.randperm(n - 1, generator=gen)])[:c].sort().values
            idx[b, h, :c] = blocks.to(torch.int32)
            cnt[b, h] = c
    return idx.to(DEVICE), cnt.to(DEVICE)


# --------------------------------------------------------------------------------------------------------------
# sparse decode
# --------------------------------------------------------------------------------------------------------------
DECODE_CASES = [
    # (lens, hkv, g, d, block, page)
    pytest.param([97], 2, 4, 64, 16, 16, id="B1-G4-d64-partial"),
    pytest.param([16], 1, 8, 128, 16, 16, id="B1-one-block-G8-d128"),
    pytest.param([130, 33, 250], 2, 1, 64, 16, 16, id="B3-G1-mixed-lengths"),
    pytest.param([300, 77], 1, 4, 128, 64, 16, id="B2-block64-page16"),
]


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("lens,hkv,g,d,bs,page", DECODE_CASES)
def test_sparse_decode_kernel(dtype, lens, hkv, g, d, bs, page):
    base = make_cache(lens, hkv=hkv, d=d, page_size=page, capacity=320)
    cache = _to(base, dtype)
    q = make_query(base, g).to(DEVICE, dtype)
    kmax = 6
    idx, cnt = _random_selection(cache, bs, kmax, seed=len(lens) + d)
    ref64 = prr.KVCache(cache.k.cpu().double(), cache.v.cpu().double(), base.page_table, base.seq_lens)
    o_ref, lse_ref, bo_ref, blse_ref = ref_attn.sparse_decode(q.cpu().double(), ref64, idx.cpu(), cnt.cpu(), bs,
                                                              return_block_states=True)
    with use_backend("triton"):
        o, lse, bo, blse = prr.sparse_decode(q, cache, idx, cnt, bs, return_block_states=True)
    own = _lowp_attention(q.cpu(), prr.KVCache(cache.k.cpu(), cache.v.cpu(), base.page_table, base.seq_lens),
                          idx.cpu(), cnt.cpu(), bs)
    _assert_rule(o.cpu(), o_ref, own, dtype)
    torch.testing.assert_close(lse.cpu().double(), lse_ref, rtol=1e-5, atol=1e-4)
    assert lse.dtype == torch.float32 and o.dtype == dtype
    # Slot states: padding slots are exactly (0, -inf); live ones match the reference.
    pad = blse_ref == float("-inf")
    assert torch.equal(blse.cpu() == float("-inf"), pad)
    assert torch.all(bo.cpu()[pad] == 0)
    torch.testing.assert_close(blse.cpu().double()[~pad], blse_ref[~pad], rtol=1e-5, atol=1e-4)
    _assert_rule(bo.cpu()[~pad], bo_ref[~pad], bo_ref[~pad].to(dtype), dtype) if dtype != torch.float32 else \
        torch.testing.assert_close(bo.cpu().double()[~pad], bo_ref[~pad], rtol=1e-5, atol=1e-5)
    # The block-states-only launch (PRR's exact speculation) writes the same slot states, bit for bit.
    with use_backend("triton"):
        bo2, blse2 = prr.ops.block_states(q, cache, idx, cnt, bs)
        # ... also with its grid capped (one program per (sequence, KV head): every slot in one split)
        bo3, blse3 = prr.ops.block_states(q, cache, idx, cnt, bs, max_programs=1)
    assert torch.equal(bo2, bo) and torch.equal(blse2, blse)
    assert torch.equal(bo3, bo) and torch.equal(blse3, blse)
    # The merged output with the grid capped (every slot in one split): the same attention by the same rule.
    with use_backend("triton"):
        o4, lse4 = prr.ops.sparse_decode(q, cache, idx, cnt, bs, max_programs=1)
    _assert_rule(o4.cpu(), o_ref, own, dtype)
    torch.testing.assert_close(lse4.cpu().double(), lse_ref, rtol=1e-5, atol=1e-4)


def test_sparse_decode_kernel_full_budget_equals_dense_and_noncontiguous_inputs():
    base = make_cache([200, 61], hkv=2, d=64, capacity=208)
    dtype = LOWP[0]
    # Non-contiguous: q a strided view, the page pool a view of a wider pool, indices a slice of a wider buffer.
    pool_k = torch.zeros(base.k.shape[0], 4, 16, 64, dtype=dtype, device=DEVICE)
    pool_v = torch.zeros_like(pool_k)
    pool_k[:, ::2] = base.k.to(DEVICE, dtype)
    pool_v[:, ::2] = base.v.to(DEVICE, dtype)
    cache = prr.KVCache(pool_k[:, ::2], pool_v[:, ::2], base.page_table.to(DEVICE), base.seq_lens.to(DEVICE))
    assert not cache.k.is_contiguous()
    qbig = make_query(base, 8).to(DEVICE, dtype).repeat(1, 2, 1)
    q = qbig[:, ::2]
    idx, cnt = all_blocks(base, 16)
    wide = torch.full((2, 2, idx.shape[-1] + 5), 7, dtype=torch.int32)
    wide[..., : idx.shape[-1]] = idx
    with use_backend("triton"):
        o, lse = prr.sparse_decode(q, cache, wide[..., : idx.shape[-1]].to(DEVICE), cnt.to(DEVICE), 16)
    ref = prr.KVCache(cache.k.cpu().double(), cache.v.cpu().double(), base.page_table, base.seq_lens)
    o_ref, lse_ref = prr.dense_decode(q.cpu().double(), ref)
    own = _lowp_attention(q.cpu(), prr.KVCache(cache.k.cpu(), cache.v.cpu(), base.page_table, base.seq_lens),
                          idx, cnt, 16)
    _assert_rule(o.cpu(), o_ref, own, dtype)
    torch.testing.assert_close(lse.cpu().double(), lse_ref, rtol=1e-5, atol=1e-4)


def test_sparse_decode_kernel_refuses_bad_layout():
    base = make_cache([50], hkv=1, d=64)
    cache = _to(base, LOWP[0])
    q = make_query(base, 2).to(DEVICE, LOWP[0])
    idx, cnt = all_blocks(base, 16)
    with use_backend("triton"), pytest.raises(ValueError, match="q must have a unit stride"):
        prr.sparse_decode(q.transpose(1, 2).contiguous().transpose(1, 2), cache, idx.to(DEVICE), cnt.to(DEVICE), 16)


# --------------------------------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,block", [(21, 128), (21, 16), (300, 128), (300, 64), (1, 128)])
def test_merge_kernel_with_empty_parts_and_garbage(n, block, monkeypatch):
    """All parts in one pass (the default up to 128) or several passes (N over the tile), with empty parts
    holding NaN garbage (the kernel loads o beside lse, so the garbage is read and must be dropped)."""
    from prr.ops.merge import triton as merge_kernels

    monkeypatch.setattr(merge_kernels, "MERGE_BLOCK_N", block)
    gen = torch.Generator().manual_seed(0)
    o = torch.randn(3, 5, n, 64, generator=gen)
    lse = torch.randn(3, 5, n, generator=gen) * 5
    lse[0, 0] = float("-inf")  # an all-empty row -> (0, -inf)
    lse[1, :, ::2] = float("-inf")
    o[1, :, ::2] = float("nan")  # garbage in empty parts must not leak
    with use_backend("triton"):
        out, out_lse = prr.merge_states(o.to(DEVICE), lse.to(DEVICE))
    ref, ref_lse = prr.merge_states(o.double(), lse.double())
    if n > 1:
        ref[1] = prr.merge_states(o[1, :, 1::2].double(), lse[1, :, 1::2].double())[0]
    assert torch.all(out[0, 0].cpu() == 0) and out_lse[0, 0] == float("-inf")
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_lse.cpu().double(), ref_lse, rtol=1e-6, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# scoring and selection
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("g,aggregate", [(1, "sum"), (4, "sum"), (8, "max")], ids=["G1-sum", "G4-sum", "G8-max"])
def test_quest_scores_kernel(dtype, g, aggregate):
    base = make_cache([500, 37, 260], hkv=2, d=64, capacity=512)
    cache = _to(base, dtype)
    q = make_query(base, g).to(DEVICE, dtype)
    kmin, kmax = prr.quest_metadata(cache, 16)
    with use_backend("triton"):
        s = prr.quest_scores(q, kmin, kmax, cache, 16, aggregate)
    ref64 = prr.KVCache(cache.k.cpu().double(), cache.v.cpu().double(), base.page_table, base.seq_lens)
    kmin64, kmax64 = kmin.cpu().double(), kmax.cpu().double()
    s_ref = prr.quest_scores(q.cpu().double(), kmin64, kmax64, ref64, 16, aggregate)
    dead = s_ref == float("-inf")
    assert torch.equal(s.cpu() == float("-inf"), dead)
    # float32 accumulation bound: a few ulps of the sum of |products|.
    mag = torch.einsum("bhgd,bhnd->bhn", q.cpu().double().abs().view(3, 2, g, 64),
                       torch.maximum(kmin64.abs(), kmax64.abs()).nan_to_num(0, 0, 0))
    assert torch.all((s.cpu().double() - s_ref).abs()[~dead] <= 1e-5 * mag[~dead] + 1e-6)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_infllm_scores_kernel(dtype):
    base = make_cache([700, 130], hkv=2, d=64, capacity=704)
    cache = _to(base, dtype)
    q = make_query(base, 4).to(DEVICE, dtype)
    ck = prr.infllm_metadata(cache)
    with use_backend("triton"):
        s = prr.infllm_scores(q, ck, cache, 64)
    ref64 = prr.KVCache(cache.k.cpu().double(), cache.v.cpu().double(), base.page_table, base.seq_lens)
    s_ref = prr.infllm_scores(q.cpu().double(), ck.cpu().double(), ref64, 64)
    dead = s_ref == float("-inf")
    assert torch.equal(s.cpu() == float("-inf"), dead)
    torch.testing.assert_close(s.cpu().double()[~dead], s_ref[~dead], rtol=1e-5, atol=1e-4)


@pytest.fixture(params=["single", "two-stage"])
def topk_path(request, monkeypatch):
    """Run a top-K test through both kernel paths: one search over the whole row (rows up to
    ``TOPK_SINGLE_MAX`` blocks) and the two stages (group maxima, then their blocks)."""
    from prr.ops.select import triton as sel_triton

    monkeypatch.setattr(sel_triton, "TOPK_SINGLE_MAX", 1 << 20 if request.param == "single" else 0)
    return request.param


# "large": 6000 blocks, 300 chosen: 8192 candidates in the second stage.
@pytest.mark.parametrize("nmax,top_k,n_sink,n_local", [(50, 7, 2, 3), (300, 40, 1, 2), (9, 20, 1, 2),
                                                       (6000, 300, 1, 2)],
                         ids=["small", "wide", "budget>=blocks", "large"])
def test_topk_kernel_matches_reference_sets(nmax, top_k, n_sink, n_local, topk_path):
    gen = torch.Generator().manual_seed(nmax)
    scores = torch.randn(3, 4, nmax, generator=gen)
    scores[0, 0, 5] = float("-inf")  # never a dynamic pick
    scores[1, 2, 3:9] = 1e30  # huge values
    scores[2, 1, :] = -1e-30  # tiny negatives, all equal: ties go to the lowest ids
    nblk = torch.tensor([nmax, max(1, nmax // 3), max(1, nmax - 1)], dtype=torch.int32)
    with use_backend("triton"):
        idx, cnt = prr.select_blocks(scores.to(DEVICE), nblk.to(DEVICE), top_k, n_sink, n_local)
    ridx, rcnt = prr.select_blocks(scores, nblk, top_k, n_sink, n_local)
    assert torch.equal(cnt.cpu(), rcnt)
    for b in range(3):
        for h in range(4):
            got = idx[b, h].cpu().tolist()
            want = ridx[b, h].tolist()
            if b == 2 and h == 1 and nblk[2] > top_k + n_sink + n_local:
                n = int(nblk[2])  # all tied: sink, the lowest top_k others, local
                want = sorted(set(range(n_sink)) | set(range(n_sink, n_sink + top_k)) | set(range(n - n_local, n)))
                want += [-1] * (len(got) - len(want))
            assert got == want, (b, h)


@pytest.mark.parametrize("seed", [0, 1])
def test_topk_kernel_extreme_keys_and_early_exit(seed, topk_path):
    """The k-th key bisection (from the live keys' range, stopping at a threshold with exactly k keys above)
    gives the reference set: keys at the int32 extremes (+-3e38, -0.0 and 0.0, denormals), heavy ties, -inf
    non-candidates, fewer candidates than K."""
    gen = torch.Generator().manual_seed(seed)
    n, top_k = 700, 37
    scores = torch.randn(3, 2, n, generator=gen)
    scores[0, 0, 100:140] = 3.0e38
    scores[0, 0, 140:200] = -3.0e38
    scores[0, 1, :] = torch.tensor([0.0, -0.0, 1e-45, -1e-45]).repeat(n // 4 + 1)[:n]
    scores[1, 0, ::3] = float("-inf")
    scores[2, 0, 6:] = float("-inf")  # 5 dynamic candidates for K = 37
    scores[1, 1, :] = torch.randint(0, 3, (n,), generator=gen).float()  # ties at the K-th across groups
    nblk = torch.tensor([n, n - 50, 41], dtype=torch.int32)
    with use_backend("triton"):
        idx, cnt = prr.select_blocks(scores.to(DEVICE), nblk.to(DEVICE), top_k, 1, 2)
    for b in range(3):
        m = int(nblk[b])
        for h in range(2):
            s = scores[b, h]
            if m <= top_k + 3:
                want = list(range(m))
            else:
                dyn = [j for j in range(1, m - 2) if s[j] > float("-inf")]
                dyn.sort(key=lambda j: (-float(s[j]), j))
                want = sorted({0, m - 2, m - 1} | set(dyn[:top_k]))
            assert idx[b, h, : cnt[b, h]].cpu().tolist() == want, (seed, b, h)


@pytest.mark.parametrize("method", ["quest", "infllm_v2"])
def test_scoring_kernel_writes_the_topk_group_maxima(method, topk_path):
    """The scoring kernel's tail writes exactly the top-K's stage-1 group maxima (so the selection skips that
    launch), and select() with them equals the reference selection."""
    from prr.ops.select import triton as sel_triton

    lens = [700, 37, 1500, 0] if method == "quest" else [1500, 200, 64, 0]
    base = make_cache(lens, hkv=2, d=64, capacity=1536)
    cache = _to(base, torch.float32)
    q = make_query(base, 4).to(DEVICE, torch.float32)
    cfg = prr.SparseConfig.from_budget(method, 512 if method == "quest" else 640, n_sink=2, n_local=3)
    with use_backend("triton"):
        meta = prr.BlockMetadata(cfg, cache)
        scores, gmax = meta.scores(q, cache, with_groups=True)
        nblk = prr.num_blocks(cache.seq_lens, cfg.block_size)
        want = torch.empty_like(gmax)
        ng = want.shape[1]
        sel_triton._group_max_kernel[(scores.shape[0] * scores.shape[1], -(-ng // 64))](
            scores, nblk, want, scores.shape[1], scores.shape[2], ng, cfg.n_sink, cfg.n_local,
            scores.stride(0), scores.stride(1), GROUP=sel_triton.GROUP, BLOCK_G=64)
        assert torch.equal(gmax, want)
        sel = prr.select(q, cache, meta)
    ref_meta = prr.BlockMetadata(cfg, base)
    ref = prr.select(q.cpu().double(), prr.KVCache(base.k.double(), base.v.double(), base.page_table,
                                                   base.seq_lens), ref_meta)
    assert torch.equal(sel.counts.cpu(), ref.counts)
    for b in range(len(lens)):
        for h in range(2):
            c = int(ref.counts[b, h])
            assert sel.indices[b, h, :c].cpu().tolist() == ref.indices[b, h, :c].tolist(), (b, h)


@pytest.mark.parametrize("kp,ks", [(7, 5), (40, 131), (200, 520)], ids=["tiny", "K'<K", "K'<K-wide"])
def test_selection_overlap_kernel_matches_reference(kp, ks):
    """PRR's per-step counts in one launch: hits, misses and false positives of P against S equal the
    reference's, with -1 padding, counts past K_max, empty rows and duplicates in P."""
    gen = torch.Generator().manual_seed(kp + 1)
    b, h, n = 3, 4, 600 if kp < 100 else 1200
    p_idx = torch.stack([torch.randperm(n // 2, generator=gen)[:kp].sort().values for _ in range(b * h)])
    s_idx = torch.stack([torch.randperm(n // 2, generator=gen)[:ks].sort().values for _ in range(b * h)])
    p_idx, s_idx = p_idx.view(b, h, kp).to(torch.int32), s_idx.view(b, h, ks).to(torch.int32)
    p_cnt = torch.randint(0, kp + 1, (b, h), generator=gen, dtype=torch.int32)
    s_cnt = torch.randint(0, ks + 1, (b, h), generator=gen, dtype=torch.int32)
    p_cnt[0, 0], s_cnt[0, 1], s_cnt[1, 1] = 0, 0, ks + 5  # empty P, empty S, a count past K_max
    p_idx[2, 3, 1] = p_idx[2, 3, 0]  # a duplicate: counted per slot of P, as the reference does
    p_idx[2, 2, -1] = -1
    with use_backend("triton"):
        got = prr.ops.selection_overlap(*(t.to(DEVICE) for t in (p_idx, p_cnt, s_idx, s_cnt)))
    s_cnt_ref = s_cnt.clamp(max=ks)
    want = prr.ops.select.reference.selection_overlap(p_idx, p_cnt, s_idx, s_cnt_ref)
    want[1] += s_cnt - s_cnt_ref  # |S| as given, like the kernel
    assert torch.equal(got.cpu(), want)
    assert int(want[0].sum()) > 0


def test_select_blocks_writes_into_given_buffers(topk_path):
    """``out=`` (PRR's tail writes the next P into the live buffers): same result, no new tensors, and a
    mis-shaped buffer is refused."""
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(2, 3, 300, generator=gen)
    nblk = torch.tensor([300, 120], dtype=torch.int32)
    want = prr.select_blocks(scores, nblk, 20, 1, 2)
    for backend_name in ("reference", "triton"):
        idx = torch.full((2, 3, 23), 77, dtype=torch.int32, device=DEVICE)
        cnt = torch.full((2, 3), 77, dtype=torch.int32, device=DEVICE)
        with use_backend(backend_name):
            got = prr.select_blocks(scores.to(DEVICE), nblk.to(DEVICE), 20, 1, 2, out=(idx, cnt))
            assert got[0] is idx and got[1] is cnt
            with pytest.raises(ValueError, match="out must be contiguous int32"):
                prr.select_blocks(scores.to(DEVICE), nblk.to(DEVICE), 20, 1, 2, out=(idx[..., :5], cnt))
        assert torch.equal(cnt.cpu(), want[1]) and torch.equal(idx.cpu(), want[0]), backend_name


# --------------------------------------------------------------------------------------------------------------
# repair-combine
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["exact", "union"])
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_repair_combine_kernel(mode, dtype):
    base = make_cache([400, 150, 333], hkv=2, d=64, capacity=400)
    cache = _to(base, dtype)
    q = make_query(base, 4).to(DEVICE, dtype)
    s_idx, s_cnt = _random_selection(cache, 16, 12, seed=1, fill=0.4)
    p_idx, p_cnt = _random_selection(cache, 16, 16, seed=2, fill=0.5)
    s_cnt[1, 0] = 0  # an empty S row -> (0, -inf)
    s_idx[1, 0] = -1
    ref64 = prr.KVCache(cache.k.cpu().double(), cache.v.cpu().double(), base.page_table, base.seq_lens)
    lowp = prr.KVCache(cache.k.cpu().clone(), cache.v.cpu().clone(), base.page_table, base.seq_lens)
    with use_backend("triton"):
        if mode == "exact":
            _, _, bo, blse = prr.sparse_decode(q, cache, p_idx, p_cnt, 16, return_block_states=True)
            spec = dict(block_o=bo, block_lse=blse)
            # Reuse means the hits are not read again: corrupt their values in the cache after speculating.
            hit = prr.ops.selection_contains(s_idx, s_cnt, p_idx, p_cnt)
            assert hit.sum() > 0 and (~hit & (s_idx >= 0)).sum() > 0  # both hits and misses present
            for b, h, j in zip(*torch.nonzero(hit, as_tuple=True), strict=True):
                cache.v[cache.page_table[b, s_idx[b, h, j]], h] = 1000.0
        else:
            so, slse = prr.sparse_decode(q, cache, p_idx, p_cnt, 16)
            spec = dict(spec_o=so, spec_lse=slse)
        o, lse = prr.ops.repair_combine(q, cache, 16, p_idx, p_cnt, s_idx, s_cnt, mode=mode, **spec)
    q64 = q.cpu().double()
    if mode == "exact":
        o_ref, lse_ref = prr.sparse_decode(q64, ref64, s_idx.cpu(), s_cnt.cpu(), 16)
        own = _lowp_attention(q.cpu(), lowp, s_idx.cpu(), s_cnt.cpu(), 16)
    else:
        nmax = 25
        both = prr.ops.selection_mask(p_idx.cpu(), p_cnt.cpu(), nmax) | prr.ops.selection_mask(
            s_idx.cpu(), s_cnt.cpu(), nmax)
        u_idx = torch.where(both, torch.arange(nmax, dtype=torch.int32), -1).sort(-1, descending=True).values
        u_cnt = both.sum(-1, dtype=torch.int32)
        o_ref, lse_ref = prr.sparse_decode(q64, ref64, u_idx, u_cnt, 16)
        own = _lowp_attention(q.cpu(), lowp, u_idx, u_cnt, 16)
    if mode == "exact":
        assert torch.all(o[1, :4].cpu() == 0) and torch.all(lse[1, :4].cpu() == float("-inf"))
    _assert_rule(o.cpu(), o_ref, own, dtype)
    live = lse_ref > float("-inf")
    torch.testing.assert_close(lse.cpu().double()[live], lse_ref[live], rtol=1e-5, atol=1e-4)


def _overlapping_selections(cache, bs, ks, kp, case, seed=0):
    """S (up to ks slots) and P (up to kp slots) over each row's blocks: ``all_hit`` (P holds S and more),
    ``all_miss`` (P disjoint from S), ``wide`` (random, many slots: several tiles of P and of the misses)."""
    gen = torch.Generator().manual_seed(seed)
    nblk = prr.num_blocks(cache.seq_lens.cpu(), bs).tolist()
    s_idx = torch.full((cache.batch, cache.num_kv_heads, ks), -1, dtype=torch.int32)
    p_idx = torch.full((cache.batch, cache.num_kv_heads, kp), -1, dtype=torch.int32)
    s_cnt = torch.zeros(cache.batch, cache.num_kv_heads, dtype=torch.int32)
    p_cnt = torch.zeros_like(s_cnt)
    for b, n in enumerate(nblk):
        for h in range(cache.num_kv_heads):
            perm = torch.randperm(n, generator=gen)
            ns = min(ks, n // 2 if case == "all_miss" else n)
            s_row = perm[:ns]
            if case == "all_hit":
                p_row = perm[: min(kp, n)]
            elif case == "all_miss":
                p_row = perm[ns: ns + kp]
            else:
                p_row = torch.randperm(n, generator=gen)[: min(kp, n)]
            s_idx[b, h, : len(s_row)] = s_row.sort().values.to(torch.int32)
            p_idx[b, h, : len(p_row)] = p_row.sort().values.to(torch.int32)
            s_cnt[b, h], p_cnt[b, h] = len(s_row), len(p_row)
    return s_idx.to(DEVICE), s_cnt.to(DEVICE), p_idx.to(DEVICE), p_cnt.to(DEVICE)


@pytest.mark.parametrize("case", ["all_hit", "all_miss", "wide"])
@pytest.mark.parametrize("mode", ["exact", "union"])
def test_repair_combine_kernel_hit_patterns(case, mode):
    """Every hit, no hit, and wide rows (S of 40 slots, P of 70: several tiles of P in the miss search, misses
    dealt round-robin over the splits), against attention over S (exact) or P ∪ S (union) in float64."""
    dtype = LOWP[-1]
    base = make_cache([1500, 900], hkv=2, d=64, capacity=1504)
    cache = _to(base, dtype)
    q = make_query(base, 2).to(DEVICE, dtype)
    s_idx, s_cnt, p_idx, p_cnt = _overlapping_selections(cache, 16, 40, 70, case)
    hit = prr.ops.selection_contains(s_idx, s_cnt, p_idx, p_cnt)
    n_hit, n_sel = int(hit.sum()), int(s_cnt.sum())
    assert {"all_hit": n_hit == n_sel, "all_miss": n_hit == 0, "wide": 0 < n_hit < n_sel}[case]
    with use_backend("triton"):
        if mode == "exact":
            bo, blse = prr.ops.block_states(q, cache, p_idx, p_cnt, 16)
            spec = dict(block_o=bo, block_lse=blse)
        else:
            so, slse = prr.sparse_decode(q, cache, p_idx, p_cnt, 16)
            spec = dict(spec_o=so, spec_lse=slse)
        o, lse = prr.ops.repair_combine(q, cache, 16, p_idx, p_cnt, s_idx, s_cnt, mode=mode, **spec)
    ref64 = prr.KVCache(cache.k.cpu().double(), cache.v.cpu().double(), base.page_table, base.seq_lens)
    lowp = prr.KVCache(cache.k.cpu().clone(), cache.v.cpu().clone(), base.page_table, base.seq_lens)
    if mode == "exact":
        r_idx, r_cnt = s_idx.cpu(), s_cnt.cpu()
    else:
        nmax = int(prr.num_blocks(base.seq_lens, 16).max())
        both = prr.ops.selection_mask(p_idx.cpu(), p_cnt.cpu(), nmax) | prr.ops.selection_mask(
            s_idx.cpu(), s_cnt.cpu(), nmax)
        r_idx = torch.where(both, torch.arange(nmax, dtype=torch.int32), -1).sort(-1, descending=True).values
        r_cnt = both.sum(-1, dtype=torch.int32)
    o_ref, lse_ref = prr.sparse_decode(q.cpu().double(), ref64, r_idx, r_cnt, 16)
    _assert_rule(o.cpu(), o_ref, _lowp_attention(q.cpu(), lowp, r_idx, r_cnt, 16), dtype)
    torch.testing.assert_close(lse.cpu().double(), lse_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_repair_calls_before_merge_once_and_computes_the_same(backend_name):
    """``before_merge`` (where a caller joins the speculation's stream in union mode) is called exactly once and
    changes nothing in the result; anything but a callable is refused."""
    dtype = LOWP[-1]
    base = make_cache([1500, 900], hkv=2, d=64, capacity=1504)
    cache = _to(base, dtype)
    q = make_query(base, 2).to(DEVICE, dtype)
    s_idx, s_cnt, p_idx, p_cnt = _overlapping_selections(cache, 16, 40, 70, "wide")
    calls = []
    with use_backend(backend_name):
        so, slse = prr.sparse_decode(q, cache, p_idx, p_cnt, 16)
        kw = dict(mode="union", spec_o=so, spec_lse=slse)
        want = prr.ops.repair_combine(q, cache, 16, p_idx, p_cnt, s_idx, s_cnt, **kw)
        got = prr.ops.repair_combine(q, cache, 16, p_idx, p_cnt, s_idx, s_cnt, before_merge=lambda: calls.append(1),
                                     **kw)
        with pytest.raises(TypeError, match="before_merge must be callable"):
            prr.ops.repair_combine(q, cache, 16, p_idx, p_cnt, s_idx, s_cnt, before_merge=1, **kw)
    assert calls == [1]
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# --------------------------------------------------------------------------------------------------------------
# metadata append
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_metadata_append_kernels_track_bulk(dtype):
    full = make_cache([200, 120], hkv=2, d=64, capacity=224)
    k_all, v_all = full.logical("k").to(dtype), full.logical("v").to(dtype)
    cache = prr.KVCache.from_dense(k_all[:, :, :60], v_all[:, :, :60], [60, 0], capacity=224,
                                   shuffle_pages=torch.Generator().manual_seed(3))
    cache = _to(cache, dtype)
    kmin, kmax = prr.quest_metadata(cache, 16)
    ck = prr.infllm_metadata(cache)
    with use_backend("triton"):
        for _ in range(70):
            pos = cache.seq_lens.long().cpu()
            rows = torch.arange(2)
            cache.append(k_all[rows, :, pos].to(DEVICE), v_all[rows, :, pos].to(DEVICE))
            prr.quest_metadata_append(kmin, kmax, cache, 16)
            prr.infllm_metadata_append(ck, cache)
    bmin, bmax = prr.quest_metadata(cache, 16)
    assert torch.equal(kmin, bmin) and torch.equal(kmax, bmax)  # min/max are exact
    torch.testing.assert_close(ck, prr.infllm_metadata(cache), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# the whole PRR step on the kernels
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["quest", "infllm_v2"])
def test_prr_step_on_kernels_equals_dsa_on_kernels(method):
    base = make_cache([900, 700], hkv=2, d=64, capacity=1024)
    cache = _to(base, LOWP[0])
    q = make_query(base, 4, scale=2.0).to(DEVICE, LOWP[0])
    cfg = prr.SparseConfig.from_budget(method, 256 if method == "quest" else 512)
    meta = prr.BlockMetadata(cfg, cache)
    nmax = -(-cache.capacity // cfg.block_size)
    pred = prr.HoltPredictor(1, 2, 2, nmax, device=DEVICE)
    with use_backend("triton"):
        dsa0 = prr.dsa_step(q, cache, meta)
        pred.update(0, dsa0.selection.scores, prr.num_blocks(cache.seq_lens, cfg.block_size))
        q2 = q + 0.3 * torch.randn_like(q)
        dsa = prr.dsa_step(q2, cache, meta)
        out = prr.prr_step(q2, cache, meta, pred, 0, ratio=1.5)
    assert torch.equal(out.selection.indices, dsa.selection.indices)
    ref64 = prr.KVCache(cache.k.cpu().double(), cache.v.cpu().double(), base.page_table, base.seq_lens)
    o_ref, _ = prr.sparse_decode(q2.cpu().double(), ref64, dsa.selection.indices.cpu(),
                                 dsa.selection.counts.cpu(), cfg.block_size)
    own = _lowp_attention(q2.cpu(), prr.KVCache(cache.k.cpu(), cache.v.cpu(), base.page_table, base.seq_lens),
                          dsa.selection.indices.cpu(), dsa.selection.counts.cpu(), cfg.block_size)
    _assert_rule(out.o.cpu(), o_ref, own, LOWP[0])
    _assert_rule(dsa.o.cpu(), o_ref, own, LOWP[0])
    assert 0 < out.stats.hit_rate() <= 1


@gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_default_dispatch_runs_kernels():
    """On CUDA tensors the public ops pick the kernels by default (no backend override)."""
    base = make_cache([300], hkv=2, d=128, capacity=320)
    cache = _to(base, torch.bfloat16)
    q = make_query(base, 4).to(DEVICE, torch.bfloat16)
    idx, cnt = all_blocks(base, 16)
    o, _lse = prr.sparse_decode(q, cache, idx.to(DEVICE), cnt.to(DEVICE), 16)
    ref = prr.dense_decode(q.float(), prr.KVCache(cache.k.float(), cache.v.float(), cache.page_table,
                                                  cache.seq_lens))[0]
    own = _lowp_attention(q.cpu(), prr.KVCache(cache.k.cpu(), cache.v.cpu(), base.page_table, base.seq_lens),
                          idx, cnt, 16)
    _assert_rule(o.cpu(), ref.cpu(), own, torch.bfloat16)


@pytest.mark.parametrize("pattern", ["ascending", "descending", "quantized", "clustered"])
def test_topk_kernel_two_stage_edge_patterns(pattern, topk_path):
    """Stage 1 keeps the K best 16-block groups: scores that pile the top-K into few groups, or tie across
    groups, must still give exactly the reference set (ties: lowest ids, as a stable sort would)."""
    n, top_k = 1000, 40
    gen = torch.Generator().manual_seed(3)
    if pattern == "ascending":
        s = torch.arange(n, dtype=torch.float32)
    elif pattern == "descending":
        s = -torch.arange(n, dtype=torch.float32)
    elif pattern == "quantized":  # heavy ties across many groups
        s = torch.randint(0, 4, (n,), generator=gen).float()
    else:  # a few hot groups, the rest cold
        s = torch.randn(n, generator=gen) - 10
        s[160:200] = torch.randn(40, generator=gen) + 10
        s[720:730] = torch.randn(10, generator=gen) + 10
    scores = s.view(1, 1, n).repeat(2, 1, 1).contiguous()
    nblk = torch.tensor([n, n - 37], dtype=torch.int32)
    with use_backend("triton"):
        idx, cnt = prr.select_blocks(scores.to(DEVICE), nblk.to(DEVICE), top_k, 1, 2)
    for b in range(2):
        m = int(nblk[b])
        dyn = list(range(1, m - 2))
        dyn.sort(key=lambda j: (-float(s[j]), j))  # stable: lowest id first among ties
        want = sorted({0, m - 2, m - 1} | set(dyn[:top_k]))
        assert idx[b, 0, : cnt[b, 0]].cpu().tolist() == want


def test_holt_update_kernel_matches_reference():
    gen = torch.Generator().manual_seed(4)
    b, hkv, n = 3, 2, 300
    level = torch.randn(b, hkv, n, generator=gen)
    trend = torch.randn(b, hkv, n, generator=gen) * 0.1
    known = torch.tensor([250, 0, 299], dtype=torch.int32)  # one row has new blocks, one starts empty
    nblk = torch.tensor([260, 40, 300], dtype=torch.int32)
    scores = torch.randn(b, hkv, n, generator=gen) * 50 + 7
    scores[0, 1, 255] = float("-inf")  # a live block without a finite score
    ref = [t.clone() for t in (level, trend, known)]
    pred_ref = torch.empty(b, hkv, n)
    prr.ops.holt.reference.holt_update_(*ref, scores, nblk, 0.3, 0.2, 0.5, pred_ref)
    out = [t.clone().to(DEVICE) for t in (level, trend, known)]
    pred = torch.empty(b, hkv, n, device=DEVICE)
    with use_backend("triton"):
        prr.ops.holt_update_(*out, scores.to(DEVICE), nblk.to(DEVICE), 0.3, 0.2, 0.5, pred)
    for got, want in zip([*out, pred], [*ref, pred_ref], strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


def test_repair_slots_per_program_rule_and_long_ranges():
    """The split rule (about one wave of programs, 1-8 tiles each) on the shapes it was measured at, and the
    kernel with long ranges (16 and 32 of S's slots per program, as batch 8 gets on a GPU) against the reference."""
    from prr.ops.repair.triton import repair_launch, slots_per_program

    cpu = torch.device("cpu")
    assert slots_per_program(8, 131, 4, cpu, sms=132) == 8  # Llama b1 Quest: two tiles
    assert slots_per_program(64, 131, 4, cpu, sms=132) == 32  # Llama b8 Quest: eight tiles
    assert slots_per_program(8, 67, 1, cpu, sms=132) == 4  # InfLLM-v2 b1: at least 4 slots
    assert slots_per_program(2, 131, 4, cpu, sms=132) == 4  # GLM b1: one tile
    assert slots_per_program(64, 131, 4, cpu) == 4  # no GPU: one tile
    dtype = LOWP[-1]
    base = make_cache([1500, 900], hkv=2, d=64, capacity=1504)
    cache = _to(base, dtype)
    q = make_query(base, 2).to(DEVICE, dtype)
    s_idx, s_cnt, p_idx, p_cnt = _overlapping_selections(cache, 16, 40, 70, "wide", seed=1)
    with use_backend("triton"):
        bo, blse = prr.ops.block_states(q, cache, p_idx, p_cnt, 16)
        want = prr.ops.repair_combine(q, cache, 16, p_idx, p_cnt, s_idx, s_cnt, block_o=bo, block_lse=blse)
        for splits in (3, 2):  # 16 and 20 -> 16, 32 slots per program
            so, slse = repair_launch(q, cache, 16, p_idx, p_cnt, s_idx, s_cnt, bo, blse, 1 / 8, True, splits=splits)
            o, lse = prr.ops.merge.triton.merge_partials(so, slse, out_dtype=dtype)
            torch.testing.assert_close(o, want[0], rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(lse, want[1], rtol=1e-5, atol=1e-5)

