"""The decode step's fused small ops (RMSNorm + residual, SwiGLU, RoPE on the fused q/k/v, the KV append):
each Triton kernel against its PyTorch twin, and the twins against float64 math.

Without a GPU the kernels run in Triton's CPU interpreter in float32 and float16; on a GPU (``gpu``) natively in
bf16 and fp16. Rule as in test_kernels: error against float64 of the same rounded inputs at most 2x PyTorch's
own in the input dtype plus one rounding step; outputs from ``torch.empty`` are poisoned with NaN."""

import pytest
import torch

import prr
from prr import KVCache
from prr.model.rope import RopeScaling, Rotary
from prr.ops import fused
from prr.ops.backend import use_backend
from prr.ops.fused import reference as ref

from conftest import assert_low_precision_rule, make_cache

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
LOWP = [torch.bfloat16, torch.float16] if CUDA else [torch.float32, torch.float16]


pytestmark = pytest.mark.usefixtures("poison_empty")


def _rows(r, h, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, h, generator=g) * scale).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("r,h", [(1, 64), (3, 576), (4, 4096), (2, 1000)], ids=lambda v: str(v))
@pytest.mark.parametrize("with_res", [False, True], ids=["norm", "add+norm"])
def test_rms_norm_kernel(dtype, r, h, with_res):
    x = _rows(r, h, dtype, 1, scale=3.0)
    x[0, : h // 3] *= 40  # unkind: a row with a few large entries
    w = _rows(1, h, dtype, 2)[0]
    res = _rows(r, h, dtype, 3) if with_res else None
    with use_backend("triton"):
        y, s = fused.rms_norm(x, w, 1e-5, res)
    y_ref, s_ref = ref.rms_norm(x, w, 1e-5, res)
    assert y.dtype == y_ref.dtype and s.dtype == x.dtype and y.shape == (r, h)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)  # the residual sum is one rounding either way
    sd = s_ref.double().cpu()
    exact = sd * torch.rsqrt(sd.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double().cpu()
    assert_low_precision_rule(y, exact, y_ref, dtype)


def test_rms_norm_zero_row_and_bad_inputs():
    x = torch.zeros(2, 32, device=DEVICE)
    w = torch.ones(32, device=DEVICE)
    with use_backend("triton"):
        y, _ = fused.rms_norm(x, w, 1e-6)
    assert torch.all(y == 0)
    with pytest.raises(ValueError, match="w has 16 entries"):
        fused.rms_norm(x, w[:16], 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused.rms_norm(x, w, 1e-6, residual=x[:1])


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("r,f", [(1, 1536), (3, 100), (2, 3000)], ids=lambda v: str(v))
def test_swiglu_kernel(dtype, r, f):
    gu = _rows(r, 2 * f, dtype, 4, scale=4.0)
    with use_backend("triton"):
        out = fused.swiglu(gu)
    own = ref.swiglu(gu)
    g, u = gu.double().cpu().chunk(2, dim=-1)
    exact = g * torch.sigmoid(g) * u
    assert out.shape == (r, f) and out.dtype == dtype
    assert_low_precision_rule(out, exact, own, dtype)
    with pytest.raises(ValueError, match="even width"):
        fused.swiglu(gu[:, :-1])


ROPE_CASES = [  # (hq, hkv, d, interleaved, scaling)
    pytest.param(8, 2, 64, False, RopeScaling(), id="half-G4-d64"),
    pytest.param(9, 3, 64, False, RopeScaling(), id="half-G3-d64-smollm"),
    pytest.param(4, 4, 128, True, RopeScaling(), id="interleaved-d128"),
    pytest.param(8, 2, 64, False, RopeScaling(type="yarn", factor=4.0, original_max_position=64), id="yarn"),
]


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("hq,hkv,d,interleaved,scaling", ROPE_CASES)
def test_rope_qkv_kernel_matches_the_models_rotary(dtype, hq, hkv, d, interleaved, scaling):
    b = 3
    qkv = _rows(b, (hq + 2 * hkv) * d, dtype, 5, scale=2.0)
    pos = torch.tensor([0, 17, 70000], device=DEVICE)  # far positions: large angles
    rot = Rotary(d, 10000.0, scaling, interleaved=interleaved, device=DEVICE)
    cos, sin = rot.cos_sin(pos)
    with use_backend("triton"):
        q, k, v = fused.rope_qkv(qkv, cos, sin, hq, hkv, d, interleaved)
    q_ref, k_ref, v_ref = ref.rope_qkv(qkv, cos, sin, hq, hkv, d, interleaved)
    # the reference is the model's own unfused rotation
    qs, ks, vs = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    torch.testing.assert_close(q_ref, rot.apply(qs.reshape(b, 1, hq, d), pos[:, None])[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(k_ref, rot.apply(ks.reshape(b, 1, hkv, d), pos[:, None])[:, 0], rtol=0, atol=0)
    assert torch.equal(v, vs.reshape(b, hkv, d)) and torch.equal(v, v_ref)
    for out, own, x, h in ((q, q_ref, qs, hq), (k, k_ref, ks, hkv)):
        xd = x.double().cpu().reshape(b, h, d)
        c, s = cos.double().cpu()[:, None], sin.double().cpu()[:, None]
        if interleaved:
            a, bb = xd[..., 0::2], xd[..., 1::2]
            exact = torch.stack([a * c - bb * s, a * s + bb * c], -1).flatten(-2)
        else:
            a, bb = xd[..., : d // 2], xd[..., d // 2:]
            exact = torch.cat([a * c - bb * s, a * s + bb * c], -1)
        assert out.dtype == dtype and out.is_contiguous()
        assert_low_precision_rule(out, exact, own, dtype)


def test_rope_qkv_bad_shapes():
    qkv = torch.zeros(2, (8 + 4) * 64)
    cos = sin = torch.zeros(2, 32)
    with pytest.raises(ValueError, match="qkv must be"):
        fused.rope_qkv(qkv[:, :-64], cos, sin, 8, 2, 64)
    with pytest.raises(ValueError, match="cos"):
        fused.rope_qkv(qkv, cos[:, :16], sin, 8, 2, 64)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_append_kv_kernel_equals_the_cache_append(dtype):
    base = make_cache([5, 31, 16], hkv=2, d=64, page_size=16, capacity=48, dtype=torch.float32)

    def fresh():
        return KVCache(base.k.to(DEVICE, dtype).clone(), base.v.to(DEVICE, dtype).clone(),
                       base.page_table.to(DEVICE), base.seq_lens.to(DEVICE).clone())

    a, b = fresh(), fresh()
    g = torch.Generator().manual_seed(7)
    for _ in range(3):  # crosses page boundaries (31 -> 34, 16 -> 19)
        k = torch.randn(3, 2, 64, generator=g).to(DEVICE, dtype)
        v = torch.randn(3, 2, 64, generator=g).to(DEVICE, dtype)
        with use_backend("triton"):
            fused.append_kv(a, k, v)
        b.append(k, v)
    assert torch.equal(a.seq_lens, b.seq_lens) and a.seq_lens.tolist() == [8, 34, 19]
    assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    with pytest.raises(ValueError, match="k"):
        fused.append_kv(a, k[:, :1], v[:, :1])


def test_append_kv_kernel_never_writes_past_a_full_cache():
    """On CUDA the value check would sync, so the kernel masks: a full sequence's append writes nothing."""
    base = make_cache([32], hkv=1, d=64, page_size=16, capacity=32, dtype=torch.float32)
    cache = KVCache(base.k.to(DEVICE), base.v.to(DEVICE), base.page_table.to(DEVICE), base.seq_lens.to(DEVICE))
    before = cache.k.clone()
    from prr.ops.fused import triton as kernels

    cache.seq_lens.fill_(32)
    ones = torch.ones(1, 1, 64, device=DEVICE)
    with use_backend("triton"):
        kernels._append_kernel[(1, 1)](
            ones, ones, cache.k, cache.v, cache.page_table, cache.seq_lens, cache.k, cache.k, 32,
            cache.k.shape[0], 0, 64, 64, 64, 64, *cache.k.stride()[:3], *cache.v.stride()[:3],
            cache.page_table.stride(0), 0, 0, 0, D=64, PAGE=16, OFFSET=0, QUEST=False, BS=1, num_warps=1)
    assert torch.equal(cache.k, before)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_append_kv_folds_quest_metadata_with_lengths_advanced_up_front(dtype, block_size):
    """The model step's append: the lengths already count the token (one add for all layers), the kernel
    stores it at length - 1 and folds it into its Quest block's min/max, exactly as the cache's append
    followed by ``quest_metadata_append`` (blocks opened and extended, pages crossed)."""
    base = make_cache([5, 31, 16], hkv=2, d=64, page_size=16, capacity=96, dtype=torch.float32)

    def fresh():
        c = KVCache(base.k.to(DEVICE, dtype).clone(), base.v.to(DEVICE, dtype).clone(),
                    base.page_table.to(DEVICE), base.seq_lens.to(DEVICE).clone())
        return c, prr.quest_metadata(c, block_size)

    (a, (amin, amax)), (b, (bmin, bmax)) = fresh(), fresh()
    g = torch.Generator().manual_seed(8)
    for _ in range(18):
        k = torch.randn(3, 2, 64, generator=g).to(DEVICE, dtype)
        v = torch.randn(3, 2, 64, generator=g).to(DEVICE, dtype)
        a.seq_lens.add_(1)
        with use_backend("triton"):
            fused.append_kv(a, k, v, quest=(amin, amax, block_size), advanced=True)
        b.append(k, v)
        prr.quest_metadata_append(bmin, bmax, b, block_size)
    assert a.seq_lens.tolist() == b.seq_lens.tolist() == [23, 49, 34]
    assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    assert torch.equal(amin, bmin) and torch.equal(amax, bmax)
    c, (cmin, cmax) = fresh()  # the reference path of the same call
    for _ in range(2):
        k = torch.randn(3, 2, 64, generator=g).to(DEVICE, dtype)
        c.seq_lens.add_(1)
        ref.append_kv(c, k, k, quest=(cmin, cmax, block_size), advanced=True)
    assert c.seq_lens.tolist() == [7, 33, 18]
