"""A transformers causal LM as the model of prr's :class:`prr.model.engine.Engine`, over its own weight tensors.

:class:`HFDecoder` gives the engine what prr's own :class:`prr.model.llama.Llama` gives it (``cfg``, ``device``,
``dtype``, ``fuse``, ``prefill``, ``decode``), so the engine's decode step (cache append, dense / DSA / PRR
attention, sampling, and on a GPU the whole step as one CUDA graph) runs a transformers model unchanged:

- **prefill**: the model's own forward (transformers' modelling code and SDPA, ``use_cache=False``); each
  attention layer hands its RoPE'd ``q, k, v`` to the engine (the ``"prr"`` attention function's capture hook,
  :func:`prr.hf.attention.capturing`), which stores them in its paged caches. The first token comes from
  exactly transformers' logits.
- **decode**: the same fused ops as ``Llama.decode`` (:mod:`prr.ops.fused`, :mod:`prr.ops.gemv`) reading the
  ``nn.Linear`` / ``nn.Embedding`` / RMSNorm tensors of the transformers modules in place: no weight is copied.
  Where a checkpoint keeps q, k, v (or gate, up) as separate matrices they stay separate products (prr's own
  model concatenates them into one; here that would be a second copy), their outputs concatenated; where they
  lie back to back in one storage (:func:`prr.hf.fuse_projections` puts them so, in place) they are one.
  RoPE reads the model's own inverse frequencies and attention scaling (``rotary_emb``), so the angles are
  transformers' to the bit; GLM's partial, interleaved rotation is the interleaved kernel with cos = 1, sin = 0
  on the pairs it leaves alone.

Families: Llama, Qwen2 (q/k/v biases), Mistral, GLM and GLM-4 (fused gate/up, partial interleaved RoPE; GLM-4's
extra norms after attention and MLP). :func:`problems` says why a model cannot run here (then prr.hf falls back
to its transformers-driven path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.config import ModelConfig, hf_sliding_window
from ..ops import fused, gemv
from .attention import attending_with_prr, capturing
from .cache import FAMILIES
from .fuse import adjacent

GLM = ("glm", "glm4")
# RoPE variants whose frequencies change with the sequence length at run time (a host-side check per call in
# transformers): the fast path would have to reproduce that inside a CUDA graph, so it leaves them to transformers.
_DYNAMIC_ROPE = ("dynamic", "longrope")


@dataclass
class _Layer:
    """One decoder layer's tensors, as the transformers modules hold them (``[out, in]`` matrices)."""

    attn_norm: tuple[torch.Tensor, float]  # (weight, eps)
    qkv: list[tuple[torch.Tensor, torch.Tensor | None]]  # q, k, v products (or one fused)
    wo: tuple[torch.Tensor, torch.Tensor | None]
    ffn_norm: tuple[torch.Tensor, float]
    gate_up: list[tuple[torch.Tensor, torch.Tensor | None]]  # gate, up products (or one fused, gate first)
    down: tuple[torch.Tensor, torch.Tensor | None]
    # GLM-4: RMSNorms of the attention and the MLP outputs, before their residual adds
    post_attn_norm: tuple[torch.Tensor, float] | None = None
    post_mlp_norm: tuple[torch.Tensor, float] | None = None


def _linear(mod) -> tuple[torch.Tensor, torch.Tensor | None]:
    return mod.weight, mod.bias


