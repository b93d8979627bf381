"""The HTTP side: an ASGI app (Starlette) speaking OpenAI's API in front of the engine loop.

Why Starlette and uvicorn: they are the ASGI stack under FastAPI, well kept and widely deployed; the API here is
five routes whose errors must be OpenAI-shaped and whose bodies must be capped before they are parsed, so
FastAPI's pydantic models and generated docs would add a layer without taking work away. Starlette gives the
routing, server-sent events (``StreamingResponse``) and disconnect detection; uvicorn the server.

Each request gets an ``asyncio.Queue``; the engine thread puts :class:`prr.serve.scheduler.Event` s into it
through ``loop.call_soon_threadsafe``. A client that disconnects (mid-stream, or while waiting for a whole
answer) cancels its request: the engine frees its slot and pages before the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from ..model.runner import PAGE_SIZE
from .protocol import ApiError, chunk, new_id, parse, response, usage
from .scheduler import Event, QueueFull, Request, Scheduler, ShuttingDown

MAX_BODY_BYTES = 4 << 20
"""The largest request body read (a 128K-token prompt is ~0.5 MB of text)."""


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(scheduler: Scheduler, model_id: str, *, api_key: str | None = None,
               max_tokens_cap: int = 4096, max_body_bytes: int = MAX_BODY_BYTES, lifespan=None) -> Starlette:
    """The app over a started `scheduler`. ``api_key``: every ``/v1`` route needs ``Authorization: Bearer
    <api_key>`` (``/health`` and ``/metrics`` stay open, as for probes and scrapers). ``max_tokens_cap``: the
    largest ``max_tokens`` a request may ask."""
    runner = scheduler.runner
    tok, vocab = runner.tok, runner.cfg.vocab_size
    created = int(time.time())

    def authorize(request: HttpRequest) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), api_key.encode()):
            raise ApiError(401, "a valid API key is required (Authorization: Bearer <key>)", None,
                           "invalid_api_key")

    async def read_json(request: HttpRequest):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > max_body_bytes):
            raise ApiError(413, f"the request body exceeds {max_body_bytes} bytes")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > max_body_bytes:
                raise ApiError(413, f"the request body exceeds {max_body_bytes} bytes")
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    def prompt_ids(p) -> list[int]:
        if p.chat:
            if tok is None or not tok.chat_template:
                raise ApiError(400, "this model has no chat template: use /v1/completions", "messages")
            try:
                return tok.chat(p.messages)
            except Exception as e:  # a template that refuses the conversation (e.g. roles out of order)
                raise ApiError(400, f"the chat template refused the messages: {e}", "messages") from None
        if isinstance(p.prompt, str):
            if tok is None:
                raise ApiError(400, "this model has no tokenizer: send the prompt as token ids", "prompt")
            ids = tok.encode(p.prompt)
            if not ids:
                raise ApiError(400, "the prompt encodes to no tokens", "prompt")
            return ids
        return p.prompt

    async def generate(request: HttpRequest, chat: bool):
        try:
            authorize(request)
            p = parse(await read_json(request), chat=chat, model_id=model_id, vocab=vocab,
                      max_tokens_cap=max_tokens_cap)
            ids = prompt_ids(p)
            limit = min(runner.max_seq_len, runner.pool.num_pages * PAGE_SIZE)
            room = limit - len(ids)
            if room < 1:
                what = "context" if runner.max_seq_len <= limit else "KV cache"
                raise ApiError(400, f"the prompt ({len(ids)} tokens) fills the server's {what} of {limit} tokens",
                               "messages" if chat else "prompt", "context_length_exceeded")
            max_tokens = p.max_tokens if p.max_tokens is not None else min(max_tokens_cap, room)
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[Event] = asyncio.Queue()
            req = Request(ids, max_tokens, p.sampling, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev),
                          p.stop, p.stop_at_eos)
            try:
                scheduler.submit(req)
            except ValueError as e:
                raise ApiError(400, str(e), "max_tokens", "context_length_exceeded") from None
            except QueueFull as e:
                raise ApiError(429, str(e), None, "queue_full", "rate_limit_error") from None
            except ShuttingDown as e:
                raise ApiError(503, str(e), None, "shutting_down", "server_error") from None
        except ApiError as e:
            return _error(e)
        rid = new_id(chat)
        if p.stream:
            return StreamingResponse(_sse(req, queue, rid, chat, p.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _whole(request, req, queue, rid, chat)

    async def _whole(request, req, queue, rid, chat):
        parts, finish = [], None
        try:
            while finish is None:
                try:
                    ev = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        scheduler.cancel(req)
                        return JSONResponse({}, status_code=499)
                    continue
                if ev.kind == "error":
                    return _error(ApiError(ev.status, ev.text, kind="server_error"))
                if ev.kind == "token":
                    parts.append(ev.text)
                finish = ev.finish_reason if ev.kind == "done" else None
        except asyncio.CancelledError:
            scheduler.cancel(req)
            raise
        use = usage(len(req.prompt), req.completion_tokens)
        return JSONResponse(response(rid, model_id, chat, "".join(parts), finish, use))

    async def _sse(req, queue, rid, chat, include_usage):
        def data(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        done = False
        try:
            if chat:
                yield data(chunk(rid, model_id, chat, None, None, role=True))
            while not done:
                ev = await queue.get()
                if ev.kind == "error":
                    yield data(ApiError(ev.status, ev.text, kind="server_error").body())
                    break
                if ev.kind == "token" and (ev.text or not chat):  # a completion streams every token (timing)
                    yield data(chunk(rid, model_id, chat, ev.text, None))
                if ev.kind == "done":
                    done = True
                    yield data(chunk(rid, model_id, chat, None if chat else "", ev.finish_reason))
                    if include_usage:
                        yield data(chunk(rid, model_id, chat, None, None,
                                         use=usage(len(req.prompt), req.completion_tokens)))
            yield "data: [DONE]\n\n"
        finally:
            if not done:  # the client went away (or the stream broke): free the slot
                scheduler.cancel(req)

    async def completions(request):
        return await generate(request, chat=False)

    async def chat_completions(request):
        return await generate(request, chat=True)

    async def models(request):
        try:
            authorize(request)
        except ApiError as e:
            return _error(e)
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                                          "owned_by": "prr", "max_model_len": runner.max_seq_len}]})

    async def health(request):
        snap = scheduler.snapshot()
        ok = scheduler.admitting
        return JSONResponse({"status": "ok" if ok else "shutting down", **snap, "attention": runner.attention,
                             "speculation": runner.spec_decision}, status_code=200 if ok else 503)

    async def metrics(request):
        s = scheduler.snapshot()
        gauges = {"prr_requests_running": ("Requests in a batch slot", s["running"]),
                  "prr_requests_waiting": ("Requests queued for a slot", s["waiting"]),
                  "prr_cache_pages_in_use": ("KV cache pages held by requests", s["pages_in_use"]),
                  "prr_cache_pages_total": ("KV cache pages in the pool", s["pages_total"]),
                  "prr_batch_slots": ("Batch slots", runner.max_batch)}
        return PlainTextResponse(scheduler.metrics.render(gauges), media_type="text/plain; version=0.0.4")

    async def http_error(request, exc: HTTPException):
        kind = "not_found" if exc.status_code == 404 else None
        return _error(ApiError(exc.status_code, exc.detail or "error", None, kind))

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
