"""Generation over a batch of prompts: sampling, stop conditions, streaming, and the statistics users see.

One decode path for every device. A decode step is a device-only function (:meth:`DecodeState.body`): the
model's step, the sampler, the repetition-penalty mask, the per-sequence step counters, the block statistics
(accumulated into device tensors) and the freezing of finished sequences (their cache length is reset to 0,
so they attend one token from then on). On a GPU the first step runs eagerly (it compiles the Triton kernels:
the *warm-up*), then the body is captured in one CUDA graph (*capture*) and replayed for every later token
(*steady state*); on the CPU the same body runs eagerly and no graph is made. The host reads the sampled ids
once per token (the only sync) to stream them and decide the stop conditions (EOS, stop strings, max
tokens); the statistics are read once at the end.

Timing: ``ms_per_token`` is the steady state, from dispatching a step to reading its ids (the consumer's
own time between tokens is not counted); prefill, warm-up and capture are measured and reported apart.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from .. import _checks as check
from .sampling import SamplingConfig, sample

FINISH_REASONS = ("eos", "stop", "length")


@dataclass(frozen=True, slots=True)
class GenerationConfig:
    """``max_new_tokens`` per sequence; ``stop`` strings end a sequence (its text is cut before the first
    one); ``stop_at_eos`` ends it on the tokenizer's EOS ids."""

    max_new_tokens: int = 32
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True

    def __post_init__(self):
        check.positive_int("max_new_tokens", self.max_new_tokens)
        if not isinstance(self.sampling, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(self.sampling).__name__}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a sequence of non-empty strings, got {self.stop!r}")


@dataclass
class SequenceResult:
    """One sequence of a batch: its new tokens (the EOS or stop-string tokens included), its text (cut before
    a stop string; None without a tokenizer) and why it stopped."""

    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None  # one of FINISH_REASONS
    stop_string: str | None = None
    blocks_per_step: float | None = None  # mean |S| per (sparse layer, KV head) over its decode steps
    hit_rate: float | None = None  # PRR: dynamic hits / dynamic selected blocks over its decode steps

    def summary(self) -> dict:
        d = asdict(self)
        d["new_tokens"] = len(self.tokens)
        return d


class CacheFull(ValueError):
    """The KV cache filled up while decoding (a generation that outgrows the caches it was prefilled with);
    ``tokens`` (one prompt: its new ids; a batch: a list per sequence) and ``stats`` hold what was generated
    before the step that did not fit."""

    def __init__(self, message: str, tokens: list, stats: GenerationStats):
        super().__init__(message)
        self.tokens, self.stats = tokens, stats


@dataclass
class GenerationStats:
    attention: str
    prompt_tokens: int = 0  # all sequences
    new_tokens: int = 0  # all sequences
    batch: int = 1
    prefill_s: float = 0.0
    warmup_s: float = 0.0  # the first decode step (on a GPU: kernel compilation)
    capture_s: float = 0.0  # CUDA graph capture (0 on the CPU)
    decode_s: float = 0.0  # steady-state decode steps
    warmup_steps: int = 0
    steady_steps: int = 0
    steady_tokens: int = 0  # tokens produced by the steady-state steps (active sequences only)
    cuda_graph: bool = False
    graph_error: str | None = None  # why the step could not be captured (then it ran eagerly)
    guess: dict | None = None  # the guessed top-K's rows (DeviceStats.guess_summary)
    hit_rates: list[float] = field(default_factory=list)  # PRR: per decode step, over sparse layers
    blocks_per_step: list[float] = field(default_factory=list)  # |S| per (sequence, KV head), mean
    misses_per_step: list[float] = field(default_factory=list)

    @property
    def ms_per_token(self) -> float:
        """Steady-state milliseconds per decode step (one token per active sequence); the warm-up step when
        there was no other."""
        if self.steady_steps:
            return 1e3 * self.decode_s / self.steady_steps
        return 1e3 * self.warmup_s / self.warmup_steps if self.warmup_steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        if self.steady_steps:
            return self.steady_tokens / self.decode_s if self.decode_s > 0 else 0.0
        return self.batch / (self.ms_per_token / 1e3) if self.ms_per_token > 0 else 0.0

    @property
    def hit_rate(self) -> float | None:
        return sum(self.hit_rates) / len(self.hit_rates) if self.hit_rates else None

    def summary(self) -> dict:
        d = asdict(self)
        for k in ("hit_rates", "blocks_per_step", "misses_per_step"):
            d.pop(k)
        d.update(ms_per_token=round(self.ms_per_token, 3), tokens_per_s=round(self.tokens_per_s, 2),
                 hit_rate=None if self.hit_rate is None else round(self.hit_rate, 4),
                 blocks_per_step=round(sum(self.blocks_per_step) / len(self.blocks_per_step), 2)
                 if self.blocks_per_step else None)
        return d


