"""The guessed top-K: the same selection as the full top-K at every step, whatever the previous selection; the
Triton kernel (CPU interpreter) equal to its PyTorch twin in every output (and in the flag row it leaves), the
scoring kernels' threshold equal to the reference's."""

import pytest
import torch

import prr
from prr.ops import backend
from prr.ops.guessed import (
    HELD,
    SHORT,
    TOO_HIGH,
    TOO_LOW,
    guess_bound,
    reference,
    select_blocks_guessed,
    selection_flags,
)
from prr.ops.select import triton as select_triton

pytestmark = pytest.mark.usefixtures("poison_empty")

NAMES = ("indices", "counts", "p_indices", "p_counts", "stats")
INT_MAX = 2 ** 31 - 1


def _both(scores, nblk, top_k, flags, n_sink=1, n_local=2, bound=None, **kw):
    """Reference and Triton results (asserted equal, the flag rows they leave too), and the full Triton top-K's
    selection equal to both. ``flags`` is not changed; returns (results, new flags)."""
    f_ref, f_tri = flags.clone(), flags.clone()
    b_ref = None if bound is None else bound.clone()
    b_tri = None if bound is None else bound.clone()
    ref = reference.select_blocks_guessed(scores, nblk, top_k, n_sink, n_local, prev=f_ref, bound=b_ref, **kw)
    with backend.use_backend("triton"):
        tri = select_blocks_guessed(scores, nblk, top_k, n_sink, n_local, prev=f_tri, bound=b_tri, **kw)
    for name, a, b in zip(NAMES, ref, tri, strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(f_ref, f_tri)
    if bound is not None:
        assert bool((b_ref == INT_MAX).all()) and bool((b_tri == INT_MAX).all())  # reset for the next step
    full = select_triton.select_blocks(scores.float(), nblk.to(torch.int32), top_k, n_sink, n_local)
    assert torch.equal(tri[0], full[0]) and torch.equal(tri[1], full[1])
    return tri, f_tri


def _flags(sel, n_max):
    return selection_flags(sel[0], sel[1], n_max)


@pytest.mark.parametrize("nmax", [300, 2000, 9000], ids=["one-search-row", "two-stage-row", "two-chunk-row"])
def test_fed_back_over_drifting_steps_holds_and_stays_exact(nmax):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(3, 2, nmax, generator=gen)
    nblk = torch.tensor([nmax, nmax - 37, 9], dtype=torch.int32)  # rows of different lengths, one short
    flags = torch.zeros(3, 2, nmax, dtype=torch.uint8)  # no previous selection: the full search first
    paths = []
    for _ in range(6):
        scores = base + 0.2 * torch.randn(base.shape, generator=gen)
        (idx, cnt, p_idx, p_cnt, stats), flags = _both(scores, nblk, 25, flags, spec_k=37,
                                                       num_blocks_next=nblk + 1)
        paths.append(stats[1].flatten().tolist())
        assert bool((p_cnt <= 1 + 2 + 37).all())
        # P holds S's dynamic blocks (its capacity exceeds K)
        assert bool(prr.selection_contains(idx, cnt, p_idx, p_cnt).sum(-1).ge(cnt - 3).all())
        base = scores
    assert set(paths[0]) == {TOO_HIGH, SHORT}
    assert all(set(p) == {HELD, SHORT} for p in paths[1:])


def test_any_previous_selection_gives_the_full_selection():
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(2, 2, 1500, generator=gen)
    nblk = torch.tensor([1500, 1400], dtype=torch.int32)
    true = prr.select_blocks(scores, nblk, 40)
    worst = prr.select_blocks(-scores, nblk, 40)  # the lowest blocks: C(τ) is the whole row (too low)
    few = prr.select_blocks(scores, nblk, 5)  # fewer than K blocks: at least 5 score above τ (held or too high)
    paths = set()
    for sel in (true, worst, few):
        (*_, stats), _f = _both(scores, nblk, 40, _flags(sel, 1500), spec_k=60)
        paths |= set(stats[1].flatten().tolist())
    assert paths >= {HELD, TOO_LOW, TOO_HIGH}
    rnd = (torch.rand(2, 2, 1500, generator=gen) < 0.3).to(torch.uint8)  # any flags at all
    _both(scores, nblk, 40, rnd)


def test_ties_all_equal_and_minus_inf():
    scores = torch.zeros(2, 2, 700)
    scores[0, 1, 100:400] = 1.0  # a plateau of ties larger than K
    scores[1, 0] = float("-inf")  # no dynamic candidate at all
    scores[1, 1, :] = float("-inf")
    scores[1, 1, 50:55] = 2.0  # fewer finite candidates than K
    scores[0, 0, 10:20] = -0.0  # -0 below +0, as the full top-K orders them
    nblk = torch.tensor([700, 650], dtype=torch.int32)
    flags = _flags(prr.select_blocks(scores, nblk, 20), 700)
    for _ in range(2):
        _, flags = _both(scores, nblk, 20, flags)
    _both(scores, nblk, 20, torch.ones(2, 2, 700, dtype=torch.uint8))


def test_budget_over_the_row_and_capacities():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 3, 600, generator=gen)
    nblk = torch.tensor([40, 600], dtype=torch.int32)
    flags = _flags(prr.select_blocks(scores + 0.1, nblk, 20), 600)
    _both(scores, nblk, 50, flags)  # row 0: K >= its blocks (every block, SHORT)
    _both(scores, nblk, 20, flags, spec_k=10)  # P's capacity under K
    _both(scores, nblk, 20, flags, spec_k=45)
    _both(scores, nblk, 20, flags, num_blocks_next=nblk + 1, n_sink=0, n_local=1)  # P over the next step's blocks