def _products(mods) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The ``(weight, bias)`` products of `mods`; one when their weights (and biases) lie back to back in one
    storage (:func:`prr.hf.fuse_projections`): one matrix-vector product instead of several, no copy."""
    ws, bs = [m.weight for m in mods], [m.bias for m in mods]
    w = adjacent(ws)
    if w is not None:
        if all(b is None for b in bs):
            return [(w, None)]
        if all(b is not None for b in bs) and (b := adjacent(bs)) is not None:
            return [(w, b)]
    return [_linear(m) for m in mods]


def _eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _norm(norm) -> tuple[torch.Tensor, float]:
    return norm.weight, _eps(norm)


def problems(model) -> list[str]:
    """Why `model` cannot decode through prr's engine (empty: it can). Reads configuration and tensors only."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in FAMILIES:
        return [f"model type {kind!r} (supported: {', '.join(FAMILIES)})"]
    out = []
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        out.append(f"hidden_act {act!r} (the fused step computes SwiGLU)")
    base = getattr(model, "model", None)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        out.append("no model.rotary_emb.inv_freq (a transformers version prr.hf does not know)")
    else:
        kind_rope = getattr(rotary, "rope_type", "default")
        if not isinstance(kind_rope, str) or any(k in kind_rope for k in _DYNAMIC_ROPE):
            out.append(f"rope_type {kind_rope!r} (frequencies that change with the length at run time)")
        head_dim = _head_dim(cfg)
        rot = 2 * rotary.inv_freq.numel()
        if rot > head_dim or (rot != head_dim and kind not in GLM):
            out.append(f"RoPE over {rot} of {head_dim} head dimensions in a {kind} model")
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        out.append(f"pretraining_tp={cfg.pretraining_tp}")
    params = list(model.parameters())
    if any(type(p) is not torch.nn.Parameter or not p.is_floating_point() for p in params):
        out.append("quantized or wrapped weights (the fused step reads plain floating-point tensors)")
    devices = {p.device for p in params}
    if len(devices) > 1 or any(d.type == "meta" for d in devices):
        out.append(f"weights on {len(devices)} devices or offloaded ({', '.join(sorted(map(str, devices)))})")
    dtypes = {p.dtype for p in params}
    if len(dtypes) > 1:
        out.append(f"mixed weight dtypes ({', '.join(sorted(map(str, dtypes)))})")
    layers = getattr(base, "layers", None)
    if layers is None:
        out.append("no model.layers")
    else:
        for layer in layers:
            attn = layer.self_attn
            want = _head_dim(cfg) ** -0.5
            if abs(float(getattr(attn, "scaling", want)) - want) > 1e-12 * want:
                out.append(f"attention scaling {attn.scaling} (prr attends with head_dim ** -0.5)")
                break
    return out


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


