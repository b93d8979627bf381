"""A load generator for the server: N concurrent clients, a prompt-length mix, closed-loop or Poisson arrivals.

Clients talk to the engine loop in process (:class:`prr.serve.scheduler.Scheduler`: no HTTP stack needed, so
this runs where only torch is installed) or to a server over HTTP (streamed ``/v1/completions``, with httpx).
Per request the client records when it was sent, when each token arrived and how it ended (``ok``, or the HTTP
status of a refusal: 400, 429, 503...). Times are the client's (``time.perf_counter``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time

import numpy as np


@dataclasses.dataclass
class Spec:
    """One request of a workload: prompt token ids and the tokens to generate (EOS ignored)."""

    prompt: list[int]
    max_tokens: int


@dataclasses.dataclass
class Record:
    sent: float
    tokens: list[float] = dataclasses.field(default_factory=list)  # arrival time of each token
    status: str = "ok"  # "ok", or the HTTP status of a refusal / error ("429", "400", ...)
    done: float | None = None


def workload(n: int, prompt_lens: list[int], out_range: tuple[int, int], vocab: int, seed: int = 0,
             text_ids: list[int] | None = None) -> list[Spec]:
    """`n` requests: prompt lengths drawn uniformly from `prompt_lens`, outputs uniformly from `out_range`
    (inclusive). Prompts are slices of `text_ids` (real text) when given, else random token ids."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t = rng.choice(prompt_lens)
        if text_ids is not None:
            start = rng.randrange(0, max(1, len(text_ids) - t))
            prompt = (text_ids * (1 + t // max(1, len(text_ids))))[start:start + t]
        else:
            prompt = [rng.randrange(vocab) for _ in range(t)]
        out.append(Spec(prompt, rng.randint(*out_range)))
    return out


def arrivals(n: int, mode: str, rate: float | None, seed: int = 0) -> list[float] | None:
    """Send times (s from the start) for Poisson arrivals at `rate` requests/s; None for closed loop."""
    if mode == "closed":
        return None
    if mode != "poisson" or not rate or rate <= 0:
        raise ValueError("poisson arrivals need a positive --rate (requests per second)")
    rng = random.Random(seed + 1)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


async def _in_process(scheduler, spec: Spec, rec: Record) -> None:
    from ..model.sampling import SamplingConfig
    from ..serve.scheduler import QueueFull, Request, ShuttingDown

    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    req = Request(spec.prompt, spec.max_tokens, SamplingConfig(),
                  lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev), stop_at_eos=False)
    try:
        scheduler.submit(req)
    except QueueFull:
        rec.status = "429"
        return
    except ShuttingDown:
        rec.status = "503"
        return
    except ValueError:
        rec.status = "400"
        return
    while True:
        ev = await q.get()
        if ev.kind == "token":
            rec.tokens.append(time.perf_counter())
        if ev.kind == "error":
            rec.status = str(ev.status)
            return
        if ev.kind == "done":
            return


async def _http(client, url: str, model: str, spec: Spec, rec: Record) -> None:
    body = {"model": model, "prompt": spec.prompt, "max_tokens": spec.max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            rec.status = str(r.status_code)
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if "error" in msg:
                rec.status = "500"
                return
            if msg.get("choices"):  # one chunk per token (its text may be empty)
                rec.tokens.append(time.perf_counter())


def run_load(specs: list[Spec], concurrency: int, *, scheduler=None, url: str | None = None, model: str = "",
             send_times: list[float] | None = None, on_done=None) -> tuple[list[Record], float]:
    """Send every request (closed loop: `concurrency` clients, each sends its next request when the last one
    ended; Poisson: at `send_times`, at most `concurrency` in flight) to `scheduler` (in process) or `url`.
    ``on_done(k)`` runs after the k-th request ends (memory probes). Returns the records and the wall time."""
    if (scheduler is None) == (url is None):
        raise ValueError("give a scheduler (in process) or a url (HTTP)")

    async def main():
        client = None
        if url is not None:
            import httpx

            client = httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=concurrency + 4))
        recs: list[Record | None] = [None] * len(specs)
        ended = 0
        t0 = time.perf_counter()

        async def one(j):
            nonlocal ended
            rec = recs[j] = Record(time.perf_counter())
            if client is None:
                await _in_process(scheduler, specs[j], rec)
            else:
                await _http(client, url, model, specs[j], rec)
            rec.done = time.perf_counter()
            ended += 1
            if on_done is not None:
                on_done(ended)

        if send_times is None:
            nxt = iter(range(len(specs)))

            async def worker():
                for j in nxt:
                    await one(j)
                    if recs[j].status == "429":  # a refused client backs off before its next request
                        await asyncio.sleep(0.05)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            gate = asyncio.Semaphore(concurrency)

            async def timed(j):
                await asyncio.sleep(max(0.0, t0 + send_times[j] - time.perf_counter()))
                async with gate:
                    await one(j)

            await asyncio.gather(*(timed(j) for j in range(len(specs))))
        if client is not None:
            await client.aclose()
        return recs, time.perf_counter() - t0

    return asyncio.run(main())


def _pct(xs, q):
    return round(float(np.percentile(xs, q)), 5) if len(xs) else None


def summarize(recs: list[Record], wall_s: float) -> dict:
    """Throughput (output tokens / wall time), TTFT, TPOT (per request: (last - first token) / (n - 1)) and
    inter-token latency percentiles, and the outcome of every request."""
    ok = [r for r in recs if r.status == "ok"]
    ttft = [r.tokens[0] - r.sent for r in ok if r.tokens]
    tpot = [(r.tokens[-1] - r.tokens[0]) / (len(r.tokens) - 1) for r in ok if len(r.tokens) > 1]
    itl = [b - a for r in ok for a, b in zip(r.tokens, r.tokens[1:], strict=False)]
    outcomes: dict[str, int] = {}
    for r in recs:
        outcomes[r.status] = outcomes.get(r.status, 0) + 1
    tokens = sum(len(r.tokens) for r in ok)
    return {"requests": len(recs), "outcomes": outcomes, "output_tokens": tokens, "wall_s": round(wall_s, 3),
            "throughput_tok_s": round(tokens / wall_s, 2) if wall_s > 0 else None,
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
            "tpot_p50_s": _pct(tpot, 50), "tpot_p99_s": _pct(tpot, 99),
            "itl_p50_s": _pct(itl, 50), "itl_p99_s": _pct(itl, 99)}
