"""The guessed top-K: the same selection as the full top-K at every step, whatever the guess; the Triton kernel
(CPU interpreter) equal to its PyTorch twin in every output, bit for bit."""

import pytest
import torch

import prr
from prr.ops import backend
from prr.ops.guessed import HELD, NARROWED, SHORT, TOO_HIGH, TOO_LOW, reference, select_blocks_guessed
from prr.ops.select import triton as select_triton

pytestmark = pytest.mark.usefixtures("poison_empty")

NAMES = ("indices", "counts", "next_guess", "p_indices", "p_counts", "stats")


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _both(scores, nblk, top_k, guess, n_sink=1, n_local=2, **kw):
    """Reference and Triton results (asserted equal), and the full Triton top-K's selection."""
    ref = reference.select_blocks_guessed(scores, nblk, top_k, n_sink, n_local, guess=guess, **kw)
    with backend.use_backend("triton"):
        g = None if guess is None else guess.clone()
        tri = select_blocks_guessed(scores, nblk, top_k, n_sink, n_local, guess=g, **kw)
    for name, a, b in zip(NAMES, ref, tri, strict=True):
        assert torch.equal(_bits(a), _bits(b)), name
    full = select_triton.select_blocks(scores.float(), nblk.to(torch.int32), top_k, n_sink, n_local)
    assert torch.equal(tri[0], full[0]) and torch.equal(tri[1], full[1])
    return tri


@pytest.mark.parametrize("nmax", [300, 2000], ids=["one-search-row", "two-stage-row"])
@pytest.mark.parametrize("interp", [True, False], ids=["interp", "bisect"])
def test_any_guess_gives_the_full_selection(nmax, interp):
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 2, nmax, generator=gen)
    nblk = torch.tensor([nmax, nmax - 37, 9], dtype=torch.int32)  # rows of different lengths, one short
    kth = scores.sort(-1, descending=True).values[..., 30]
    paths = set()
    for guess in (kth, kth - 0.3, kth + 0.5, kth - 3.0, torch.full_like(kth, float("-inf")),
                  torch.full_like(kth, float("nan")), torch.full_like(kth, float("inf"))):
        out = _both(scores, nblk, 25, guess, interp=interp, guess_k=25)  # 64 groups gathered of 125
        paths |= set(out[5][1].flatten().tolist())
    want = {HELD, TOO_HIGH, SHORT} | ({NARROWED} if nmax > 512 else set())
    assert paths == want


def test_guess_fed_back_over_drifting_steps_holds_and_stays_exact():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(2, 2, 1500, generator=gen)
    nblk = torch.tensor([1500, 1400], dtype=torch.int32)
    guess = torch.full((2, 2), float("-inf"))
    held = 0
    for _ in range(12):
        scores = base + 0.15 * torch.randn(base.shape, generator=gen)
        idx, cnt, guess, p_idx, p_cnt, stats = _both(scores, nblk, 40, guess, guess_k=80, spec_k=60)
        held += int((stats[1] == HELD).sum())
        # P holds S's dynamic blocks at least (its capacity exceeds K) and never more than its capacity
        assert bool((p_cnt <= 1 + 2 + 60).all())
        assert bool(prr.selection_contains(idx, cnt, p_idx, p_cnt).sum(-1).ge(cnt).all())
        base = scores
    assert held >= 40  # after the first step the fed-back guess holds (48 rows after the first 4)


def test_ties_all_equal_and_minus_inf():
    scores = torch.zeros(2, 2, 700)
    scores[0, 1, 100:400] = 1.0  # a plateau of ties larger than K
    scores[1, 0] = float("-inf")  # no dynamic candidate at all
    scores[1, 1, :] = float("-inf")
    scores[1, 1, 50:55] = 2.0  # fewer finite candidates than K
    nblk = torch.tensor([700, 650], dtype=torch.int32)
    for g in (0.0, 1.0, -1.0, 0.5):
        _both(scores, nblk, 20, torch.full((2, 2), g))


def test_budget_over_the_row_and_capacities():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 3, 600, generator=gen)
    nblk = torch.tensor([40, 600], dtype=torch.int32)
    guess = torch.zeros(2, 3)
    _both(scores, nblk, 50, guess)  # row 0: K >= its blocks (every block, SHORT)
    _both(scores, nblk, 20, guess, spec_k=10)  # P's capacity under K
    _both(scores, nblk, 20, guess, spec_k=45, guess_k=20)  # next guess aims at K itself
    _both(scores, nblk, 20, guess, num_blocks_next=nblk + 1, n_sink=0, n_local=1)  # P over the next step's blocks


def test_outputs_alias_the_guess_and_the_previous_selection():
    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(1, 2, 900, generator=gen)
    nblk = torch.tensor([900], dtype=torch.int32)
    want = reference.select_blocks_guessed(scores, nblk, 30, guess=torch.full((1, 2), 1.0))
    with backend.use_backend("triton"):
        guess = torch.full((1, 2), 1.0)
        bufs = (torch.full((1, 2, 33), 7, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int32), guess, None,
                None, None)
        got = select_blocks_guessed(scores, nblk, 30, guess=guess, out=bufs)
    assert got[2] is guess and got[0] is bufs[0]
    for name, a, b in zip(NAMES, want, got, strict=True):
        assert torch.equal(_bits(a), _bits(b)), name


