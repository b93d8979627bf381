"""DSA selectors: configuration, block metadata and the select call (orchestration of ops)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import _checks as check
from .. import ops
from ..cache import KVCache
from ..ops._common import check_block_size
from ..ops.scoring import AGGREGATES
from ..ops.select import check_budget

METHODS = ("quest", "infllm_v2", "oracle")


@dataclass(frozen=True, slots=True)
class SparseConfig:
    """What DSA selects per (sequence, KV head): ``n_sink`` first blocks, ``n_local`` last blocks and the
    ``top_k`` best-scored others, blocks of ``block_size`` tokens. ``window``/``stride`` are the InfLLM-v2
    compression (ignored by the other methods)."""

    method: str = "quest"
    block_size: int = 16
    top_k: int = 125
    n_sink: int = 1
    n_local: int = 2
    aggregate: str = "sum"
    window: int = 32
    stride: int = 16

    def __post_init__(self):
        check.choice("method", self.method, METHODS)
        check.power_of_two("block_size", self.block_size)
        check_budget(self.top_k, self.n_sink, self.n_local)
        check.choice("aggregate", self.aggregate, AGGREGATES)
        if self.method == "infllm_v2":
            check.positive_int("window", self.window)
            check.positive_int("stride", self.stride)
            if self.block_size % self.stride or self.block_size < self.window or self.window % self.stride:
                raise ValueError(
                    f"infllm_v2 needs block_size ({self.block_size}) >= window ({self.window}), both multiples "
                    f"of stride ({self.stride})"
                )

    @property
    def k_max(self) -> int:
        """Capacity of a selection, in blocks."""
        return self.n_sink + self.n_local + self.top_k

    @property
    def budget_tokens(self) -> int:
        return self.k_max * self.block_size

    @classmethod
    def from_budget(cls, method: str, budget_tokens: int, **kw) -> SparseConfig:
        """A config whose selection holds `budget_tokens` tokens in all (forced blocks included).

        Defaults: Quest blocks of 16 tokens; InfLLM-v2 blocks of 64 tokens; oracle blocks of 16; one sink and
        two local blocks.
        """
        check.choice("method", method, METHODS)
        check.positive_int("budget_tokens", budget_tokens)
        bs = kw.pop("block_size", 64 if method == "infllm_v2" else 16)
        n_sink, n_local = kw.pop("n_sink", 1), kw.pop("n_local", 2)
        top_k = budget_tokens // bs - n_sink - n_local
        if top_k <= 0:
            raise ValueError(
                f"budget_tokens={budget_tokens} leaves no dynamic block (block_size={bs}, n_sink={n_sink}, "
                f"n_local={n_local})"
            )
        return cls(method=method, block_size=bs, top_k=top_k, n_sink=n_sink, n_local=n_local, **kw)

    def replace(self, **kw) -> SparseConfig:
        fields = {f: getattr(self, f) for f in self.__slots__}
        fields.update(kw)
        return SparseConfig(**fields)


@dataclass
class Selection:
    """``indices [B, Hkv, K_max]`` int32 (sorted, -1 padded), ``counts [B, Hkv]`` int32 and, for a true
    selection, the block ``scores [B, Hkv, N_max]`` float32 that produced it (the predictor's input)."""

    indices: torch.Tensor
    counts: torch.Tensor
    scores: torch.Tensor | None = None


class BlockMetadata:
    """The selector's per-block summary of the cache, kept in step with it.

    Build once after prefill (:meth:`build`), then call :meth:`append` after every ``KVCache.append``.
    """

    def __init__(self, cfg: SparseConfig, cache: KVCache):
        if not isinstance(cfg, SparseConfig):
            raise TypeError(f"cfg must be a SparseConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.kmin = self.kmax = self.ckeys = None
        self.amortized = None  # an AmortizedSelector attached here is what select() uses (issue #12)
        self.build(cache)

    def build(self, cache: KVCache) -> None:
        cfg = self.cfg
        if cfg.method == "quest":
            self.kmin, self.kmax = ops.quest_metadata(cache, cfg.block_size)
        elif cfg.method == "infllm_v2":
            self.ckeys = ops.infllm_metadata(cache, cfg.window, cfg.stride)
        else:  # the oracle reads the cache itself; only the block size needs checking
            check_block_size(cfg.block_size, cache.page_size)

    def quest_fold(self):
        """``(kmin, kmax, block_size)`` for a KV append that folds the token into Quest's metadata itself
        (:func:`prr.ops.fused.append_kv`), or None: other methods append with :meth:`append`."""
        return (self.kmin, self.kmax, self.cfg.block_size) if self.cfg.method == "quest" else None

    def append(self, cache: KVCache) -> None:
        cfg = self.cfg
        if cfg.method == "quest":
            ops.quest_metadata_append(self.kmin, self.kmax, cache, cfg.block_size)
        elif cfg.method == "infllm_v2":
            ops.infllm_metadata_append(self.ckeys, cache, cfg.window, cfg.stride)

    def scores(self, q: torch.Tensor, cache: KVCache, with_groups: bool = False):
        """Block scores ``[B, Hkv, N_max]`` float32 of the configured method; ``with_groups``: ``(scores,
        group_max)``, the top-K's stage-1 group maxima written by the same Triton kernel (None otherwise)."""
        cfg = self.cfg
        groups = (cfg.n_sink, cfg.n_local) if with_groups else None
        if cfg.method == "quest":
            return ops.quest_scores(q, self.kmin, self.kmax, cache, cfg.block_size, cfg.aggregate,
                                    group_max_for=groups)
        if cfg.method == "infllm_v2":
            return ops.infllm_scores(q, self.ckeys, cache, cfg.block_size, cfg.window, cfg.stride, cfg.aggregate,
                                     group_max_for=groups)
        s = ops.oracle_scores(q, cache, cfg.block_size, cfg.aggregate)
        return (s, None) if with_groups else s


class GuessedTopK:
    """One layer's guessed top-K (:func:`prr.ops.select_blocks_guessed`) with its state, fixed buffers updated
    in place: the previous selection ``s_idx``/``s_cnt`` (its blocks bound this step's threshold; the new
    selection replaces it), the next predicted set ``p_idx``/``p_cnt`` (``spec_k`` dynamic blocks, for PRR's
    speculation), the unused carried threshold ``guess`` and the rows' ``stats [2, B, Hkv]`` (``|C(τ)|`` and
    the path). Before its first step (or after :meth:`reset`) it holds no selection: the first guess admits
    every block, which narrows or falls back, exactly. ``hold``: the previous selection stays as seeded (its own
    buffers; benchmarks replaying one step)."""

    def __init__(self, batch: int, num_kv_heads: int, cfg: SparseConfig, spec_k: int | None = None, device="cpu",
                 hold: bool = False):
        self.cfg = cfg
        self.spec_k = cfg.top_k if spec_k is None else check.positive_int("spec_k", spec_k)
        shape = (batch, num_kv_heads)
        self.s_idx = torch.full((*shape, cfg.k_max), -1, dtype=torch.int32, device=device)
        self.s_cnt = torch.zeros(shape, dtype=torch.int32, device=device)
        self.guess = torch.full(shape, float("-inf"), device=device)
        self.p_idx = torch.full((*shape, cfg.n_sink + cfg.n_local + self.spec_k), -1, dtype=torch.int32,
                                device=device)
        self.p_cnt = torch.zeros(shape, dtype=torch.int32, device=device)
        self.stats = torch.zeros(2, *shape, dtype=torch.int32, device=device)
        self.prev = (self.s_idx.clone(), self.s_cnt.clone()) if hold else (self.s_idx, self.s_cnt)

    def buffers(self) -> list[torch.Tensor]:
        """The op's six outputs, in its order."""
        return [self.s_idx, self.s_cnt, self.guess, self.p_idx, self.p_cnt, self.stats]

    def reset(self) -> None:
        for idx, cnt in self._selections():
            idx.fill_(-1)
            cnt.zero_()

    def seed(self, indices: torch.Tensor, counts: torch.Tensor) -> None:
        """Start from a known selection (e.g. the last prompt position's)."""
        for idx, cnt in self._selections():
            idx.copy_(indices)
            cnt.copy_(counts)

    def rows(self, nb: int) -> GuessedTopK:
        """A view of the first `nb` sequences (the state shared; its own stats buffer)."""
        v = copy.copy(self)
        v.s_idx, v.s_cnt, v.guess, v.p_idx, v.p_cnt = (t[:nb] for t in (self.s_idx, self.s_cnt, self.guess,
                                                                          self.p_idx, self.p_cnt))
        v.stats = self.stats[:, :nb].clone()
        v.prev = (v.s_idx, v.s_cnt) if self.prev[0] is self.s_idx else tuple(t[:nb] for t in self.prev)
        return v

    def _selections(self):
        return [(self.s_idx, self.s_cnt)] + ([self.prev] if self.prev[0] is not self.s_idx else [])

    def select(self, q: torch.Tensor, cache: KVCache, meta: BlockMetadata, nblk: torch.Tensor,
               nblk_next: torch.Tensor | None = None, after_scores: Callable[[], None] | None = None) -> Selection:
        """This step's selection (the same S as :func:`select`), found from the previous one; also writes the
        next P (over ``nblk_next`` blocks) and the stats. ``after_scores()``: called once the scores' kernels
        are launched, before the top-K's (a runtime forks work that waits for the scores there)."""
        cfg = self.cfg
        scores, gmax = meta.scores(q, cache, with_groups=True)
        if after_scores is not None:
            after_scores()
        ops.select_blocks_guessed(scores, nblk, cfg.top_k, cfg.n_sink, cfg.n_local, prev=self.prev,
                                  spec_k=self.spec_k, num_blocks_next=nblk_next, group_max=gmax,
                                  out=self.buffers())
        return Selection(self.s_idx, self.s_cnt, scores)


def select(q: torch.Tensor, cache: KVCache, meta: BlockMetadata, top_k: int | None = None,
           nblk: torch.Tensor | None = None, amortized=None,
           after_scores: Callable[[], None] | None = None) -> Selection:
    """The true DSA selection of this step: score every block, then sink ∪ local ∪ top-K. ``nblk`` (blocks per
    sequence, ``ops.num_blocks(cache.seq_lens, block_size)``) may be passed when the caller has it already.
    ``amortized`` (or one attached as ``meta.amortized``): a :class:`prr.algo.amortized.AmortizedSelector`
    selects instead (a full scan every m steps, candidates re-scored between; its Selection has no scores);
    a ``top_k`` other than the config's runs the full selection. ``after_scores()``: called between the scores'
    launch and the top-K's (not with amortized selection)."""
    if not isinstance(meta, BlockMetadata):
        raise TypeError(f"meta must be a BlockMetadata, got {type(meta).__name__}")
    amortized = amortized if amortized is not None else meta.amortized
    if amortized is not None and top_k in (None, meta.cfg.top_k):
        return amortized.select(q, cache, nblk)
    cfg = meta.cfg
    scores, gmax = meta.scores(q, cache, with_groups=True)
    if after_scores is not None:
        after_scores()
    nblk = ops.num_blocks(cache.seq_lens, cfg.block_size) if nblk is None else nblk
    idx, cnt = ops.select_blocks(scores, nblk, top_k or cfg.top_k, cfg.n_sink, cfg.n_local, group_max=gmax)
    return Selection(idx, cnt, scores)
