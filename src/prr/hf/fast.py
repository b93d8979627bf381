"""``prr.hf.generate``: a transformers model decoded by prr's engine (the fast path), or by transformers'
``generate`` over a :class:`prr.hf.PrrCache` where the call asks for more than the engine offers.

The fast path is an :class:`prr.model.engine.Engine` whose model is :class:`prr.hf.decoder.HFDecoder` (the
transformers model's own tensors, no copy): transformers' forward runs the prompt, the engine's step runs every
decode step (on a GPU captured once in a CUDA graph and replayed), with prr's sampling, stop conditions and
streaming (:mod:`prr.model.generation`). Ragged batches come left-padded, as transformers pads them; each prompt
is prefilled without its padding.
"""

from __future__ import annotations

import functools
import warnings

import torch

from ..model.engine import Engine
from ..model.generation import Generation, GenerationConfig, GenerationStats
from .attention import cached_generate
from .decoder import HFDecoder, problems
from .options import Request, eos_ids, resolve, top_k_mask
from .settings import PrrSettings


class PrrFallbackWarning(UserWarning):
    """``prr.hf.generate`` decoded through transformers' ``generate`` (eager) instead of prr's engine."""


class _Tokens:
    """The engine's view of a tokenizer: EOS ids and text (None without a transformers tokenizer)."""

    def __init__(self, tokenizer, eos: list[int]):
        self.tok, self.eos_ids = tokenizer, list(eos)

    def decode(self, ids) -> str | None:
        return None if self.tok is None else self.tok.decode(list(ids), skip_special_tokens=True)


def engine(model, settings: PrrSettings | None = None, *, tokenizer=None, eos: list[int] | None = None,
           graphs: bool = True) -> Engine:
    """prr's :class:`Engine` over a transformers Llama / Qwen2 / Mistral / GLM / GLM-4 model (its tensors, no
    copy): :meth:`Engine.stream`, :meth:`Engine.generate_batch`, :meth:`Engine.fill_random` etc. as for prr's
    own models. `tokenizer` (a transformers tokenizer) gives text and stop strings; `eos` the ids that end a
    sequence (default: the model's generation config's, else the tokenizer's). ValueError, saying why, for a
    model the engine cannot run (:func:`prr.hf.decoder.problems`)."""
    settings = settings or PrrSettings()
    if not isinstance(settings, PrrSettings):
        raise TypeError(f"settings must be a PrrSettings, got {type(settings).__name__}")
    dec = HFDecoder(model)
    tok = _Tokens(tokenizer, eos_ids(model, tokenizer) if eos is None else eos)
    return Engine(dec, tok, attention=settings.method, sparse=settings.sparse, ratio=settings.ratio,
                  mode=settings.mode, n_dense_layers=settings.dense_layers,
                  calibrate_window=settings.calibrate_window, graphs=graphs)


def unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """The prompts of a batch ``input_ids [B, T]`` without their left padding (``attention_mask [B, T]``: 0 on
    padding). ValueError for any other mask (right padding, holes, an empty row)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [batch, tokens] tensor, got "
                         f"{list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
    if attention_mask is None:
        return list(input_ids)
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask {list(attention_mask.shape)} must have input_ids' shape "
                         f"{list(input_ids.shape)}")
    keep = attention_mask.to(torch.bool)
    t = input_ids.shape[1]
    lens = keep.sum(1)
    left = torch.arange(t, device=keep.device)[None, :] >= (t - lens)[:, None]
    if not torch.equal(keep, left):
        raise ValueError("prr.hf needs left padding (the tokenizer's padding_side='left'): the attention mask must "
                         "be zeros then ones in each row")
    if bool((lens == 0).any()):
        raise ValueError("a prompt of the batch is empty (its attention mask is all zeros)")
    return [input_ids[j, t - int(n):] for j, n in enumerate(lens.tolist())]


def stream(model, input_ids: torch.Tensor, settings: PrrSettings | None = None,
           config: GenerationConfig | None = None, *, attention_mask: torch.Tensor | None = None, tokenizer=None,
           eos: list[int] | None = None, graphs: bool = True, top_k_first: int = 0) -> Generation:
    """Decode a batch through prr's engine as an iterator of :class:`prr.model.generation.TokenEvent` (text
    when `tokenizer` is given); once exhausted, ``.sequences`` (new tokens, text, finish reason, hit rate per
    sequence) and ``.stats`` (ms/token, prefill / warm-up / capture times, whether a CUDA graph ran).

    ``input_ids [B, T]`` with ``attention_mask`` of left padding (or none); `config`: prr's
    :class:`GenerationConfig` (max new tokens, sampling, stop strings, EOS); `top_k_first`: mask the logits to
    their top-k before prr's sampler (transformers' top-k-then-top-p order, see :mod:`prr.hf.options`)."""
    eng = engine(model, settings, tokenizer=tokenizer, eos=eos, graphs=graphs)
    if top_k_first:
        eng.model.logits_filter = top_k_mask(top_k_first)
    return eng.stream(unpad(input_ids, attention_mask), config)


def _output(input_ids: torch.Tensor, gen: Generation, pad: int) -> torch.Tensor:
    """transformers' ``generate`` output: ``[B, T + new]``, the prompt (padding kept) then each sequence's new
    tokens, finished sequences filled with `pad`."""
    new = max(len(s.tokens) for s in gen.sequences)
    out = torch.full((input_ids.shape[0], input_ids.shape[1] + new), pad, dtype=torch.long, device=input_ids.device)
    out[:, :input_ids.shape[1]] = input_ids
    for j, s in enumerate(gen.sequences):
        out[j, input_ids.shape[1]:input_ids.shape[1] + len(s.tokens)] = torch.tensor(s.tokens, dtype=torch.long)
    return out


def _run(model, input_ids, settings, req: Request) -> torch.Tensor:
    gen = stream(model, input_ids, settings, req.config, attention_mask=req.attention_mask,
                 tokenizer=req.tokenizer, eos=req.eos_ids, top_k_first=req.top_k_first)
    streamer = req.streamer
    if streamer is not None:
        if input_ids.shape[0] != 1:
            raise ValueError("a streamer needs a batch of one prompt (as transformers' streamers do)")
        streamer.put(input_ids.cpu())
    for ev in gen:
        if streamer is not None:
            streamer.put(torch.tensor([ev.token]))
    if streamer is not None:
        streamer.end()
    model._prr_last_stats = gen.stats  # ms/token, prefill, CUDA graph: for whoever wants them (no tensors held)
    return _output(input_ids, gen, req.pad_id)


def last_stats(model) -> GenerationStats | None:
    """The :class:`prr.model.generation.GenerationStats` of the model's last fast-path generation (ms/token in
    the steady state, prefill, warm-up and capture times, whether a CUDA graph ran, PRR's hit rate); None
    before one."""
    return getattr(model, "_prr_last_stats", None)


def _why_not(model, prompt_len: int, req: Request) -> list[str]:
    why = list(req.problems) + problems(model)
    if not why:
        cap = HFDecoder(model).cfg.max_context
        if prompt_len + req.max_new_tokens > cap:
            why.append(f"prompt + max_new_tokens = {prompt_len + req.max_new_tokens} tokens beyond the {cap} the "
                       "engine allows (max_position_embeddings or the sliding window)")
    return why


def generate(model, input_ids: torch.Tensor, settings: PrrSettings | None = None, *,
             max_new_tokens: int | None = None, config: GenerationConfig | None = None, fast: bool | None = None,
             **kwargs) -> torch.Tensor:
    """``model.generate`` with prr attention: ``[B, T + new]`` token ids, as transformers returns them.

    The fast path (prr's engine over the model's own tensors; on a GPU the decode step is one CUDA graph, on a
    CPU the same step runs eagerly) runs wherever it can. Where the call asks for what only transformers'
    ``generate`` does (beam search, other logits processors, stopping criteria or stop strings, scores in the
    output, ...; see :mod:`prr.hf.options`) or the model is one the engine cannot run
    (:func:`prr.hf.decoder.problems`), transformers' ``generate`` decodes over a :class:`prr.hf.PrrCache`
    (eager, the same attention) after a one-line :class:`PrrFallbackWarning` saying why. ``fast=True`` makes
    that a ValueError; ``fast=False`` always takes transformers' ``generate`` (:func:`prr.hf.cached_generate`).

    Arguments are transformers' (``max_new_tokens``, ``attention_mask`` with left padding, ``do_sample``,
    ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``eos_token_id``, ``pad_token_id``,
    ``streamer``, ...), or prr's own `config` (:class:`prr.model.generation.GenerationConfig`: sampling with a
    seed, stop strings, EOS on or off) with ``attention_mask``, ``tokenizer`` and ``streamer`` beside it (the
    fast path only). Sampled tokens follow transformers' distribution with prr's draws (seeded from torch's
    generator); the stats of the last fast run: :func:`last_stats`."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a [batch, tokens] tensor")
    if config is not None:
        if max_new_tokens is not None:
            raise ValueError("give max_new_tokens inside config (a GenerationConfig)")
        extra = set(kwargs) - {"attention_mask", "tokenizer", "streamer"}
        if extra:
            raise TypeError(f"with a prr GenerationConfig, generate takes attention_mask, tokenizer and streamer "
                            f"only, got {sorted(extra)}")
        bad = problems(model)
        if bad or fast is False:
            raise ValueError("a prr GenerationConfig needs the fast path: " + ("; ".join(bad) or "fast=False"))
        eos = eos_ids(model, kwargs.get("tokenizer"))
        pad = getattr(model.generation_config, "pad_token_id", None)
        req = Request(config, config.max_new_tokens, eos_ids=eos,
                      pad_id=int(pad) if pad is not None else (eos[0] if eos else 0),
                      attention_mask=kwargs.get("attention_mask"), streamer=kwargs.get("streamer"),
                      tokenizer=kwargs.get("tokenizer"))
        return _run(model, input_ids, settings, req)
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    req = resolve(model, input_ids, kwargs)
    if fast is not False:
        why = _why_not(model, input_ids.shape[1], req)
        if not why:
            return _run(model, input_ids, settings, req)
        if fast:
            raise ValueError("the fast path cannot run this call: " + "; ".join(why))
        warnings.warn("prr.hf: decoding with transformers' generate (eager), not prr's engine: " + "; ".join(why),
                      PrrFallbackWarning, stacklevel=2)
    return cached_generate(model, input_ids, settings, max_new_tokens=req.max_new_tokens,
                           **{k: v for k, v in kwargs.items() if k != "max_new_tokens"})


def patch_generate(model, settings: PrrSettings | None = None) -> None:
    """Make ``model.generate`` this module's :func:`generate` with `settings` (an instance attribute; the class is
    untouched). A call that brings its own cache (``past_key_values=`` / ``cache=``) or ``inputs_embeds`` goes to
    transformers' ``generate`` as it is."""
    original = type(model).generate

    @functools.wraps(original)
    def generate_with_prr(inputs=None, *args, **kwargs):
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        own = any(k in kwargs for k in ("past_key_values", "cache", "inputs_embeds"))
        if args or own or ids is None:
            return original(model, inputs, *args, **kwargs)
        kwargs.pop("input_ids", None)
        return generate(model, ids, settings, **kwargs)

    model.generate = generate_with_prr