def test_stats_count_candidates_and_paths():
    scores = torch.arange(1000, dtype=torch.float32).view(1, 1, 1000)
    nblk = torch.tensor([1000], dtype=torch.int32)
    flags = torch.zeros(1, 1, 1000, dtype=torch.uint8)
    flags[..., 950] = 1  # dynamic blocks 1..997 score their id: tau = 950 leaves 48 candidates (950..997)
    (*_, st), _f = _both(scores, nblk, 10, flags)
    assert st.flatten().tolist() == [48, HELD]
    flags[..., 950], flags[..., 990] = 0, 1
    (*_, st), _f = _both(scores, nblk, 10, flags)
    assert st.flatten().tolist() == [8, TOO_HIGH]
    flags[..., 990], flags[..., 5] = 0, 1  # 993 candidates overflow the list (64 for K = 10)
    (*_, st), _f = _both(scores, nblk, 10, flags)
    assert st.flatten().tolist() == [993, TOO_LOW]
    flags[..., 5], flags[..., 999] = 0, 1  # a local block: no bound, the full search
    (*_, st), new = _both(scores, nblk, 10, flags)
    assert st.flatten().tolist() == [0, TOO_HIGH]
    assert new.flatten().nonzero().flatten().tolist() == list(range(988, 998))


def test_bound_given_as_the_scoring_kernel_leaves_it():
    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(2, 2, 900, generator=gen)
    nblk = torch.tensor([900, 700], dtype=torch.int32)
    flags = _flags(prr.select_blocks(scores + 0.2 * torch.randn(scores.shape, generator=gen), nblk, 30), 900)
    bound = guess_bound(scores, nblk, flags)
    _both(scores, nblk, 30, flags, bound=bound, spec_k=45)
    with backend.use_backend("triton"):  # into given buffers, the flags to another row
        bufs = (torch.full((2, 2, 33), 7, dtype=torch.int32), None, None, None, None)
        out_f = torch.zeros_like(flags)
        got = select_blocks_guessed(scores, nblk, 30, prev=flags.clone(), out=bufs, prev_out=out_f)
    assert got[0] is bufs[0]
    assert torch.equal(got[0], prr.select_blocks(scores, nblk, 30)[0])
    assert torch.equal(out_f, _flags(prr.select_blocks(scores, nblk, 30), 900) * (torch.arange(900) >= 1)
                       * (torch.arange(900) < nblk[:, None, None] - 2))


def test_reference_equals_select_blocks_in_float64():
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(2, 2, 800, generator=gen, dtype=torch.float64)
    nblk = torch.tensor([800, 333])
    flags = _flags(prr.select_blocks(scores, nblk, 33), 800)
    got = reference.select_blocks_guessed(scores, nblk, 33, prev=flags)
    want = prr.select_blocks(scores, nblk, 33)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("method", ["quest", "infllm_v2"])
