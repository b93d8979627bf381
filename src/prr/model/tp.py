"""Tensor parallelism over heads (Megatron-style) through ``torch.distributed``.

Rank ``r`` of ``N`` holds query heads ``[r·Hq/N, (r+1)·Hq/N)``, KV heads ``[r·Hkv/N, (r+1)·Hkv/N)``, a slice of
the FFN and a slice of the vocabulary:

- ``wq, wk, wv`` (and Qwen2's ``bq, bk, bv``), ``w_gate, w_up``: column-parallel, the rows of this rank's heads
  and FFN slice; ``wo, w_down``: row-parallel, the matching columns, so their outputs are partial sums, summed
  by one all-reduce each per layer;
- ``embed``, ``lm_head``: the rows of this rank's vocabulary slice (the vocabulary padded with zero rows to a
  multiple of N). The embedding looks up only its own tokens (zero rows for the others) and all-reduces; the
  LM head all-gathers the logits, so every rank holds all of them and picks the same greedy token;
- norms: replicated.

:func:`shard_config` gives the rank's :class:`ModelConfig` (``Hq/N``, ``Hkv/N`` heads, its FFN slice, its
vocabulary slice as ``vocab_size``), so the engine builds the rank's caches, block metadata, predictor and
selection unchanged: DSA and PRR are per KV head and need no cross-rank traffic. Every collective is a plain
``torch.distributed`` call on the current stream: with NCCL the whole decode step, collectives included, is
captured in one CUDA graph per rank; gloo (the CPU tests, or several ranks sharing one GPU) runs eagerly and
stages CUDA tensors through the host.

Limits: N must divide the KV heads (then it divides the query heads too); the FFN may split unevenly; ranks
must run the same steps in the same order (the engine does: every rank decodes the same tokens).
"""

from __future__ import annotations

import atexit
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .config import MODEL_PRESETS, ModelConfig
from .llama import Llama

# NVLink multicast (NVLS) and symmetric-memory multicast are kept off: the lent machines do not support them
# (the device notes), and NCCL's ring/tree all-reduce is what we measure.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def world_size_from_env() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _split(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank's ``[start, stop)`` of ``n`` items cut as evenly as possible."""
    return n * rank // world, n * (rank + 1) // world


def _check_rank(rank: int, world: int) -> None:
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"need 0 <= rank < world, got rank {rank} of {world}")


def check_divides(cfg: ModelConfig, world: int) -> None:
    if cfg.num_kv_heads % world:
        ok = [n for n in range(1, cfg.num_kv_heads + 1) if cfg.num_kv_heads % n == 0]
        raise ValueError(f"tensor parallelism over {world} ranks needs the KV heads ({cfg.num_kv_heads}) divisible by "
                         f"{world}; this model runs on {', '.join(map(str, ok))} ranks")
    if cfg.ffn < world:
        raise ValueError(f"the FFN ({cfg.ffn}) is narrower than the {world} ranks")


