"""The decode step's small ops outside attention, fused (twins: ``triton.py``): RMSNorm with the residual add
before it, SwiGLU, RoPE on the fused q/k/v product, and the KV cache append.

Each reference computes exactly what the model's unfused PyTorch code computes, with the same roundings (the
residual sum rounded to the model's dtype, the normalized row rounded before the weight multiplies it, SiLU
rounded before the product, RoPE in float32 rounded once), so swapping in a kernel changes float rounding
order at most.
"""

from __future__ import annotations

import torch

from ... import _checks as check
from ...cache import KVCache


def check_norm_inputs(x, w, residual) -> None:
    check.tensor("x", x, ndim=2, dtypes=check.FLOAT_DTYPES)
    check.tensor("w", w, ndim=1, dtypes=check.FLOAT_DTYPES, device=x.device)
    if w.shape[0] != x.shape[1]:
        raise ValueError(f"w has {w.shape[0]} entries for rows of {x.shape[1]}")
    if residual is not None:
        check.tensor("residual", residual, device=x.device)
        check.shape("residual", residual, tuple(x.shape))
        check.same_dtype("residual", residual, x.dtype, "x")


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """``s = x + residual`` (rounded to x's dtype; ``s = x`` without one), then ``rms_norm(s) * w``.

    Args: ``x [R, H]``, ``w [H]``, ``residual [R, H]`` or None.
    Returns: ``(y [R, H], s [R, H])``: the normalized rows (dtype of ``x * w``) and the new residual stream.
    """
    check_norm_inputs(x, w, residual)
    s = x if residual is None else x + residual
    sf = s.float()
    y = (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype) * w
    return y, s


def check_swiglu_inputs(gu) -> None:
    check.tensor("gu", gu, ndim=2, dtypes=check.FLOAT_DTYPES)
    if gu.shape[1] % 2:
        raise ValueError(f"gu must hold gate and up side by side (an even width), got {gu.shape[1]}")


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` of the fused gate/up product ``gu [R, 2F]`` (g: the first F columns): ``[R, F]``."""
    check_swiglu_inputs(gu)
    g, u = gu.chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u


def check_rope_inputs(qkv, cos, sin, hq, hkv, d) -> None:
    check.tensor("qkv", qkv, ndim=2, dtypes=check.FLOAT_DTYPES)
    if qkv.shape[1] != (hq + 2 * hkv) * d:
        raise ValueError(f"qkv must be [B, (Hq + 2 Hkv) D] = [B, {(hq + 2 * hkv) * d}], got {list(qkv.shape)}")
    if d % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {d}")
    for name, t in (("cos", cos), ("sin", sin)):
        check.tensor(name, t, ndim=2, dtypes=(torch.float32,), device=qkv.device)
        check.shape(name, t, (qkv.shape[0], d // 2))


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, hq: int, hkv: int, d: int,
             interleaved: bool = False):
    """Split one token per row of the fused product ``qkv [B, (Hq + 2 Hkv) D]`` into ``q [B, Hq, D]``,
    ``k, v [B, Hkv, D]`` (contiguous), q and k rotated by ``cos, sin [B, D/2]`` (float32, YaRN's scale
    included: :meth:`prr.model.rope.Rotary.cos_sin`): half-split pairs ``(i, i + D/2)``, or adjacent pairs
    ``(2i, 2i + 1)`` when `interleaved`. Computes in float32, rounds once to qkv's dtype."""
    check_rope_inputs(qkv, cos, sin, hq, hkv, d)
    b = qkv.shape[0]
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]

    def rot(x, h):
        xf = x.reshape(b, h, d).float()
        if interleaved:
            a, bb = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack([a * c - bb * s, a * s + bb * c], dim=-1).flatten(-2)
        else:
            a, bb = xf[..., : d // 2], xf[..., d // 2:]
            out = torch.cat([a * c - bb * s, a * s + bb * c], dim=-1)
        return out.to(x.dtype)

    return rot(q, hq), rot(k, hkv), v.reshape(b, hkv, d).contiguous()


def check_append_inputs(cache: KVCache, k, v, quest=None) -> None:
    check.tensor("k", k, ndim=3, device=cache.device)
    check.same_dtype("k", k, cache.dtype, "the cache")
    check.shape("k", k, (cache.batch, cache.num_kv_heads, cache.head_dim))
    check.shape("v", v, tuple(k.shape))
    if quest is not None:
        from ..metadata.reference import check_quest_append

        kmin, kmax, block_size = quest
        check_quest_append(kmin, kmax, cache, block_size)


def append_kv(cache: KVCache, k: torch.Tensor, v: torch.Tensor, quest=None, advanced: bool = False) -> None:
    """Store one token per sequence (``k, v [B, Hkv, D]``) at ``seq_lens`` and advance it
    (:meth:`prr.cache.KVCache.append`).

    ``quest=(kmin, kmax, block_size)``: also fold the token into its block's Quest min/max (what
    :func:`prr.ops.quest_metadata_append` does after the append; one kernel for both on a GPU).
    ``advanced``: ``seq_lens`` already count this token (a model advanced every layer's length at once), so it
    is stored at ``seq_lens - 1`` and the lengths stay as they are."""
    if advanced:
        cache.seq_lens.sub_(1)
    cache.append(k, v)
    if quest is not None:
        from ..metadata.reference import quest_metadata_append

        kmin, kmax, block_size = quest
        quest_metadata_append(kmin, kmax, cache, block_size)
