"""``model.generate``'s arguments, read as transformers reads them, translated into prr's
:class:`prr.model.generation.GenerationConfig`, or the reasons the fast path cannot honour them.

transformers' order of precedence is kept: the call's arguments, then ``generation_config=`` or the model's
``generation_config``, then transformers' global defaults. Supported: greedy, sampling (temperature, top-k,
top-p), the repetition penalty, EOS and pad ids, ``max_new_tokens`` / ``max_length``, an attention mask of left
padding, a ``streamer``. Any other setting that changes the tokens (beam search, other logits processors or
stopping criteria, stop strings, scores in the output, ...) is a *problem*: the caller falls back to
transformers' own ``generate``. Settings that cannot change the tokens (cache choices, compile options, beam-only
knobs when there is one beam) are ignored.

Sampling keeps transformers' distribution, not its draws: prr's sampler (:mod:`prr.model.sampling`) draws from a
counter-based hash keyed by a seed, which the fast path takes from torch's global generator, so
``torch.manual_seed`` still makes a run reproducible. transformers applies top-k, then top-p over the
renormalized top-k; prr's sampler filters both over the whole distribution, so with both set the top-k mask is
applied to the logits first (:attr:`Request.top_k_first`), which gives transformers' set.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..model.generation import GenerationConfig
from ..model.sampling import SamplingConfig

# generate()'s own arguments besides the generation settings; neutral when None (or empty, or False).
_CALL_ARGS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus", "assistant_model",
              "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate", "assistant_tokenizer")
SUPPORTED = ("max_length", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
             "pad_token_id", "eos_token_id", "bos_token_id")
# Settings that cannot change the tokens of a one-beam search with a cache of prr's.
_NO_EFFECT = {"use_cache", "cache_implementation", "cache_config", "max_cache_len", "compile_config",
              "disable_compile", "prefill_chunk_size", "early_stopping", "length_penalty", "num_assistant_tokens",
              "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_lookbehind",
              "target_lookbehind", "decoder_start_token_id", "is_assistant", "transformers_version",
              "continuous_batching_config", "return_legacy_cache", "trust_remote_code"}
# transformers' global defaults (its GenerationConfig._get_default_generation_params in 5.x), where the
# installed version does not say.
_DEFAULTS = {"max_length": 20, "min_length": 0, "do_sample": False, "num_beams": 1, "temperature": 1.0, "top_k": 50,
             "top_p": 1.0, "typical_p": 1.0, "repetition_penalty": 1.0, "num_return_sequences": 1,
             "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
             "encoder_no_repeat_ngram_size": 0, "num_beam_groups": 1, "diversity_penalty": 0.0}


@dataclass
class Request:
    """What one ``generate`` call asks, in prr's terms.

    ``config``: prr's generation settings (None when there are ``problems``); ``top_k_first``: transformers'
    top-k, to mask the logits with before prr's sampler filters top-p (0: none); ``eos_ids``, ``pad_id``: the
    ids that end a sequence and fill the output after it ended; ``attention_mask``, ``streamer``,
    ``tokenizer``: passed through."""

    config: GenerationConfig | None
    max_new_tokens: int
    problems: list[str] = field(default_factory=list)
    top_k_first: int = 0
    eos_ids: list[int] = field(default_factory=list)
    pad_id: int = 0
    attention_mask: torch.Tensor | None = None
    streamer: object | None = None
    tokenizer: object | None = None


def _defaults() -> dict:
    """What each setting is when nobody set it, in the installed transformers (a fresh config's values, then its
    global defaults)."""
    from transformers import GenerationConfig as HFConfig

    fresh = {k: v for k, v in vars(HFConfig()).items() if v is not None}
    get = getattr(HFConfig, "_get_default_generation_params", None)
    return {**_DEFAULTS, **fresh, **(get() if callable(get) else {})}


def _neutral(value, default) -> bool:
    if value is None or value is False or (isinstance(value, (dict, list, tuple, set)) and not value):
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return True
    try:
        return bool(value == default)
    except (TypeError, ValueError, RuntimeError):  # tensors, odd objects: not provably neutral
        return False


def _ids(v) -> list[int]:
    if v is None:
        return []
    if isinstance(v, torch.Tensor):
        v = v.flatten().tolist()
    return [int(v)] if isinstance(v, int) else [int(x) for x in v]


def eos_ids(model, tokenizer=None) -> list[int]:
    """The model's EOS ids (its generation config's, else the tokenizer's)."""
    ids = _ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    if not ids and tokenizer is not None:
        ids = _ids(getattr(tokenizer, "eos_token_id", None))
    return ids


