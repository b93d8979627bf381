"""DSA selectors: configuration, block metadata and the select call (orchestration of ops)."""

from __future__ import annotations

import copy
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

    def scores(self, q: torch.Tensor, cache: KVCache, with_groups: bool = False, bound_for=None):
        """Block scores ``[B, Hkv, N_max]`` float32 of the configured method; ``with_groups``: ``(scores,
        group_max)``, the top-K's stage-1 group maxima written by the same Triton kernel (None otherwise).
        ``bound_for=(flags, bound)``: also the guessed top-K's threshold (see :func:`prr.ops.quest_scores`)."""
        cfg = self.cfg
        groups = (cfg.n_sink, cfg.n_local) if with_groups or bound_for is not None else None
        if cfg.method == "quest":
            out = ops.quest_scores(q, self.kmin, self.kmax, cache, cfg.block_size, cfg.aggregate,
                                   group_max_for=groups, bound_for=bound_for)
        elif cfg.method == "infllm_v2":
            out = ops.infllm_scores(q, self.ckeys, cache, cfg.block_size, cfg.window, cfg.stride, cfg.aggregate,
                                    group_max_for=groups, bound_for=bound_for)
        else:
            s = ops.oracle_scores(q, cache, cfg.block_size, cfg.aggregate)
            if bound_for is not None:
                nb = ops.num_blocks(cache.seq_lens, cfg.block_size)
                low = ops.guessed.guess_bound(s, nb, bound_for[0], cfg.n_sink, cfg.n_local)
                bound_for[1].copy_(torch.minimum(bound_for[1], low))
            out = (s, None) if groups is not None else s
        return out if with_groups or groups is None else out[0]


