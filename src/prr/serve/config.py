"""What a server is made of, without its HTTP stack: the engine loop can run (benchmarks, tests) where only torch
is installed."""

from __future__ import annotations

import dataclasses

from ..algo.sparse import SparseConfig
from ..model.runner import SlotRunner
from .scheduler import Scheduler


@dataclasses.dataclass
class ServeConfig:
    """What ``prr serve`` takes besides the model (see its ``--help``)."""

    attention: str = "prr"
    sparse: SparseConfig = dataclasses.field(default_factory=lambda: SparseConfig.from_budget("quest", 1024))
    ratio: float | str = "auto"
    mode: str = "exact"
    n_dense_layers: int = 2
    max_batch: int = 8
    max_tokens_in_cache: int = 65536
    max_seq_len: int | None = None
    max_queue: int = 256
    max_tokens_cap: int = 4096
    api_key: str | None = None
    graphs: bool = True
    fill: str = "prefill"


def build_scheduler(model, tok, cfg: ServeConfig) -> Scheduler:
    runner = SlotRunner(model, tok, attention=cfg.attention, sparse=cfg.sparse, ratio=cfg.ratio, mode=cfg.mode,
                        n_dense_layers=cfg.n_dense_layers, max_batch=cfg.max_batch,
                        max_tokens_in_cache=cfg.max_tokens_in_cache, max_seq_len=cfg.max_seq_len, graphs=cfg.graphs)
    return Scheduler(runner, max_queue=cfg.max_queue, fill=cfg.fill)
