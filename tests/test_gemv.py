"""The decode step's GEMV (``prr.ops.gemv.linear``): the Triton kernel against float64 math and PyTorch's own
``F.linear`` in the same dtype, by the rule of test_fused (error at most 2x PyTorch's plus one rounding step).

Without a GPU the kernel runs in Triton's CPU interpreter in float32 and float16; on a GPU natively in bf16 and
fp16. Shapes include K and N that are no multiple of the tiles, several rows, a bias, and unkind rows."""

import pytest
import torch
import torch.nn.functional as F

from prr.ops import gemv
from prr.ops.backend import use_backend
from prr.ops.gemv import triton as kernels

from conftest import assert_low_precision_rule

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
LOWP = [torch.bfloat16, torch.float16] if CUDA else [torch.float32, torch.float16]

pytestmark = pytest.mark.usefixtures("poison_empty")


def _rand(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def _check(y, x, w, b, dtype):
    exact = F.linear(x.double().cpu(), w.double().cpu(), None if b is None else b.double().cpu())
    own = F.linear(x, w, b)
    assert y.shape == own.shape and y.dtype == own.dtype
    assert_low_precision_rule(y, exact, own, dtype)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k", [(8, 16), (37, 100), (64, 576), (24, 1536)], ids=lambda v: str(v))
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_linear_kernel(dtype, m, n, k, with_bias):
    x = _rand((m, k), dtype, 1)
    x[0, : k // 4] *= 30  # unkind: a row with a block of large entries
    w = _rand((n, k), dtype, 2, scale=0.05)
    b = _rand((n,), dtype, 3) if with_bias else None
    with use_backend("triton"):
        y = kernels.linear(x, w, b)
    _check(y, x, w, b, dtype)


@pytest.mark.parametrize("bn,bk", [(4, 16), (8, 64), (16, 128), (None, None)])
def test_linear_kernel_tiles(bn, bk):
    """Other tiles than the default (the sweep's): K spans several tiles and ends inside one."""
    x, w = _rand((2, 200), torch.float32, 4), _rand((45, 200), torch.float32, 5)
    with use_backend("triton"):
        y = kernels.linear(x, w, bn=bn, bk=bk)
    _check(y, x, w, None, torch.float32)


def test_plan_follows_the_measured_shape_classes():
    bf = torch.bfloat16
    assert gemv.plan(1, 4096, 4096, bf) == ("fma", 0, 0)
    assert gemv.plan(1, 49152, 576, bf) is None  # SmolLM2's tied head: cuBLAS
    assert gemv.plan(1, 128256, 4096, bf) == ("fma", 0, 0)  # Llama's head: the kernel
    assert gemv.plan(4, 4096, 4096, bf) == ("tc", 32, 512)
    assert gemv.plan(2, 6144, 4096, torch.float16) == ("tc", 64, 256)
    assert gemv.plan(4, 6144, 4096, torch.float32) is None  # tensor cores would round to TF32
    assert gemv.plan(4, 28672, 4096, bf) is None  # gate/up: cuBLAS
    assert gemv.plan(2, 960, 576, bf) == gemv.plan(4, 576, 1536, bf) == ("fma", 0, 0)
    assert gemv.plan(8, 960, 576, bf) is None and gemv.plan(9, 64, 4096, bf) is None


def test_linear_dispatch_and_bad_inputs(monkeypatch):
    x, w = _rand((9, 32), torch.float32, 6), _rand((8, 32), torch.float32, 7)
    called = []
    monkeypatch.setattr(kernels, "linear", lambda *a, **k: called.append(a) or F.linear(*a))
    with use_backend("triton"):
        gemv.linear(x, w)  # nine rows: F.linear
        assert not called
        gemv.linear(x[:1], w)  # one row: the kernel
        assert len(called) == 1
        gemv.linear(x[:1], w.t().contiguous().t())  # a transposed weight: F.linear
        assert len(called) == 1
        with pytest.raises(ValueError, match="rows of 32"):
            gemv.linear(x[:1], w[:, :16])
        with pytest.raises(ValueError, match="bias"):
            gemv.linear(x[:1], w, torch.zeros(7, device=DEVICE))
        monkeypatch.setattr(gemv, "WIDE_N", 8)
        gemv.linear(x[:1], w)  # 8 output rows of K = 32 < NARROW_K: the shape cuBLAS wins, F.linear
        assert len(called) == 1
    if not CUDA:  # CPU tensors take the reference unless the backend says triton
        torch.testing.assert_close(gemv.linear(x[:1], w), F.linear(x[:1], w), rtol=0, atol=0)


def test_linear_empty_and_zero_k():
    with use_backend("triton"):
        assert kernels.linear(torch.zeros(1, 8, device=DEVICE), torch.zeros(0, 8, device=DEVICE)).shape == (1, 0)
        b = torch.arange(3.0, device=DEVICE)
        y = kernels.linear(torch.zeros(2, 0, device=DEVICE), torch.zeros(3, 0, device=DEVICE), b)
    torch.testing.assert_close(y, b.expand(2, 3))


@pytest.mark.parametrize("m", [2, 4, 8])
@pytest.mark.parametrize("n,k,bn,bk", [(37, 100, 32, 64), (64, 576, 32, 512), (96, 1536, 64, 256)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_linear_dot_kernel(m, n, k, bn, bk, with_bias):
    """The tensor-core variant for a few rows (fp16 here; bf16 on a GPU)."""
    dtype = torch.bfloat16 if CUDA else torch.float16
    x = _rand((m, k), dtype, 8)
    x[-1, k // 2:] *= 30
    w = _rand((n, k), dtype, 9, scale=0.05)
    b = _rand((n,), dtype, 10) if with_bias else None
    with use_backend("triton"):
        y = kernels.linear_dot(x, w, b, bn=bn, bk=bk)
    _check(y, x, w, b, dtype)


def test_linear_dot_refuses():
    with pytest.raises(TypeError, match="bf16/fp16"):
        kernels.linear_dot(torch.zeros(2, 8, device=DEVICE), torch.zeros(4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="16 rows"):
        kernels.linear_dot(torch.zeros(17, 8, device=DEVICE, dtype=torch.float16),
                           torch.zeros(4, 8, device=DEVICE, dtype=torch.float16))