class GuessedTopK:
    """One layer's guessed top-K (:func:`prr.ops.select_blocks_guessed`) with its state, fixed buffers updated
    in place: the previous selection's flag row ``flags [B, Hkv, N_max]`` (its blocks bound this step's
    threshold, which the scoring kernel folds into ``bound``; the new selection replaces them), the selection
    ``s_idx``/``s_cnt``, the next predicted set ``p_idx``/``p_cnt`` (``spec_k`` dynamic blocks, for PRR's
    speculation) and the rows' ``stats [2, B, Hkv]`` (``|C(τ)|`` and the path). Before its first step (or
    after :meth:`reset`) it holds no selection: the first step runs the full search, exactly. ``hold``: the
    flags stay as seeded (the new ones go to a scratch row; benchmarks replaying one step)."""

    def __init__(self, batch: int, num_kv_heads: int, cfg: SparseConfig, spec_k: int | None = None, device="cpu",
                 hold: bool = False, max_blocks: int | None = None):
        self.cfg = cfg
        self.write_p = spec_k is not None  # (DSA on the guessed top-K has no use for P)
        self.spec_k = cfg.top_k if spec_k is None else check.positive_int("spec_k", spec_k)
        self.max_blocks = max_blocks
        shape = (batch, num_kv_heads)
        self.s_idx = torch.full((*shape, cfg.k_max), -1, dtype=torch.int32, device=device)
        self.s_cnt = torch.zeros(shape, dtype=torch.int32, device=device)
        self.p_idx = torch.full((*shape, cfg.n_sink + cfg.n_local + self.spec_k), -1, dtype=torch.int32,
                                device=device)
        self.p_cnt = torch.zeros(shape, dtype=torch.int32, device=device)
        self.stats = torch.zeros(2, *shape, dtype=torch.int32, device=device)
        self.bound = torch.full(shape, 2 ** 31 - 1, dtype=torch.int32, device=device)
        n = 1 if max_blocks is None else max_blocks
        self.flags = torch.zeros(*shape, n, dtype=torch.uint8, device=device)
        self.flags_out = torch.zeros_like(self.flags) if hold else None

    def buffers(self) -> list[torch.Tensor]:
        """The op's five outputs, in its order."""
        return [self.s_idx, self.s_cnt, self.p_idx, self.p_cnt, self.stats]

    def state(self) -> list[torch.Tensor]:
        """Every buffer the op reads or writes (a graph's snapshot)."""
        extra = [] if self.flags_out is None else [self.flags_out]
        return [*self.buffers(), self.flags, self.bound, *extra]

    def _ensure(self, n_max: int) -> None:
        if self.flags.shape[-1] != n_max:  # sized at the first step (or set up front with max_blocks)
            self.flags = torch.zeros(*self.flags.shape[:2], n_max, dtype=torch.uint8, device=self.flags.device)
            if self.flags_out is not None:
                self.flags_out = torch.zeros_like(self.flags)

    def reset(self) -> None:
        self.flags.zero_()
        self.bound.fill_(2 ** 31 - 1)

    def seed(self, indices: torch.Tensor, counts: torch.Tensor, n_max: int | None = None) -> None:
        """Start from a known selection (e.g. the last prompt position's)."""
        self._ensure(n_max or self.flags.shape[-1])
        self.flags.copy_(ops.guessed.selection_flags(indices, counts, self.flags.shape[-1]))
        self.bound.fill_(2 ** 31 - 1)

    def rows(self, nb: int) -> GuessedTopK:
        """A view of the first `nb` sequences (the state shared; its own stats buffer)."""
        v = copy.copy(self)
        v.s_idx, v.s_cnt, v.p_idx, v.p_cnt, v.bound, v.flags = (t[:nb] for t in (
            self.s_idx, self.s_cnt, self.p_idx, self.p_cnt, self.bound, self.flags))
        v.flags_out = None if self.flags_out is None else self.flags_out[:nb]
        v.stats = self.stats[:, :nb].clone()
        return v

    def select(self, q: torch.Tensor, cache: KVCache, meta: BlockMetadata, nblk: torch.Tensor,
               nblk_next: torch.Tensor | None = None) -> Selection:
        """This step's selection (the same S as :func:`select`), found from the previous one; also writes the
        next P (over ``nblk_next`` blocks) and the stats."""
        cfg = self.cfg
        self._ensure(cache.max_blocks(cfg.block_size))
        scores, gmax = meta.scores(q, cache, with_groups=True, bound_for=(self.flags, self.bound))
        ops.select_blocks_guessed(scores, nblk, cfg.top_k, cfg.n_sink, cfg.n_local, prev=self.flags,
                                  bound=self.bound, spec_k=self.spec_k, num_blocks_next=nblk_next, group_max=gmax,
                                  out=self.buffers(), prev_out=self.flags_out, write_p=self.write_p)
        return Selection(self.s_idx, self.s_cnt, scores)


def select(q: torch.Tensor, cache: KVCache, meta: BlockMetadata, top_k: int | None = None,
           nblk: torch.Tensor | None = None, amortized=None) -> Selection:
    """The true DSA selection of this step: score every block, then sink ∪ local ∪ top-K. ``nblk`` (blocks per
    sequence, ``ops.num_blocks(cache.seq_lens, block_size)``) may be passed when the caller has it already.
    ``amortized`` (or one attached as ``meta.amortized``): a :class:`prr.algo.amortized.AmortizedSelector`
    selects instead (a full scan every m steps, candidates re-scored between; its Selection has no scores);
    a ``top_k`` other than the config's runs the full selection."""
    if not isinstance(meta, BlockMetadata):
        raise TypeError(f"meta must be a BlockMetadata, got {type(meta).__name__}")
    amortized = amortized if amortized is not None else meta.amortized
    if amortized is not None and top_k in (None, meta.cfg.top_k):
        return amortized.select(q, cache, nblk)
    cfg = meta.cfg
    scores, gmax = meta.scores(q, cache, with_groups=True)
    nblk = ops.num_blocks(cache.seq_lens, cfg.block_size) if nblk is None else nblk
    idx, cnt = ops.select_blocks(scores, nblk, top_k or cfg.top_k, cfg.n_sink, cfg.n_local, group_max=gmax)
    return Selection(idx, cnt, scores)
