"""prr as a transformers attention implementation named ``"prr"``.

Registered in transformers' own registries (``AttentionInterface`` for the attention function,
``AttentionMaskInterface`` for its mask, which is SDPA's), so the model's modelling code runs unchanged: the
prompt is attended by transformers' SDPA and stored into the :class:`prr.hf.PrrCache`; every decode call (one
token per sequence) is attended by prr over that paged cache: dense, serialized DSA or PRR per layer.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cache import PrrCache, active_layer, check_model
from .settings import PrrSettings

NAME = "prr"
# The fast path's prefill (prr.hf.decoder): a function given each layer's (layer, q, k, v) of a cache-free forward.
_CAPTURE: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("prr_hf_capture", default=None)


@contextlib.contextmanager
def capturing(fn: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Within the block, every prompt call of the ``"prr"`` attention without a :class:`PrrCache` hands
    ``fn(layer_idx, query [B, Hq, T, D], key, value [B, Hkv, T, D])`` its RoPE'd tensors before attending."""
    token = _CAPTURE.set(fn)
    try:
        yield
    finally:
        _CAPTURE.reset(token)


def _padding_free(mask: torch.Tensor | None, q_len: int) -> bool:
    """Whether a 4D mask (bool: True attends; float: 0 attends) is plain causal attention over the keys (a host
    read, done once per prompt)."""
    if mask is None:
        return True
    keep = mask if mask.dtype == torch.bool else mask == 0
    kv_len = keep.shape[-1]
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=keep.device).tril(diagonal=kv_len - q_len)
    return bool((keep == causal).all())


def prr_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  **kwargs):
    """transformers' attention-function signature: ``query [B, Hq, T, D]``, ``key, value [B, Hkv, T', D]``;
    returns ``([B, T, Hq, D], None)``."""
    layer = active_layer(module.layer_idx)
    q_len = query.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if layer is None:
        if q_len == 1:
            raise RuntimeError("prr attention decodes through a prr.hf.PrrCache: pass past_key_values=PrrCache(model, "
                               "settings, max_cache_len=...) (or use prr.hf.generate)")
        # No prr cache (a plain forward, use_cache=False): the prompt path alone, transformers' SDPA.
        capture = _CAPTURE.get()
        if capture is not None:
            capture(module.layer_idx, query, key, value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if q_len > 1:
        if not _padding_free(attention_mask, q_len):
            raise ValueError("prr.hf needs unpadded batches of equal-length prompts (the attention mask masks tokens)")
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     **kwargs)
        layer.after_prefill(query, scale)
        return out
    if attention_mask is not None:  # SDPA's mask is None for an unpadded decode step
        raise ValueError("prr.hf needs unpadded batches of equal-length prompts (the attention mask masks tokens)")
    o = layer.decode(query[:, :, 0].contiguous(), scale)  # [B, Hq, D]
    return o[:, None].to(query.dtype), None


def register() -> None:
    """Add ``"prr"`` to transformers' attention and mask registries (idempotent)."""
    AttentionInterface.register(NAME, prr_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def _set_attention(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


@contextlib.contextmanager
def attending_with_prr(model) -> Iterator[None]:
    """Within the block the model attends with ``"prr"``; afterwards with what it had (the fast path's prefill
    leaves the user's model as it found it)."""
    register()
    before = getattr(model.config, "_attn_implementation", None)
    if before != NAME:
        _set_attention(model, NAME)
    try:
        yield
    finally:
        if before != NAME and before is not None:
            _set_attention(model, before)


def enable(model, settings: PrrSettings | None = None):
    """Make `model` (Llama, Qwen2, Mistral, GLM or GLM-4) attend with prr; returns the model. Decode steps then need
    a :class:`PrrCache` (``past_key_values=``), or use :func:`prr.hf.generate`.

    With `settings`, ``model.generate`` itself becomes :func:`prr.hf.generate` with those settings (an instance
    attribute: ``del model.generate`` restores transformers' own), so pipelines and existing code decode with prr,
    through prr's engine where it can (:func:`prr.hf.fast.patch_generate`)."""
    check_model(model)
    register()
    _set_attention(model, NAME)
    if settings is not None:
        from .fast import patch_generate  # the fast path builds on this module

        patch_generate(model, settings)
    return model


def cache_kwarg(model) -> str:
    """The name the model's forward takes its cache by (``cache`` from transformers 5.2x, ``past_key_values``
    before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cached_generate(model, input_ids: torch.Tensor, settings: PrrSettings | None = None, *, max_new_tokens: int,
                    **kwargs):
    """transformers' own ``generate`` (its class's, even where ``model.generate`` was replaced) with prr attention
    and a fresh :class:`PrrCache` sized for the prompt plus `max_new_tokens` (every other argument is
    transformers', e.g. ``do_sample``, ``temperature``): eager decode steps, every option of transformers'."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {list(input_ids.shape)}")
    if getattr(model.config, "_attn_implementation", None) != NAME:
        enable(model)
    cache = PrrCache(model, settings, max_cache_len=input_ids.shape[1] + max_new_tokens)
    return type(model).generate(model, input_ids, max_new_tokens=max_new_tokens, **{cache_kwarg(model): cache},
                                **kwargs)