def test_reference_equals_select_blocks_in_float64():
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(2, 2, 800, generator=gen, dtype=torch.float64)
    nblk = torch.tensor([800, 333])
    got = reference.select_blocks_guessed(scores, nblk, 33, guess=torch.zeros(2, 2))
    want = prr.select_blocks(scores, nblk, 33)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_stats_count_candidates_and_paths():
    scores = torch.arange(1000, dtype=torch.float32).view(1, 1, 1000)
    nblk = torch.tensor([1000], dtype=torch.int32)
    # dynamic blocks 1..997 score their id: tau = 900 leaves 98 candidates (900..997)
    out = _both(scores, nblk, 10, torch.tensor([[900.0]]))
    assert out[5].flatten().tolist() == [98, HELD]
    out = _both(scores, nblk, 10, torch.tensor([[990.0]]))
    assert out[5].flatten().tolist() == [8, TOO_HIGH]
    out = _both(scores, nblk, 10, torch.tensor([[0.0]]), guess_k=10)  # 32 of 63 groups gathered: narrowed
    count, path = out[5].flatten().tolist()
    assert path == NARROWED and 10 <= count <= 32 * 16
    ties = torch.zeros(1, 1, 1000)  # every group ties at its max: no threshold narrows, the full search runs
    out = _both(ties, nblk, 10, torch.tensor([[-1.0]]), guess_k=10)
    assert out[5].flatten().tolist() == [-1, TOO_LOW]


def test_bad_inputs():
    scores = torch.randn(1, 2, 100)
    nblk = torch.tensor([100])
    with pytest.raises(ValueError, match="guess"):
        select_blocks_guessed(scores, nblk, 10, guess=torch.zeros(2, 1))
    with pytest.raises(TypeError, match="guess"):
        select_blocks_guessed(scores, nblk, 10, guess=torch.zeros(1, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="exactly one"):
        select_blocks_guessed(scores, nblk, 10)
    with pytest.raises(ValueError, match="guess_k"):
        select_blocks_guessed(scores, nblk, 10, guess=torch.zeros(1, 2), guess_k=5)


@pytest.mark.parametrize("nmax", [300, 3000], ids=["one-search-row", "two-stage-row"])
def test_previous_selection_bounds_the_guess(nmax):
    """With the previous step's selection as ``prev`` the guess holds by construction (its K dynamic blocks
    all score at or above the threshold), also read in place from the output buffers."""
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(2, 2, nmax, generator=gen)
    nblk = torch.tensor([nmax, nmax - 100], dtype=torch.int32)
    prev = prr.select_blocks(base, nblk, 30)
    paths = []
    for _ in range(4):
        scores = base + 0.3 * torch.randn(base.shape, generator=gen)
        out = _both(scores, nblk, 30, None, prev=prev, spec_k=45)
        paths += out[5][1].flatten().tolist()
        with backend.use_backend("triton"):  # in place: the previous selection is the output buffer
            bufs = (prev[0].clone(), prev[1].clone(), None, None, None, None)
            inplace = select_blocks_guessed(scores, nblk, 30, prev=(bufs[0], bufs[1]), spec_k=45, out=bufs)
        for name, a, b in zip(NAMES, out, inplace, strict=True):
            assert torch.equal(_bits(a), _bits(b)), name
        prev, base = (out[0], out[1]), scores
    assert set(paths) <= {HELD, NARROWED}
    garbage = (torch.full_like(prev[0], -5), torch.full_like(prev[1], 3))  # no valid block: -inf, as a guess
    _both(base, nblk, 30, None, prev=garbage)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("nmax,top_k", [(320, 61), (8192, 125), (32768, 125), (8192, 1021)],
                         ids=["smollm2-5k", "128k-2048", "512k-2048", "128k-16384"])
def test_cuda_kernel_equals_the_reference_over_drifting_steps(nmax, top_k):
    """On the GPU, steps fed back as PRR runs them (the previous selection bounds the guess): every output bit
    for bit equal to the reference on the CPU, and the selection to the full Triton top-K."""
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(2, 8, nmax, generator=gen)
    nblk = torch.tensor([nmax, nmax * 3 // 4], dtype=torch.int32)
    prev = None
    for step in range(5):
        scores = base + 0.2 * torch.randn(base.shape, generator=gen)
        kw = {"prev": prev} if prev is not None else {"guess": torch.full((2, 8), float("-inf"))}
        ref = reference.select_blocks_guessed(scores, nblk, top_k, spec_k=int(1.5 * top_k),
                                              num_blocks_next=nblk + 1, **kw)
        kwc = {k: (tuple(t.cuda() for t in v) if isinstance(v, tuple) else v.cuda()) for k, v in kw.items()}
        got = select_blocks_guessed(scores.cuda(), nblk.cuda(), top_k, spec_k=int(1.5 * top_k),
                                    num_blocks_next=nblk.cuda() + 1, **kwc)
        for name, a, b in zip(NAMES, ref, got, strict=True):
            assert torch.equal(_bits(a), _bits(b.cpu())), (step, name)
        full = select_triton.select_blocks(scores.cuda(), nblk.cuda(), top_k, 1, 2)
        assert torch.equal(got[0], full[0]) and torch.equal(got[1], full[1])
        prev, base = (ref[0], ref[1]), scores
