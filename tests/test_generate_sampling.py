"""The sampler: greedy, temperature, top-k, top-p, repetition penalty, seeded draws (no model needed)."""

import pytest
import torch

from prr.model.generation import GenerationConfig
from prr.model.sampling import SamplingConfig, filter_logits, sample, uniforms


@pytest.mark.parametrize("kw, msg", [
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"top_p": 0.0}, r"top_p must lie in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must lie in \(0, 1\]"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"top_k": 2.5}, "top_k must be an integer >= 0"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ({"seed": -3}, "seed must be an integer >= 0"),
], ids=["neg-temp", "nan-temp", "top-p-0", "top-p-1.5", "top-k-neg", "top-k-float", "penalty-0", "seed-neg"])
def test_bad_sampling_settings_are_clear_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingConfig(**kw)


def test_bad_generation_settings_are_clear_errors():
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(0)
    with pytest.raises(ValueError, match="stop must be a sequence of non-empty strings"):
        GenerationConfig(4, stop=("",))
    with pytest.raises(ValueError, match="stop must be a sequence of non-empty strings"):
        GenerationConfig(4, stop="END")  # a bare string would be read as its characters


def test_greedy_is_the_argmax_and_narrow_filters_reduce_to_it():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    best = logits.argmax(-1)
    assert torch.equal(sample(logits, SamplingConfig()), best)
    steps = torch.arange(6)
    for cfg in (SamplingConfig(temperature=1.3, top_k=1, seed=4), SamplingConfig(temperature=2.0, top_p=1e-6)):
        assert torch.equal(sample(logits, cfg, steps=steps), best)


def _frequencies(logits, cfg, n=40000):
    """Draw n tokens from one row of logits (step = 0..n-1) and count them."""
    draws = sample(logits.expand(n, -1), cfg, rows=torch.zeros(n, dtype=torch.long), steps=torch.arange(n))
    return torch.bincount(draws, minlength=logits.shape[-1]).double() / n


def _close(freq, p, n=40000):
    # 5 standard deviations of a frequency estimated from n draws
    assert torch.all((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-9), (freq, p)


def test_draws_follow_the_tempered_distribution():
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.7, -2.0]])
    for t in (1.0, 0.6):
        _close(_frequencies(logits, SamplingConfig(temperature=t, seed=3)), (logits[0].double() / t).softmax(-1))


def test_top_k_and_top_p_keep_the_right_support_renormalized():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    logits = p.log().float()[None]
    top2 = torch.tensor([0.625, 0.375, 0, 0], dtype=torch.float64)  # renormalized over the 2 best
    _close(_frequencies(logits, SamplingConfig(temperature=1.0, top_k=2)), top2)
    _close(_frequencies(logits, SamplingConfig(temperature=1.0, top_p=0.7)), top2)  # 0.5 < 0.7 <= 0.8
    top3 = torch.tensor([0.5, 0.3, 0.15, 0], dtype=torch.float64) / 0.95
    _close(_frequencies(logits, SamplingConfig(temperature=1.0, top_p=0.9)), top3)
    masked = filter_logits(logits, SamplingConfig(temperature=1.0, top_k=3, top_p=0.7))
    assert torch.isfinite(masked).tolist() == [[True, True, False, False]]  # both filters apply


def test_seeded_draws_are_reproducible_and_differ_across_seeds_rows_and_steps():
    logits = torch.zeros(4, 1000)  # uniform: every draw is decided by the noise alone
    steps = torch.tensor([0, 1, 2, 3])
    a = sample(logits, SamplingConfig(temperature=1.0, seed=11), steps=steps)
    assert torch.equal(a, sample(logits, SamplingConfig(temperature=1.0, seed=11), steps=steps))
    assert not torch.equal(a, sample(logits, SamplingConfig(temperature=1.0, seed=12), steps=steps))
    assert len(set(a.tolist())) == 4  # rows/steps get their own draws
    u = uniforms(5, torch.arange(3), torch.zeros(3, dtype=torch.long), 100000)
    assert float(u.min()) > 0 and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01


def test_repetition_penalty_discourages_seen_tokens_both_signs():
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.1]])
    seen = torch.tensor([[True, False, False, False]])
    cfg = SamplingConfig(repetition_penalty=1.2)
    assert sample(logits, cfg, seen=seen).item() == 1  # 2.0 / 1.2 < 1.9
    neg = torch.tensor([[-1.0, -1.1, -5.0, -6.0]])
    assert sample(neg, cfg, seen=seen).item() == 1  # -1.0 * 1.2 < -1.1
    with pytest.raises(ValueError, match="repetition_penalty needs `seen`"):
        sample(logits, cfg)
