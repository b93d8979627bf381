"""The engine loop of continuous batching: one thread owns the device and decides what runs.

Requests wait in a bounded FIFO queue (:meth:`Scheduler.submit` refuses with :class:`QueueFull` when it is full).
Between two decode steps the loop (1) frees the slots of cancelled requests, (2) admits waiting requests in
arrival order while a slot is free and the page pool holds their prompt plus ``max_tokens`` (the head of the
queue waits for room rather than being overtaken, so a long request is never starved), prefilling each alone
into its slot, and (3) runs one decode step of every occupied slot (:meth:`prr.model.runner.SlotRunner.step`).
A sequence that finishes (EOS, a stop string, its token limit) or is cancelled leaves its slot and its pages at
once. Events go back to the request's owner through its ``emit`` callback (called on the engine thread: it
must be thread-safe and must not block).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import traceback
from collections.abc import Callable

from ..model.runner import SlotRunner
from ..model.sampling import SamplingConfig
from .metrics import Metrics
from .text import TextStream


class QueueFull(RuntimeError):
    """The waiting queue is full (HTTP 429)."""


class ShuttingDown(RuntimeError):
    """The server stopped admitting requests (HTTP 503)."""


@dataclasses.dataclass
class Event:
    """``kind``: ``"token"`` (``text`` is the delta, ``token`` the id), ``"done"`` (``finish_reason``) or
    ``"error"`` (``status``, ``text`` the message)."""

    kind: str
    text: str = ""
    token: int | None = None
    finish_reason: str | None = None
    status: int = 0


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingConfig
    emit: Callable[[Event], None]
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: bool = False
    slot: int | None = None
    stream: TextStream | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.stream.tokens) if self.stream else 0


class Scheduler:
    """Runs `runner` on its own thread (:meth:`start`); ``fill="random"`` admits with random keys and values
    instead of a prefill (random-weight benchmarks, see :meth:`prr.model.runner.SlotRunner.admit`)."""

    def __init__(self, runner: SlotRunner, *, max_queue: int = 256, fill: str = "prefill",
                 metrics: Metrics | None = None):
        self.runner, self.max_queue, self.fill = runner, max_queue, fill
        self.metrics = metrics or Metrics()
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: dict[int, Request] = {}
        self.cv = threading.Condition()
        self.admitting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.peak_running = 0  # the most sequences decoded together so far

    # ---- the owner's side (any thread) -------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queue a request: ValueError if it can never fit, QueueFull, ShuttingDown."""
        self.runner.check_fits(len(req.prompt), req.max_tokens)
        with self.cv:
            if not self.admitting:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                self.metrics.finished("rejected")
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self.waiting.append(req)
            self.cv.notify()

    def cancel(self, req: Request) -> None:
        """The owner is gone (a client disconnected): the loop frees its slot before the next step."""
        with self.cv:
            req.cancelled = True
            self.cv.notify()

    def snapshot(self) -> dict:
        with self.cv:
            return {"running": len(self.running), "waiting": len(self.waiting),
                    "pages_in_use": self.runner.pool.in_use, "pages_total": self.runner.pool.num_pages}

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._loop, name="prr-engine", daemon=True)
        self._thread.start()
        return self

    def stop_admitting(self) -> None:
        with self.cv:
            self.admitting = False

    def stop(self, timeout: float | None = None) -> None:
        """Stop admitting, let queued and running requests finish (at most `timeout` s), then end the loop;
        what is still unfinished then gets a 503 error event."""
        self.stop_admitting()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cv:
            while (self.waiting or self.running) and self._thread is not None and self._thread.is_alive():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self.cv.wait(0.1 if left is None else min(left, 0.1))
            self._stop = True
            self.cv.notify_all()
        if self._thread is not None:
            self._thread.join()
        for req in [*self.waiting, *self.running.values()]:
            req.emit(Event("error", "the server shut down before the request finished", status=503))

    # ---- the engine thread -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self._stop and not self.running and not self.waiting:
                    self.cv.wait()
                if self._stop:
                    return
                cancelled = [r for r in self.running.values() if r.cancelled]
                dropped = [r for r in self.waiting if r.cancelled]
                for r in dropped:
                    self.waiting.remove(r)
            for r in cancelled:
                self._finish(r, "cancelled")
            for _ in dropped:
                self.metrics.finished("cancelled")
            self._admit()
            if self.running:
                self._step()
            with self.cv:
                self.cv.notify_all()  # stop() waits for the queues to drain

    def _admit(self) -> None:
        while True:
            with self.cv:
                if not self.waiting:
                    return
                req = self.waiting[0]
                if not self.runner.can_admit(len(req.prompt), req.max_tokens):
                    return
                self.waiting.popleft()
            try:
                slot, tok = self.runner.admit(req.prompt, req.max_tokens, req.sampling, fill=self.fill)
            except Exception as e:  # one request's failure (e.g. out of memory) is that request's error
                traceback.print_exc()
                self.metrics.finished("failed")
                req.emit(Event("error", f"{type(e).__name__}: {e}", status=500))
                continue
            req.slot, req.stream = slot, TextStream(self.runner.tok, req.max_tokens, req.stop, req.stop_at_eos)
            with self.cv:
                self.running[slot] = req
                self.peak_running = max(self.peak_running, len(self.running))
            with self.metrics.lock:
                self.metrics.prompt_tokens += len(req.prompt)
            self._token(req, tok)

    def _step(self) -> None:
        tokens = {s: r.stream.tokens[-1] for s, r in self.running.items()}
        try:
            out, counts = self.runner.step(tokens)
        except Exception as e:  # the batch is lost; the server is not
            traceback.print_exc()
            for r in list(self.running.values()):
                r.emit(Event("error", f"{type(e).__name__}: {e}", status=500))
                self._finish(r, "failed")
            return
        self.steps += 1
        if counts is not None:
            self.metrics.add_blocks(counts)
        for s, tok in out.items():
            self._token(self.running[s], tok)

    def _token(self, req: Request, tok: int) -> None:
        now = time.perf_counter()
        m = self.metrics
        with m.lock:
            m.generated_tokens += 1
            if req.first_token_at is None:
                m.ttft.observe(now - req.arrival)
            else:
                m.tpot.observe(now - req.last_token_at)
        req.first_token_at = req.first_token_at or now
        req.last_token_at = now
        if req.cancelled:
            self._finish(req, "cancelled")
            return
        delta, reason = req.stream.add(tok)
        req.emit(Event("token", delta, tok, reason))
        if reason is not None:
            req.emit(Event("done", finish_reason=reason))
            self._finish(req, "completed")

    def _finish(self, req: Request, outcome: str) -> None:
        with self.cv:
            if self.running.get(req.slot) is req:
                del self.running[req.slot]
                self.runner.release(req.slot)
        self.metrics.finished(outcome)
