"""OpenAI's request and response shapes: validation of a decoded JSON body, and the bodies sent back.

Everything a request says is checked here before it reaches the engine; a bad value is an :class:`ApiError`
(HTTP 4xx with OpenAI's ``{"error": {"message", "type", "param", "code"}}`` body). Supported: ``/v1/completions``
(``prompt`` a string or a list of token ids, or a list holding one of those) and ``/v1/chat/completions``
(``messages`` with string or text-part contents, rendered by the tokenizer's chat template); ``max_tokens``
(chat: also ``max_completion_tokens``), ``temperature``, ``top_p``, ``top_k`` (an extension, as vLLM's), ``seed``,
``stop`` (up to 4 strings), ``stream`` (with ``stream_options.include_usage``), ``n`` = 1, ``ignore_eos``
(an extension). Fields this server cannot honour (``logprobs``, ``echo``, ``best_of`` > 1, penalties other than
0, ``tools``, ``response_format``...) are refused rather than silently ignored; unknown fields are ignored, as
OpenAI's clients send some.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid

from ..model.sampling import SamplingConfig

MAX_STOPS = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Params:
    """A validated request: the prompt (ids, or chat messages still to render) and its generation settings."""

    chat: bool
    prompt: list[int] | str | None
    messages: list[dict] | None
    max_tokens: int | None  # None: as many as fit (chat's default)
    sampling: SamplingConfig
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    stop_at_eos: bool


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


def _number(body: dict, name: str, default, lo: float, hi: float, *, integer: bool = False):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise _bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {v!r}", name)
    if not math.isfinite(v) or not lo <= v <= hi:
        raise _bad(f"'{name}' must lie in [{lo}, {hi}], got {v!r}", name)
    return v


def _unsupported(body: dict, chat: bool) -> None:
    refused = {"logprobs": (None, False, 0), "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
               "tools": (None, []), "functions": (None, []), "response_format": (None, {"type": "text"}),
               "top_logprobs": (None, 0)}
    for name, fine in refused.items():
        if name in body and not any(body[name] == f and type(body[name]) is type(f) for f in fine):
            raise _bad(f"'{name}' is not supported by this server", name)
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or n != 1):
        raise _bad(f"only n = 1 is supported, got {n!r}", "n")


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS:
        raise _bad(f"'stop' holds at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    return tuple(stops)


def _prompt(body: dict, vocab: int):
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # one prompt given as a batch of one
    if isinstance(p, str):
        if not p:
            raise _bad("'prompt' is empty", "prompt")
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if not all(0 <= t < vocab for t in p):
            raise _bad(f"'prompt' token ids must lie in [0, {vocab})", "prompt")
        return list(p)
    if p is None:
        raise _bad("'prompt' is required", "prompt")
    raise _bad("'prompt' must be a string or a non-empty list of token ids (n = 1: one prompt)", "prompt")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty list", "messages")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise _bad(f"messages[{j}] must be an object with a role of system, user or assistant", "messages")
        content = m.get("content")
        if isinstance(content, list):  # text parts
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise _bad(f"messages[{j}].content: only text parts are supported", "messages")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise _bad(f"messages[{j}].content must be a string", "messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def parse(body, *, chat: bool, model_id: str, vocab: int, max_tokens_cap: int) -> Params:
    """Validate a decoded JSON body (:class:`ApiError` on anything wrong)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required", "model")
    if model != model_id:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{model_id}'", "model",
                       "model_not_found")
    _unsupported(body, chat)
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, None if chat else 16, 1, max_tokens_cap, integer=True)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise _bad("'top_p' must be > 0", "top_p")
    top_k = _number(body, "top_k", 0, -1, vocab, integer=True)
    seed = _number(body, "seed", 0, -(2 ** 63), 2 ** 63 - 1, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise _bad("'stream_options' must be an object with a boolean include_usage", "stream_options")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("'ignore_eos' must be a boolean", "ignore_eos")
    sampling = SamplingConfig(temperature=float(temperature), top_p=float(top_p), top_k=max(top_k, 0),
                              seed=seed % (2 ** 63))
    return Params(chat, None if chat else _prompt(body, vocab), _messages(body) if chat else None, max_tokens,
                  sampling, _stop(body), stream, bool(opts.get("include_usage", False)), not ignore_eos)


# ---- responses ---------------------------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response(rid: str, model: str, chat: bool, text: str, finish: str, use: dict) -> dict:
    choice = {"index": 0, "finish_reason": finish, "logprobs": None}
    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": use}


def chunk(rid: str, model: str, chat: bool, text: str | None, finish: str | None, *, role: bool = False,
          use: dict | None = None) -> dict:
    """A streamed chunk; ``use`` alone (no text): the usage chunk, whose ``choices`` is empty."""
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
           "created": int(time.time()), "model": model}
    if use is not None:
        return {**out, "choices": [], "usage": use}
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
    return {**out, "choices": [choice]}
