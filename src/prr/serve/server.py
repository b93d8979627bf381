"""Putting a server together: the runner, the engine loop, the app and uvicorn (in the main thread for ``prr serve``,
in a background thread for tests and ``prr bench serve``).

SIGTERM (or Ctrl-C): the scheduler stops admitting at once (new requests get 503), uvicorn stops accepting
connections and lets open ones finish (``graceful_s``), then the engine loop finishes what it holds and exits.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
import time

import uvicorn

from .app import create_app
from .config import ServeConfig, build_scheduler
from .scheduler import Scheduler


def build_app(scheduler: Scheduler, model_id: str, cfg: ServeConfig, drain_s: float = 30.0):
    """The app; its lifespan starts the engine loop and, at shutdown, drains it (at most `drain_s`)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        import asyncio

        if scheduler._thread is None:
            scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop, drain_s)

    return create_app(scheduler, model_id, api_key=cfg.api_key, max_tokens_cap=cfg.max_tokens_cap,
                      lifespan=lifespan)


class _Server(uvicorn.Server):
    """uvicorn's server, telling the scheduler to stop admitting as soon as a signal asks to exit. The signal is
    not re-raised after the graceful shutdown (uvicorn's default): ``prr serve`` then exits with status 0."""

    def __init__(self, config, scheduler: Scheduler):
        super().__init__(config)
        self.scheduler = scheduler

    def handle_exit(self, sig, frame) -> None:
        self.scheduler.stop_admitting()
        if self.should_exit and sig == signal.SIGINT:  # a second Ctrl-C: do not wait for open connections
            self.force_exit = True
        self.should_exit = True


def serve(model, tok, model_id: str, cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
          graceful_s: float = 30.0, log_level: str = "info") -> None:
    """Run until SIGTERM/SIGINT (the calling thread must be the main thread for the signals)."""
    scheduler = build_scheduler(model, tok, cfg)
    app = build_app(scheduler, model_id, cfg, drain_s=graceful_s)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_s)
    runner = scheduler.runner
    how = cfg.attention if runner.spec_decision is None else \
        f"{cfg.attention} decoding as {runner.attention}: {runner.spec_decision['reason']}"
    print(f"prr serve: {model_id} ({how}) on http://{host}:{port}/v1", file=sys.stderr)
    _Server(config, scheduler).run()


class ServerThread:
    """The app served by uvicorn on a free local port in a background thread (tests, benchmarks)."""

    def __init__(self, app, scheduler: Scheduler, host: str = "127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = _Server(config, scheduler)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()