@dataclass
class TokenEvent:
    """A token of sequence ``seq`` as it arrives: ``text`` is what it adds to the sequence's text (empty while
    a multi-byte character is incomplete, or past a stop string); ``finish_reason`` is set on its last token."""

    seq: int
    token: int
    text: str = ""
    finish_reason: str | None = None


class DeviceStats:
    """Block counts of the sparse layers, accumulated on the device inside the decode step (no sync):
    per sequence ``[B, 4]`` and per step ``[steps, 5]`` sums of (|S|, forced, hits, misses[, active rows])."""

    def __init__(self, batch: int, steps: int, device):
        self.per_row = torch.zeros(batch, 4, dtype=torch.int64, device=device)
        self.per_step = torch.zeros(max(steps, 1), 5, dtype=torch.int64, device=device)
        self.step = torch.zeros(1, dtype=torch.int64, device=device)
        self.layer_heads = 0  # sparse layers x KV heads, known after the first step
        # the guessed top-K's rows: how many took each path (prr.ops.guessed.PATHS), and the sum of |C(τ)| where
        # the guess held
        self.guess = torch.zeros(6, dtype=torch.int64, device=device)
        self._codes = torch.arange(5, dtype=torch.int32, device=device)
        self.guessed = False

    def add(self, step_stats: list, active: torch.Tensor) -> None:
        """Fold one step's per-layer :class:`prr.StepStats` in (rows of finished sequences count 0)."""
        if not step_stats:
            return
        b, hkv = step_stats[0].selected.shape
        self.layer_heads = len(step_stats) * hkv
        x = torch.stack([t for s in step_stats for t in (s.selected, s.forced, s.hits, s.misses)])
        x = x.view(len(step_stats), 4, b, hkv).sum((0, 3), dtype=torch.int64) * active  # [4, B]
        self.per_row.add_(x.T)
        tot = torch.cat([x.sum(1), active.sum(dtype=torch.int64)[None]])
        self.per_step.index_add_(0, self.step, tot[None])
        self.step.add_(1)
        if step_stats[0].guess is not None:
            self.guessed = True
            g = torch.stack([s.guess for s in step_stats])  # [L, 2, B, Hkv]
            on = (active != 0)[None, :, None]
            path, cand = g[:, 1], g[:, 0]
            held = ((path == 0) | (path == 4)) & on
            # one compare against every path code, one sum: the rows per path
            per_path = ((path[..., None] == self._codes) & on[..., None]).sum((0, 1, 2))
            self.guess.add_(torch.cat([per_path, (cand.long() * held).sum()[None]]))

    def guess_summary(self, top_k: int) -> dict | None:
        """The guessed top-K's rows over the run (host copy): their number, the share whose guess held
        (narrowed included), was narrowed, too high or too low, and the mean ``|C(τ)| / K`` where it held."""
        if not self.guessed:
            return None
        held, too_high, too_low, _short, narrowed, cand = self.guess.cpu().tolist()
        rows = held + too_high + too_low + narrowed  # short rows select every block: no guess
        ok = held + narrowed

        def share(x):
            return round(x / rows, 5) if rows else None

        return {"rows": rows, "held": share(ok), "narrowed": share(narrowed), "too_high": share(too_high),
                "too_low": share(too_low), "candidates_over_k": round(cand / ok / top_k, 3) if ok else None}

    def read(self, prr: bool) -> tuple[list[tuple[int, float | None]], dict[str, list[float]]]:
        """Host copies, once at the end: per sequence ``(sum of |S|, hit rate)`` and the per-step lists."""
        rows, steps = self.per_row.cpu().tolist(), self.per_step[: int(self.step)].cpu().tolist()

        def rate(sel, forced, hits):
            return (hits - forced) / (sel - forced) if sel > forced else 1.0

        per_seq = [(sel, rate(sel, forced, hits) if prr else None) for sel, forced, hits, _ in rows]
        hist = {"blocks_per_step": [], "hit_rates": [], "misses_per_step": []}
        for sel, forced, hits, miss, act in steps if self.layer_heads else []:
            if act == 0:
                continue
            denom = act * self.layer_heads
            hist["blocks_per_step"].append(sel / denom)
            hist["misses_per_step"].append(miss / denom)
            if prr:
                hist["hit_rates"].append(rate(sel, forced, hits))
        return per_seq, hist