class HFDecoder:
    """prr's model interface over a transformers Llama / Qwen2 / Mistral / GLM / GLM-4 causal LM (see the module
    docstring). Holds references to the model's tensors, no copies. Its prefill runs the model with the ``"prr"``
    attention (whose prompt path is transformers' SDPA) and gives the model its own attention back after.

    ``logits_filter``: an optional function applied to every logits row the decoder returns (``[B, V]`` float32,
    device ops only): the fast path's way to apply transformers' top-k before prr's sampler (see
    :mod:`prr.hf.options`)."""

    fuse = True  # the engine's fused cache append (and Quest metadata fold) suits any model
    tp = None

    def __init__(self, model):
        bad = problems(model)
        if bad:
            raise ValueError("this model cannot decode through prr's engine: " + "; ".join(bad))
        self.hf = model
        hc = model.config
        kind = hc.model_type
        base = model.model
        head_dim = _head_dim(hc)
        window = hf_sliding_window(hc.to_dict())
        max_pos = int(getattr(hc, "max_position_embeddings", None) or 131072)
        emb = base.embed_tokens.weight
        lm = model.lm_head
        eos = getattr(model.generation_config, "eos_token_id", None)
        self.cfg = self._config(hc, head_dim, window, max_pos, lm, emb, eos)
        self.device, self.dtype = emb.device, emb.dtype
        self.interleaved = kind in GLM
        self.embed = emb
        self.norm = _norm(base.norm)
        self.lm_head = _linear(lm)
        self.layers = [self._layer(layer, kind) for layer in base.layers]
        rotary = base.rotary_emb
        self.inv_freq = rotary.inv_freq.float()  # [R/2]: transformers' own frequencies (float32, as its forward)
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
        self.rope_pad = head_dim // 2 - self.inv_freq.numel()  # GLM: pairs left unrotated
        self.logits_filter: Callable[[torch.Tensor], torch.Tensor] | None = None

    @staticmethod
    def _config(hc, head_dim, window, max_pos, lm, emb, eos) -> ModelConfig:
        return ModelConfig(
            vocab_size=lm.weight.shape[0], hidden=hc.hidden_size, ffn=hc.intermediate_size,
            num_layers=hc.num_hidden_layers, num_q_heads=hc.num_attention_heads,
            num_kv_heads=getattr(hc, "num_key_value_heads", None) or hc.num_attention_heads, head_dim=head_dim,
            rms_eps=float(getattr(hc, "rms_norm_eps", 1e-6)),
            tie_embeddings=lm.weight.data_ptr() == emb.data_ptr(),
            # A sliding window the context never outgrows masks nothing: prr attends the whole context up to it.
            max_context=min(max_pos, window) if window else max_pos,
            eos_token_id=eos if isinstance(eos, int) else None)

    @staticmethod
    def _layer(layer, kind: str) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        if hasattr(mlp, "gate_up_proj"):
            gate_up = [_linear(mlp.gate_up_proj)]
        else:
            gate_up = _products([mlp.gate_proj, mlp.up_proj])
        return _Layer(
            attn_norm=_norm(layer.input_layernorm),
            qkv=_products([attn.q_proj, attn.k_proj, attn.v_proj]),
            wo=_linear(attn.o_proj), ffn_norm=_norm(layer.post_attention_layernorm), gate_up=gate_up,
            down=_linear(mlp.down_proj),
            post_attn_norm=_norm(layer.post_self_attn_layernorm) if kind == "glm4" else None,
            post_mlp_norm=_norm(layer.post_mlp_layernorm) if kind == "glm4" else None)

    def weight_bytes(self) -> int:
        """Bytes of the model's parameters (each tensor once: tied embeddings count once)."""
        seen = {}
        for p in self.hf.parameters():
            seen[(p.data_ptr(), p.numel())] = p.numel() * p.element_size()
        return sum(seen.values())

    def _filter(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.logits_filter is None else self.logits_filter(logits)

    # ---- passes ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, store: Callable, **_) -> torch.Tensor:
        """transformers' forward over ``tokens [B, T]`` (one unpadded prompt per row); ``store(layer, q, k, v)``
        receives each layer's RoPE'd ``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]``. Returns the last position's
        logits ``[B, V]`` (float32)."""
        seen: list[int] = []

        def capture(layer: int, q, k, v):
            seen.append(layer)
            store(layer, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

        with attending_with_prr(self.hf), capturing(capture):
            out = self.hf(input_ids=tokens, use_cache=False, logits_to_keep=1)
        if seen != list(range(self.cfg.num_layers)):
            raise RuntimeError(f"the model's forward ran attention layers {seen[:8]}..., expected each of "
                               f"{self.cfg.num_layers} once: its modelling code is not the one prr.hf knows")
        return self._filter(out.logits[:, -1].float())

    def cos_sin(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin [B, D/2]`` float32 at positions ``pos [B]``: transformers' angles (``pos * inv_freq``, times
        the attention scaling), padded with cos 1, sin 0 on the pairs a partial rotation leaves alone."""
        ang = pos.float()[:, None] * self.inv_freq
        cos, sin = ang.cos(), ang.sin()
        if self.rope_scale != 1.0:
            cos, sin = cos * self.rope_scale, sin * self.rope_scale
        if self.rope_pad:
            cos, sin = F.pad(cos, (0, self.rope_pad), value=1.0), F.pad(sin, (0, self.rope_pad), value=0.0)
        return cos, sin

    @staticmethod
    def _products(h: torch.Tensor, parts) -> torch.Tensor:
        if len(parts) == 1:
            return gemv.linear(h, *parts[0])
        return torch.cat([gemv.linear(h, w, b) for w, b in parts], dim=-1)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, pos: torch.Tensor,
               attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One token per sequence: ``tokens [B]`` at positions ``pos [B]``; ``attend(layer, q [B, Hq, D],
        k [B, Hkv, D], v [B, Hkv, D])`` stores k, v and returns the attention output ``[B, Hq, D]``. Returns
        logits ``[B, V]`` (float32). Device work only (the engine captures it in a CUDA graph)."""
        c = self.cfg
        b = tokens.shape[0]
        x = F.embedding(tokens, self.embed)  # [B, hidden]
        cos, sin = self.cos_sin(pos)
        res = None  # the residual still to be added (the previous layer's MLP output)
        for i, layer in enumerate(self.layers):
            h, x = fused.rms_norm(x, *layer.attn_norm, res)
            qkv = self._products(h, layer.qkv)
            q, k, v = fused.rope_qkv(qkv, cos, sin, c.num_q_heads, c.num_kv_heads, c.head_dim, self.interleaved)
            o = attend(i, q, k, v)
            a = gemv.linear(o.reshape(b, -1).to(x.dtype), *layer.wo)
            if layer.post_attn_norm is not None:
                a, _ = fused.rms_norm(a, *layer.post_attn_norm)
            h, x = fused.rms_norm(x, *layer.ffn_norm, a)
            res = gemv.linear(fused.swiglu(self._products(h, layer.gate_up)), *layer.down)
            if layer.post_mlp_norm is not None:
                res, _ = fused.rms_norm(res, *layer.post_mlp_norm)
        h, _ = fused.rms_norm(x, *self.norm, res)
        return self._filter(gemv.linear(h, *self.lm_head).float())