def vocab_shard(vocab_size: int, world: int) -> int:
    """Rows of the embedding / LM head per rank (the vocabulary padded to a multiple of the ranks)."""
    return -(-vocab_size // world)


def shard_config(cfg: ModelConfig, rank: int, world: int) -> ModelConfig:
    """Rank's config: ``Hq/N`` and ``Hkv/N`` heads, its FFN slice, and its vocabulary slice as ``vocab_size``."""
    _check_rank(rank, world)
    check_divides(cfg, world)
    a, b = _split(cfg.ffn, rank, world)
    return cfg.replace(num_q_heads=cfg.num_q_heads // world, num_kv_heads=cfg.num_kv_heads // world, ffn=b - a,
                       vocab_size=vocab_shard(cfg.vocab_size, world))


def shard_spec(name: str, cfg: ModelConfig, rank: int, world: int) -> tuple[int, int, int, int] | None:
    """How rank slices weight `name` (our naming, see :mod:`prr.model.llama`): ``(dim, start, stop, rows)`` —
    take ``[start, stop)`` along `dim` and pad with zeros to `rows` along dim 0 — or None (replicated)."""
    kind = name.rsplit(".", 1)[-1]
    d = cfg.head_dim
    if kind in ("embed", "lm_head"):
        vs = vocab_shard(cfg.vocab_size, world)
        return 0, min(rank * vs, cfg.vocab_size), min((rank + 1) * vs, cfg.vocab_size), vs
    if kind in ("wq", "bq", "wo"):
        hq = cfg.num_q_heads // world
        lo, hi = rank * hq * d, (rank + 1) * hq * d
        return (1 if kind == "wo" else 0), lo, hi, hi - lo
    if kind in ("wk", "wv", "bk", "bv"):
        hkv = cfg.num_kv_heads // world
        return 0, rank * hkv * d, (rank + 1) * hkv * d, hkv * d
    if kind in ("w_gate", "w_up", "w_down"):
        lo, hi = _split(cfg.ffn, rank, world)
        return (1 if kind == "w_down" else 0), lo, hi, hi - lo
    if kind in ("norm", "attn_norm", "ffn_norm"):
        return None
    raise ValueError(f"no tensor-parallel rule for weight {name!r}")


def _take(t, spec):
    """Rank's slice of `t` (a tensor, or a safetensors slice that supports ``[a:b]`` / ``[:, a:b]``)."""
    if spec is None:
        return t[:]
    dim, lo, hi, rows = spec
    out = t[lo:hi] if dim == 0 else t[:, lo:hi]
    if dim == 0 and out.shape[0] < rows:  # the last vocabulary slice: zero rows up to the common size
        out = torch.cat([out, out.new_zeros(rows - out.shape[0], *out.shape[1:])])
    return out


def shard_weights(w: dict[str, torch.Tensor], cfg: ModelConfig, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank's slices of a full weight dict (contiguous copies, so the full weights can be freed)."""
    _check_rank(rank, world)
    check_divides(cfg, world)
    return {k: _take(t, shard_spec(k, cfg, rank, world)).contiguous().clone() for k, t in w.items()}


_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


class ShardedSafetensors(Mapping):
    """A read-only map from Hugging Face tensor names to this rank's slices, read lazily from the safetensors
    files with ``safe_open(...).get_slice``: a rank never reads the other ranks' bytes."""

    def __init__(self, files: list[str], cfg: ModelConfig, rank: int, world: int):
        from safetensors import safe_open

        from .weights import HF_NAMES

        _check_rank(rank, world)
        check_divides(cfg, world)
        self.cfg, self.rank, self.world = cfg, rank, world
        self._files = [safe_open(f, framework="pt") for f in files]
        self._where = {k: f for f in self._files for k in f.keys()}
        self._ours = {theirs: ours for ours, theirs in HF_NAMES.items()}
        self._ours.update({"self_attn.q_proj.bias": "bq", "self_attn.k_proj.bias": "bk", "self_attn.v_proj.bias": "bv"})

    def our_name(self, key: str) -> str:
        top = {"model.embed_tokens.weight": "embed", "lm_head.weight": "lm_head", "model.norm.weight": "norm"}
        if key in top:
            return top[key]
        m = _HF_LAYER.match(key)
        kind = m and self._ours.get(m.group(2) + (".bias" if m.group(3) == "bias" else ""))
        if not kind:
            raise ValueError(f"no tensor-parallel rule for checkpoint tensor {key!r}")
        return f"layers.{m.group(1)}.{kind}"

    def __getitem__(self, key: str) -> torch.Tensor:
        f = self._where[key]  # KeyError for a missing tensor, as a dict would
        return _take(f.get_slice(key), shard_spec(self.our_name(key), self.cfg, self.rank, self.world))

    def __contains__(self, key) -> bool:  # without reading the tensor (Mapping's default would)
        return key in self._where

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


@dataclass
class TensorParallel:
    """This process's place in the tensor-parallel group and the collectives the model calls.

    ``world == 1`` runs the same code path without any collective (TP=1). ``comm=False`` skips the collectives
    (wrong numbers, same compute: for timing the step without them)."""

    rank: int = 0
    world: int = 1
    backend: str | None = None
    vocab_size: int | None = None  # the full vocabulary (set by load_model_tp)
    comm: bool = True

    @property
    def active(self) -> bool:
        return self.world > 1 and self.comm

    def _on_host(self, x: torch.Tensor) -> bool:
        # gloo reduces host memory: CUDA tensors go through the host (the one-GPU, several-rank check).
        return self.backend == "gloo" and x.device.type != "cpu"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (the row-parallel projections' partial outputs)."""
        if not self.active:
            return x
        import torch.distributed as dist

        if self._on_host(x):
            y = x.cpu()
            dist.all_reduce(y)
            x.copy_(y)
        else:
            dist.all_reduce(x)
        return x

    def rank0_ints(self, values: list[int], device: torch.device) -> list[int]:
        """Rank 0's ``values`` on every rank (a decision taken once, outside the decode step: it syncs)."""
        if not self.active:
            return list(values)
        import torch.distributed as dist

        x = torch.tensor(values, dtype=torch.int64, device="cpu" if self.backend == "gloo" else device)
        dist.broadcast(x, src=0)
        return [int(v) for v in x.tolist()]

    def embed(self, tokens: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Vocabulary-parallel embedding: rows of this rank's tokens, zeros for the others, summed over ranks."""
        if self.world == 1:
            return F.embedding(tokens, w)
        vs = w.shape[0]
        local = tokens - self.rank * vs
        mine = (local >= 0) & (local < vs)
        x = F.embedding(torch.where(mine, local, torch.zeros_like(local)), w) * mine[..., None].to(w.dtype)
        return self.all_reduce(x)

    def gather_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., V/N]`` logits of this rank's vocabulary slice -> ``[..., V]`` on every rank."""
        if self.world == 1:
            return x
        if not self.comm:
            return torch.cat([x] * self.world, dim=-1)[..., : self.vocab_size]
        import torch.distributed as dist

        # One collective, the ranks' parts concatenated along dim 0 (capturable in a CUDA graph); torch 2.13
        # renamed all_gather_into_tensor to all_gather_single.
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        y = (x.cpu() if self._on_host(x) else x).contiguous()
        out = y.new_empty((self.world * y.shape[0], *y.shape[1:]))
        gather(out, y)
        out = out.view(self.world, *y.shape).to(x.device)
        return out.movedim(0, -2).flatten(-2)[..., : self.vocab_size]


def init_from_env(backend: str | None = None, device: str | None = None) -> tuple[TensorParallel, torch.device]:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``). Device: ``cuda:LOCAL_RANK`` when CUDA is available (or `device` is ``"cuda"``), an explicit
    ``cuda:I`` (several ranks on one GPU need ``backend="gloo"``), or the CPU. Backend: NCCL on CUDA, else gloo."""
    import torch.distributed as dist

    for k, v in NCCL_ENV.items():
        os.environ.setdefault(k, v)
    world, rank = world_size_from_env(), int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local}" if device == "cuda" else device)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("the nccl backend needs CUDA devices; use gloo on the CPU")
    if dev.type == "cuda":
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"rank {rank} wants {dev} but this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kw = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=rank, world_size=world, **kw)
        atexit.register(dist.destroy_process_group)  # a clean exit, without NCCL's warning
    return TensorParallel(rank, world, backend), dev


def setup(tp: int | None, device: str | None, backend: str | None = None) -> tuple[TensorParallel | None, str | None]:
    """The CLI's entry. Under torchrun (``WORLD_SIZE > 1``) join the group; ``--tp 1`` alone runs the
    tensor-parallel code path on one device; neither: None (the plain path). Ranks above 0 print nothing."""
    world = world_size_from_env()
    if tp is not None and tp != world:
        if world == 1:
            raise ValueError(f"--tp {tp} needs {tp} processes: launch with "
                             f"`torchrun --nproc-per-node {tp} -m prr ...`")
        raise ValueError(f"--tp {tp} does not match the {world} processes torchrun started")
    if world == 1:
        return (None if tp is None else TensorParallel()), device
    group, dev = init_from_env(backend, device)
    if group.rank > 0:
        quiet_rank()
    return group, str(dev)


def quiet_rank() -> None:
    """Silence this (non-zero) rank's output; uncaught errors still reach the real stderr."""
    devnull = open(os.devnull, "w")  # kept open for the rest of the process
    sys.stdout = sys.stderr = devnull
    hook = sys.__excepthook__

    def excepthook(*exc):
        sys.stderr = sys.__stderr__
        hook(*exc)

    sys.excepthook = excepthook


def is_main(tp: TensorParallel | None) -> bool:
    """Whether this process prints and writes files (rank 0, or no tensor parallelism)."""
    return tp is None or tp.rank == 0


def load_model_tp(name: str, tp: TensorParallel, dtype=None, device="cpu", seed: int = 0):
    """Rank's model: a preset (random weights generated at the rank's shapes, seed offset by the rank), a
    Hugging Face directory (only this rank's slices read), or a GGUF file (read whole on the host, then sliced:
    small models). Returns ``(Llama, tokenizer or None)``; the Llama's config is the rank's."""
    from .weights import BUNDLED, bundled_gguf_path, load_gguf, load_hf_dir, random_weights

    device = torch.device(device)
    if name in MODEL_PRESETS and not os.path.isdir(name):
        full, tok = MODEL_PRESETS[name], None
        check_divides(full, tp.world)
        cfg = shard_config(full, tp.rank, tp.world)
        w = random_weights(cfg, seed=seed + 1000 * tp.rank, dtype=dtype or torch.bfloat16, device=device)
    elif os.path.isdir(name):
        full, w, tok = load_hf_dir(name, dtype or torch.float32, device,
                                   shard=lambda c, files: ShardedSafetensors(files, c, tp.rank, tp.world))
        cfg = shard_config(full, tp.rank, tp.world)
    elif name in BUNDLED or name.endswith(".gguf"):
        full, w, tok = load_gguf(bundled_gguf_path() if name in BUNDLED else name, dtype or torch.float32, "cpu")
        cfg = shard_config(full, tp.rank, tp.world)
        w = {k: t.to(device) for k, t in shard_weights(w, full, tp.rank, tp.world).items()}
    else:
        raise ValueError(f"unknown model {name!r}: expected smollm2, a .gguf file, a checkpoint directory, or "
                         f"one of {', '.join(MODEL_PRESETS)} (random weights)")
    return Llama(cfg, w, tp=replace(tp, vocab_size=full.vocab_size)), tok