class DecodeState:
    """The device state of one batch decode: sampled ids, counters, masks. :meth:`body` is the step."""

    def __init__(self, eng, cfg: GenerationConfig, prompts: list[list[int]] | None, vocab: int):
        dev, b = eng.model.device, eng.caches[0].batch
        self.eng, self.cfg = eng, cfg
        self.rows = torch.arange(b, dtype=torch.int64, device=dev)
        self.steps = torch.zeros(b, dtype=torch.int64, device=dev)  # tokens sampled per sequence so far
        self.active = torch.ones(b, dtype=torch.int32, device=dev)
        self.seen = None
        if cfg.sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros(b, vocab, dtype=torch.bool, device=dev)
            for j, p in enumerate(prompts or []):
                self.seen[j, torch.as_tensor(p, dtype=torch.long, device=dev)] = True
        self.stats = DeviceStats(b, cfg.max_new_tokens, dev)

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        ids = sample(logits, self.cfg.sampling, seen=self.seen, rows=self.rows, steps=self.steps)
        if self.seen is not None:
            self.seen.scatter_(1, ids[:, None], True)
        self.steps.add_(1)
        return ids

    def body(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step for ``tokens [B]``: the next ids ``[B]``. Device work only (capturable)."""
        logits = self.eng.decode_step(tokens)
        ids = self.pick(logits)
        self.stats.add(self.eng._step_stats, self.active)
        self.eng.freeze_finished(self.active)
        return ids

    def set_active(self, mask: list[bool]) -> None:
        self.active.copy_(torch.tensor(mask, dtype=torch.int32))


class Generation:
    """Iterate over :class:`TokenEvent` s as a batch decodes; afterwards ``sequences`` (one
    :class:`SequenceResult` each) and ``stats`` (:class:`GenerationStats`) hold the results.

    ``prefill`` runs first and returns the last prompt position's logits ``[B, V]`` (the engine's prefill, or
    a function that adopts another engine's); ``prompts`` are the token ids (for the repetition penalty; None
    when decoding from caches filled otherwise) and ``lens`` their lengths.
    """

    def __init__(self, eng, cfg: GenerationConfig, prompts: list[list[int]] | None, lens: list[int],
                 prefill: Callable[[], torch.Tensor]):
        self.eng, self.cfg, self.prompts, self._prefill = eng, cfg, prompts, prefill
        self.sequences = [SequenceResult(n) for n in lens]
        self.stats = GenerationStats(eng.requested, prompt_tokens=sum(lens), batch=len(lens))
        self._done = False

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._done:
            raise RuntimeError("a Generation can be iterated once")
        self._done = True
        return self._events()

    def run(self) -> Generation:
        for _ in self:
            pass
        return self

    def _events(self) -> Iterator[TokenEvent]:
        eng, cfg, st = self.eng, self.cfg, self.stats
        t0 = time.perf_counter()
        logits = self._prefill()
        st.prefill_s = time.perf_counter() - t0
        st.attention = eng.attention
        state = DecodeState(eng, cfg, self.prompts, logits.shape[-1])
        eos = set(eng.tok.eos_ids) if (eng.tok is not None and cfg.stop_at_eos) else set()
        texts = [""] * len(self.sequences)
        active = [True] * len(self.sequences)
        use_graph = eng.graphs and eng.model.device.type == "cuda"
        graph, ids, t_step, n_steps = None, state.pick(logits), None, 0
        while True:
            toks = ids.tolist()  # the one host sync per token
            if t_step is not None:  # the previous step's time: warm-up (the first) or steady state
                dt = time.perf_counter() - t_step
                if n_steps == 1:
                    st.warmup_s, st.warmup_steps = dt, 1
                else:
                    st.decode_s, st.steady_steps, st.steady_tokens = (st.decode_s + dt, st.steady_steps + 1,
                                                                      st.steady_tokens + sum(active))
            was = list(active)
            for j, tok in enumerate(toks):
                if not was[j]:
                    continue
                ev = self._accept(j, tok, texts, eos)
                active[j] = ev.finish_reason is None
                yield ev
            if not any(active):
                break
            if active != was:
                state.set_active(active)
            self._check_room(active)
            if use_graph and graph is None and n_steps == 1:
                t0 = time.perf_counter()
                try:
                    graph = eng.capture(state.body)
                    st.cuda_graph = True
                except RuntimeError as e:  # keep generating, eagerly, and say why
                    use_graph, st.graph_error = False, f"{type(e).__name__}: {e}"
                    warnings.warn(f"decode step not captured in a CUDA graph, decoding eagerly: {e}", stacklevel=2)
                st.capture_s = time.perf_counter() - t0
            t_step = time.perf_counter()
            ids = graph.run(ids) if graph is not None else state.body(ids)
            n_steps += 1
        st.new_tokens = sum(len(s.tokens) for s in self.sequences)
        per_seq, hist = state.stats.read(eng.attention == "prr" and getattr(eng, "speculate", True))
        for k, v in hist.items():
            setattr(st, k, v)
        sparse = getattr(eng, "sparse", None)
        st.guess = state.stats.guess_summary(sparse.top_k) if sparse is not None else None
        for s, (sel, hit) in zip(self.sequences, per_seq, strict=True):
            steps = len(s.tokens) - 1  # the first token came from the prefill
            if state.stats.layer_heads and steps > 0:
                s.blocks_per_step = round(sel / (steps * state.stats.layer_heads), 3)
                s.hit_rate = None if hit is None else round(hit, 4)

    def _check_room(self, active: list[bool]) -> None:
        """Checked on the host before each step (lengths are known there: no sync): on CUDA an append past the
        capacity would be masked, not refused, so a generation that outgrows its caches stops here with what
        it has."""
        cap = self.eng.caches[0].capacity
        for j, seq in enumerate(self.sequences):
            if active[j] and seq.prompt_tokens + len(seq.tokens) > cap:
                self.stats.new_tokens = sum(len(s.tokens) for s in self.sequences)
                tokens = seq.tokens if len(self.sequences) == 1 else [s.tokens for s in self.sequences]
                raise CacheFull(f"the KV cache is full ({cap} tokens: a {seq.prompt_tokens}-token prompt and "
                                f"{len(seq.tokens)} generated tokens); the tokens generated so far are returned "
                                "with this error (CacheFull.tokens)", tokens, self.stats)

    def _accept(self, j: int, tok: int, texts: list[str], eos: set[int]) -> TokenEvent:
        """Append a token to sequence j; decide whether it ends the sequence and what text it streams
        (``texts[j]``: the text streamed so far)."""
        seq, cfg, tk = self.sequences[j], self.cfg, self.eng.tok
        seq.tokens.append(tok)
        reason, final = None, None
        full = tk.decode(seq.tokens) if tk is not None else None
        if full is not None and (cut := find_stop(full, cfg.stop)) is not None:
            reason, seq.stop_string, final = "stop", cut[1], full[:cut[0]]
        elif tok in eos:
            reason, final = "eos", full
        elif len(seq.tokens) >= cfg.max_new_tokens:
            reason, final = "length", full
        seq.finish_reason = reason
        if full is None:
            return TokenEvent(j, tok, "", reason)
        if final is None:
            # Hold back an incomplete multi-byte character, and the last (longest stop - 1) characters: they
            # may begin a stop string, and streamed text cannot be taken back.
            final = full.rstrip("\ufffd")
            final = final[:len(final) - max(map(len, cfg.stop), default=1) + 1]
        else:
            seq.text = final
        if len(final) <= len(texts[j]) or not final.startswith(texts[j]):
            return TokenEvent(j, tok, "", reason)
        delta, texts[j] = final[len(texts[j]):], final
        return TokenEvent(j, tok, delta, reason)


def find_stop(text: str, stops) -> tuple[int, str] | None:
    """The earliest stop string in ``text``: ``(position, string)``."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best