def test_scoring_kernels_fold_the_threshold(method):
    """The scoring kernels' ``bound_for`` (CPU interpreter) equals the reference's threshold."""
    from conftest import make_cache

    gen = torch.Generator().manual_seed(8)
    bs = 16 if method == "quest" else 64
    cfg = prr.SparseConfig(method=method, block_size=bs, top_k=8)
    bsz, hkv, hq, d = 2, 2, 4, 16
    lens = [40 * bs + 3, 25 * bs]
    cache = make_cache(lens, hkv=hkv, d=d, dtype=torch.float32)
    meta = prr.BlockMetadata(cfg, cache)
    lens = cache.seq_lens
    q = torch.randn(bsz, hq, d, generator=gen)
    nmax = cache.max_blocks(bs)
    nblk = prr.ops.num_blocks(lens, bs)
    flags = (torch.rand(bsz, hkv, nmax, generator=gen) < 0.2).to(torch.uint8)
    bound = torch.full((bsz, hkv), INT_MAX, dtype=torch.int32)
    with backend.use_backend("triton"):
        scores, _g = meta.scores(q, cache, with_groups=True, bound_for=(flags, bound))
    assert torch.equal(bound, guess_bound(scores, nblk, flags, cfg.n_sink, cfg.n_local))
    b_ref = torch.full((bsz, hkv), INT_MAX, dtype=torch.int32)
    with backend.use_backend("reference"):  # (its scores may differ from the kernel's in the last bits)
        s_ref, _g = meta.scores(q, cache, with_groups=True, bound_for=(flags, b_ref))
    assert torch.equal(b_ref, guess_bound(s_ref, nblk, flags, cfg.n_sink, cfg.n_local))
    assert bool((b_ref < INT_MAX).all())


def test_bad_inputs():
    scores = torch.randn(1, 2, 100)
    nblk = torch.tensor([100])
    with pytest.raises(ValueError, match="prev"):
        select_blocks_guessed(scores, nblk, 10, prev=torch.zeros(1, 2, 99, dtype=torch.uint8))
    with pytest.raises(TypeError, match="prev"):
        select_blocks_guessed(scores, nblk, 10, prev=torch.zeros(1, 2, 100))
    with pytest.raises(TypeError, match="bound"):
        select_blocks_guessed(scores, nblk, 10, prev=torch.zeros(1, 2, 100, dtype=torch.uint8),
                              bound=torch.zeros(1, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("nmax,top_k", [(320, 61), (8192, 125), (32768, 125), (8192, 1021)],
                         ids=["smollm2-5k", "128k-2048", "512k-2048", "128k-16384"])
def test_cuda_kernel_equals_the_reference_over_drifting_steps(nmax, top_k):
    """On the GPU, steps fed back as PRR runs them: every output and flag row equal to the reference on the
    CPU, and the selection to the full Triton top-K."""
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(2, 8, nmax, generator=gen)
    nblk = torch.tensor([nmax, nmax * 3 // 4], dtype=torch.int32)
    flags = torch.zeros(2, 8, nmax, dtype=torch.uint8)
    fc = flags.cuda()
    held = 0
    for step in range(5):
        scores = base + 0.2 * torch.randn(base.shape, generator=gen)
        ref = reference.select_blocks_guessed(scores, nblk, top_k, spec_k=int(1.5 * top_k),
                                              num_blocks_next=nblk + 1, prev=flags)
        got = select_blocks_guessed(scores.cuda(), nblk.cuda(), top_k, spec_k=int(1.5 * top_k),
                                    num_blocks_next=nblk.cuda() + 1, prev=fc)
        for name, a, b in zip(NAMES, ref, got, strict=True):
            assert torch.equal(a, b.cpu()), (step, name)
        assert torch.equal(flags, fc.cpu())
        full = select_triton.select_blocks(scores.cuda(), nblk.cuda(), top_k, 1, 2)
        assert torch.equal(got[0], full[0]) and torch.equal(got[1], full[1])
        held += int((got[4][1] == HELD).sum())
        base = scores
    assert held >= 4 * 16 * 0.9
