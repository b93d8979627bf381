"""A Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU, tied or untied embeddings) on prr's KV cache.

The model is numerics only: :meth:`Llama.prefill` runs the prompt densely (causal SDPA) and hands each layer's
keys and values to a ``store`` callback; :meth:`Llama.decode` runs one token per sequence and asks an
``attend(layer, q, k, v)`` callback for the attention output, so the engine decides which attention
(dense, serialized DSA, PRR) each layer uses and owns the caches.

Weights are a dict of tensors named ``embed``, ``norm``, ``lm_head`` (absent when tied) and
``layers.{i}.{attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down}`` (optionally ``bq, bk, bv``,
Qwen2's biases); matrices are ``[out, in]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..ops import fused, gemv
from .config import ModelConfig
from .rope import Rotary

LAYER_WEIGHTS = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


class Llama:
    """``fuse``: one matrix for q, k, v and one for gate and up per layer (built once here; the dict's ``wq``,
    ``wk``, ``wv``, ``w_gate``, ``w_up`` become views into them, so no memory is added): a decode step then
    launches two matrix-vector products fewer per layer and reads the same bytes; and the decode step's small
    ops run fused (:meth:`decode`). ``fuse=False`` keeps both apart: the baseline."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], tp=None, fuse: bool = True):
        self.cfg = cfg
        # Tensor parallelism (prr.model.tp.TensorParallel): sums the row-parallel projections (wo, w_down) over
        # the ranks and owns the vocabulary-sharded embedding and LM head; None on one device.
        self.tp = tp
        missing = [k for k in self.expected_names() if k not in weights]
        if missing:
            raise ValueError(f"weights are missing {len(missing)} tensors, e.g. {missing[:3]}")
        self.w = weights
        self.device = weights["embed"].device
        self.dtype = weights["embed"].dtype
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base, cfg.rope_scaling, interleaved=cfg.rope_interleaved,
                             device=self.device)
        self._qkv: dict[int, tuple] = {}
        self._gate_up: dict[int, torch.Tensor] = {}
        self.fuse = fuse
        if fuse:
            for i in range(cfg.num_layers):
                self._fuse_layer(i)

    def _fuse_layer(self, i: int) -> None:
        p, w = f"layers.{i}.", self.w
        qkv = [w[p + n] for n in ("wq", "wk", "wv")]
        if len({(t.dtype, t.device, t.shape[1]) for t in qkv}) != 1:
            return  # mixed layouts (e.g. a quantized loader's leftovers): keep the separate products
        sizes = [t.shape[0] for t in qkv]
        fused = torch.cat(qkv)
        for n, view in zip(("wq", "wk", "wv"), fused.split(sizes), strict=True):
            w[p + n] = view  # the separate tensors are released; the dict stays complete
        bias = None
        if all(p + b in w for b in ("bq", "bk", "bv")):
            bias = torch.cat([w[p + b] for b in ("bq", "bk", "bv")])
            for n, view in zip(("bq", "bk", "bv"), bias.split(sizes), strict=True):
                w[p + n] = view
        elif any(p + b in w for b in ("bq", "bk", "bv")):
            return  # partial biases: keep the separate products
        self._qkv[i] = (fused, bias, sizes)
        gu = torch.cat([w[p + "w_gate"], w[p + "w_up"]])
        w[p + "w_gate"], w[p + "w_up"] = gu.chunk(2)
        self._gate_up[i] = gu

    def expected_names(self) -> list[str]:
        names = ["embed", "norm"] + ([] if self.cfg.tie_embeddings else ["lm_head"])
        return names + [f"layers.{i}.{n}" for i in range(self.cfg.num_layers) for n in LAYER_WEIGHTS]

    # ---- pieces ------------------------------------------------------------------------------------------
    def rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [..., T, H, D]`` at positions ``pos [..., T]`` (the config's RoPE variant, see
        :mod:`prr.model.rope`)."""
        return self.rotary.apply(x, pos)

    def qkv(self, i: int, x: torch.Tensor, pos: torch.Tensor):
        """``x [B, T, hidden]`` -> RoPE'd ``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]`` of layer i."""
        c, p = self.cfg, f"layers.{i}."
        h = rms_norm(x, self.w[p + "attn_norm"], c.rms_eps)
        if i in self._qkv:
            fused, bias, sizes = self._qkv[i]
            q, k, v = F.linear(h, fused, bias).split(sizes, dim=-1)
        else:
            q, k, v = (F.linear(h, self.w[p + n], self.w.get(p + b)) for n, b in (("wq", "bq"), ("wk", "bk"),
                                                                                   ("wv", "bv")))
        q = q.unflatten(-1, (c.num_q_heads, c.head_dim))
        k = k.unflatten(-1, (c.num_kv_heads, c.head_dim))
        v = v.unflatten(-1, (c.num_kv_heads, c.head_dim))
        return self.rope(q, pos), self.rope(k, pos), v

    def mlp_residual(self, i: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """``x + wo(attn)``, then the SwiGLU block with its residual."""
        c, p = self.cfg, f"layers.{i}."
        x = x + self._reduce(F.linear(attn, self.w[p + "wo"]))
        h = rms_norm(x, self.w[p + "ffn_norm"], c.rms_eps)
        if i in self._gate_up:
            g, u = F.linear(h, self._gate_up[i]).chunk(2, dim=-1)
        else:
            g, u = F.linear(h, self.w[p + "w_gate"]), F.linear(h, self.w[p + "w_up"])
        h = F.silu(g) * u
        return x + self._reduce(F.linear(h, self.w[p + "w_down"]))

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.tp is None else self.tp.all_reduce(x)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.w["embed"]) if self.tp is None else self.tp.embed(tokens, self.w["embed"])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h = rms_norm(x, self.w["norm"], self.cfg.rms_eps)
        out = F.linear(h, self.w["embed"] if self.cfg.tie_embeddings else self.w["lm_head"]).float()
        return out if self.tp is None else self.tp.gather_logits(out)

    # ---- passes ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, store: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None],
                all_logits: bool = False, chunk: int = 1024) -> torch.Tensor:
        """Dense causal pass over ``tokens [B, T]``; ``store(layer, q, k, v)`` receives each layer's RoPE'd
        ``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]``. Returns logits ``[B, V]`` of the last position, or
        ``[B, T, V]`` with `all_logits`. Attention runs in query chunks to bound memory on long prompts."""
        c = self.cfg
        b, t = tokens.shape
        if t > c.max_context:
            raise ValueError(f"the prompt has {t} tokens, more than the model's context ({c.max_context})")
        pos = torch.arange(t, device=self.device).expand(b, t)
        x = self.embed(tokens)
        g = c.num_q_heads // c.num_kv_heads
        for i in range(c.num_layers):
            q, k, v = self.qkv(i, x, pos)
            store(i, q, k, v)
            kk = k.transpose(1, 2).repeat_interleave(g, dim=1)  # [B, Hq, T, D]
            vv = v.transpose(1, 2).repeat_interleave(g, dim=1)
            qq = q.transpose(1, 2)
            outs = []
            for s in range(0, t, chunk):
                e = min(t, s + chunk)
                mask = torch.ones(e - s, e, dtype=torch.bool, device=self.device).tril(diagonal=s)
                outs.append(F.scaled_dot_product_attention(qq[:, :, s:e], kk[:, :, :e], vv[:, :, :e], attn_mask=mask))
            attn = torch.cat(outs, dim=2).transpose(1, 2).reshape(b, t, -1)
            x = self.mlp_residual(i, x, attn)
        return self.logits(x if all_logits else x[:, -1])

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, pos: torch.Tensor,
               attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One token per sequence: ``tokens [B]`` at positions ``pos [B]``. ``attend(layer, q [B, Hq, D],
        k [B, Hkv, D], v [B, Hkv, D])`` stores k, v and returns the attention output ``[B, Hq, D]``.
        Returns logits ``[B, V]`` (float32).

        The same math as :meth:`qkv` and :meth:`mlp_residual` (and the same roundings), in fused ops
        (:mod:`prr.ops.fused`; Triton kernels on a GPU): each residual add runs inside the RMSNorm after it, RoPE
        rotates q and k straight out of the fused q/k/v product with cos/sin computed once per step for every
        layer, SwiGLU is one kernel. The projections and the LM head take Triton GEMVs where they measured
        faster than cuBLAS (:func:`prr.ops.gemv.plan`)."""
        if not self.fuse:
            return self._decode_unfused(tokens, pos, attend)
        c, w = self.cfg, self.w
        b = tokens.shape[0]
        x = self.embed(tokens[:, None])[:, 0]  # [B, hidden]
        cos, sin = self.rotary.cos_sin(pos)  # [B, D/2], shared by the layers
        res = None  # the residual still to be added (the previous layer's MLP output)
        for i in range(c.num_layers):
            p = f"layers.{i}."
            h, x = fused.rms_norm(x, w[p + "attn_norm"], c.rms_eps, res)
            if i in self._qkv:
                qkv_w, bias, _ = self._qkv[i]
                qkv = gemv.linear(h, qkv_w, bias)
            else:
                qkv = torch.cat([gemv.linear(h, w[p + n], w.get(p + bn)) for n, bn in (("wq", "bq"), ("wk", "bk"),
                                                                                     ("wv", "bv"))], dim=-1)
            q, k, v = fused.rope_qkv(qkv, cos, sin, c.num_q_heads, c.num_kv_heads, c.head_dim,
                                     self.rotary.interleaved)
            o = attend(i, q, k, v)
            a = self._reduce(gemv.linear(o.reshape(b, -1).to(x.dtype), w[p + "wo"]))
            h, x = fused.rms_norm(x, w[p + "ffn_norm"], c.rms_eps, a)
            if i in self._gate_up:
                gu = gemv.linear(h, self._gate_up[i])
            else:
                gu = torch.cat([gemv.linear(h, w[p + "w_gate"]), gemv.linear(h, w[p + "w_up"])], dim=-1)
            res = self._reduce(gemv.linear(fused.swiglu(gu), w[p + "w_down"]))
        h, _ = fused.rms_norm(x, w["norm"], c.rms_eps, res)
        out = gemv.linear(h, w["embed"] if c.tie_embeddings else w["lm_head"]).float()
        return out if self.tp is None else self.tp.gather_logits(out)

    def _decode_unfused(self, tokens, pos, attend):
        """:meth:`decode` op by op (``fuse=False``: the baseline the fused step is measured against)."""
        x = self.embed(tokens[:, None])  # [B, 1, hidden]
        p = pos[:, None]
        for i in range(self.cfg.num_layers):
            q, k, v = self.qkv(i, x, p)
            o = attend(i, q[:, 0], k[:, 0], v[:, 0].contiguous())
            x = self.mlp_residual(i, x, o.reshape(x.shape[0], 1, -1).to(x.dtype))
        return self.logits(x[:, 0])
