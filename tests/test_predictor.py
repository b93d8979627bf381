"""Holt predictor and its calibration."""

import pytest
import torch

import prr


def _trend_stream(w=64, n=96, slope=0.2, noise=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 2, n, generator=g) * 3
    rate = torch.randn(1, 2, n, generator=g) * slope
    t = torch.arange(w, dtype=torch.float32)[:, None, None, None]
    s = base + rate * t + noise * torch.randn(w, 1, 2, n, generator=g)
    return s, torch.full((w, 1), n, dtype=torch.int32)


def _replay_hit_rate(scores, nblk, params, top_k, n_sink, n_local):
    """The scalar path: HoltPredictor.predict/update step by step, hits counted with sets."""
    w, bsz, hkv, n = scores.shape
    p = prr.HoltPredictor(1, bsz, hkv, n, alpha=params[0], beta=params[1], gamma=params[2])
    hits = total = 0
    for t in range(w):
        if t > 0:
            pi, pc = prr.select_blocks(p.predict(0), nblk[t], top_k, n_sink, n_local)
            si, sc = prr.select_blocks(scores[t], nblk[t], top_k, n_sink, n_local)
            for b in range(bsz):
                forced = min(int(nblk[t, b]), n_sink + n_local)
                for h in range(hkv):
                    sset = set(si[b, h, : sc[b, h]].tolist())
                    pset = set(pi[b, h, : pc[b, h]].tolist())
                    hits += len(sset & pset) - forced
                    total += len(sset) - forced
        p.update(0, scores[t], nblk[t])
    return hits / total


@pytest.mark.parametrize("noise,max_miss_ratio", [(0.0, 0.5), (0.05, 0.75)])
def test_holt_beats_previous_step_on_a_trending_stream(noise, max_miss_ratio):
    s, n = _trend_stream(noise=noise)
    prev = _replay_hit_rate(s, n, (1.0, 0.0, 0.0), 12, 1, 1)
    holt = _replay_hit_rate(s, n, (1.0, 0.3, 1.0), 12, 1, 1)
    # The trend term extrapolates the crossings: clearly fewer misses than the previous-step predictor.
    assert (1 - holt) < max_miss_ratio * (1 - prev), (holt, prev)


def test_calibrate_returns_the_best_grid_point_of_its_data():
    s, n = _trend_stream(w=24, n=40, noise=0.3, seed=2)
    grid = {"alpha": (0.3, 0.7, 1.0), "beta": (0.0, 0.3), "gamma": (0.0, 1.0)}
    cal = prr.calibrate(s, n, top_k=6, n_sink=1, n_local=1, grid=grid)
    assert len(cal.table) == 12
    for a, b, g, rate in cal.table:
        assert rate == pytest.approx(_replay_hit_rate(s, n, (a, b, g), 6, 1, 1), abs=1e-12)
    best = max(r for *_, r in cal.table)
    assert cal.hit_rate == best and (cal.alpha, cal.beta, cal.gamma, best) in cal.table


def test_calibrate_in_place_sets_params_and_warm_state():
    s, n = _trend_stream(w=16, n=40)
    p = prr.HoltPredictor(2, 1, 2, 40)
    cal = p.calibrate(1, s, n, top_k=6, n_sink=1, n_local=1)
    assert p.params[1].tolist() == pytest.approx([cal.alpha, cal.beta, cal.gamma])
    assert p.known[1].tolist() == [40] and p.known[0].tolist() == [0]  # layer 0 untouched
    q = prr.HoltPredictor(1, 1, 2, 40, alpha=cal.alpha, beta=cal.beta, gamma=cal.gamma)
    for t in range(16):
        q.update(0, s[t], n[t])
    torch.testing.assert_close(p.predict(1), q.predict(0))


def test_new_blocks_start_at_their_first_score_and_unknown_predict_minus_inf():
    p = prr.HoltPredictor(1, 1, 1, 8, alpha=0.5)
    assert torch.all(p.predict(0) == float("-inf"))
    s1 = torch.tensor([[[1.0, 2.0, 3.0, 0, 0, 0, 0, 0]]])
    p.update(0, s1, torch.tensor([3]))
    z1 = prr.normalize_scores(s1, torch.tensor([3]))
    torch.testing.assert_close(p.predict(0)[..., :3], z1[..., :3])
    assert torch.all(p.predict(0)[..., 3:] == float("-inf"))
    s2 = torch.tensor([[[3.0, 2.0, 1.0, 5.0, 0, 0, 0, 0]]])
    p.update(0, s2, torch.tensor([4]))
    z2 = prr.normalize_scores(s2, torch.tensor([4]))
    pred = p.predict(0)
    torch.testing.assert_close(pred[..., :3], 0.5 * z2[..., :3] + 0.5 * z1[..., :3])
    torch.testing.assert_close(pred[..., 3], z2[..., 3])  # the new block: its first score, no trend


def test_normalize_scores_zscore_live_blocks_and_handles_minus_inf():
    s = torch.tensor([[[1.0, 3.0, float("-inf"), 7.0, 100.0]]])
    z = prr.normalize_scores(s, torch.tensor([4]))
    live = torch.tensor([1.0, 3.0, 7.0])
    want = (live - live.mean()) / live.std(unbiased=False)
    torch.testing.assert_close(z[0, 0, [0, 1, 3]], want)
    assert z[0, 0, 2] == z[0, 0, 0] and z[0, 0, 4] == 0
    # Scale and shift invariance: what the predictor sees does not drift with score scale.
    torch.testing.assert_close(prr.normalize_scores(s * 10 + 3, torch.tensor([4])), z)