def resolve(model, inputs: torch.Tensor, kwargs: dict) -> Request:
    """Read ``model.generate``'s keyword arguments (everything but the input ids ``inputs [B, T]``; ``T``, padding
    included, is what transformers counts ``max_length`` against)."""
    prompt_len = inputs.shape[-1]
    kwargs = dict(kwargs)
    problems = []
    streamer, tokenizer = kwargs.pop("streamer", None), kwargs.pop("tokenizer", None)
    kwargs.pop("use_model_defaults", None)
    for name in _CALL_ARGS:
        v = kwargs.pop(name, None)
        if v is None or v is False or (isinstance(v, list) and not v):
            continue
        problems.append(f"{name}")
    gc = copy.deepcopy(kwargs.pop("generation_config", None) or model.generation_config)
    extra = gc.update(**kwargs)
    mask = extra.pop("attention_mask", None)
    problems += [f"model argument {k!r}" for k in extra]
    defaults = _defaults()

    def get(name):
        v = getattr(gc, name, None)
        return defaults.get(name) if v is None else v

    for name, value in vars(gc).items():
        if name.startswith("_") or name in SUPPORTED or name in _NO_EFFECT:
            continue
        if not _neutral(value, defaults.get(name)):
            problems.append(f"{name}={value!r}")

    eos = _ids(get("eos_token_id"))
    pad = get("pad_token_id")
    pad = int(pad) if pad is not None else (eos[0] if eos else 0)
    if mask is None and get("pad_token_id") is not None and pad not in eos and bool(
            (inputs == pad).any()):
        # transformers' rule without a mask: pad ids in the input are padding (unless pad is also EOS)
        mask = (inputs != pad).long()
    max_new = get("max_new_tokens")
    if max_new is None:
        max_new = int(get("max_length")) - prompt_len
    if max_new <= 0:
        problems.append(f"max_new_tokens={max_new}")
    rep = float(get("repetition_penalty"))
    top_k_first = 0
    if bool(get("do_sample")):
        temperature, top_k, top_p = float(get("temperature")), int(get("top_k") or 0), float(get("top_p"))
        if temperature <= 0 or not 0 < top_p <= 1 or top_k < 0:
            problems.append(f"sampling with temperature={temperature}, top_k={top_k}, top_p={top_p}")
        elif top_k and top_p < 1:
            if rep != 1.0:  # transformers' top-k would be taken after the penalty: not a mask before it
                problems.append("top_k and top_p together with a repetition_penalty")
            top_k_first, top_k = top_k, 0
        # The draws of prr's sampler are keyed by a seed: taken from torch's generator, as transformers' are.
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        sampling = None if problems else SamplingConfig(temperature, top_p, top_k, rep, seed)
    else:
        sampling = None if problems else SamplingConfig(repetition_penalty=rep)
    config = None if problems else GenerationConfig(int(max_new), sampling, (), True)
    return Request(config, int(max_new), problems, top_k_first, eos, pad, mask, streamer, tokenizer)


def top_k_mask(k: int):
    """``logits [B, V] -> logits`` with everything below the k-th largest of each row at -inf (transformers'
    rule: ties with the k-th stay)."""

    def mask(logits: torch.Tensor) -> torch.Tensor:
        kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[:, -1:]
        return logits.masked_fill(logits < kth, float("-inf"))

    return mask
