"""Fraction of Quest metadata a threshold-pruned scorer would read, on SmolLM2 real traces."""
import sys, torch, collections
import prr.ops as ops
from prr.algo.sparse import SparseConfig
from prr.eval.locality import record_scores
from prr.model.weights import load_model

K = int(sys.argv[1]) if len(sys.argv) > 1 else 61
cfg = SparseConfig(method="quest", block_size=16, top_k=K)
orig = ops.quest_scores
SS = (4, 8, 16, 32)
stats = collections.defaultdict(lambda: [0.0, 0])
prev = {}
calls = [0]

def bound(q, lo, hi, g):
    b, hkv, n, d = lo.shape
    qg = q.view(b, hkv, g, d)
    s = torch.einsum("bhgd,bhnd->bhgn", qg.clamp(min=0), hi) + torch.einsum("bhgd,bhnd->bhgn", qg.clamp(max=0), lo)
    return s.sum(2)

def hook(q, kmin, kmax, cache, block_size, aggregate="sum", **kw):
    out = orig(q, kmin, kmax, cache, block_size, aggregate, **kw)
    s = out[0] if isinstance(out, tuple) else out
    b, hkv, n, d = kmin.shape
    g = q.shape[1] // hkv
    nblk = ops.num_blocks(cache.seq_lens, block_size)
    j = torch.arange(n)
    calls[0] += 1
    for i in range(b):
        nb = int(nblk[i])
        dyn = (j >= cfg.n_sink) & (j < nb - cfg.n_local)
        nd = int(dyn.sum())
        if nd <= K:
            continue
        sd = s[i].masked_fill(~dyn, float("-inf"))  # [H, N]
        top = sd.topk(K, -1)
        taus = {"ideal": top.values[:, -1]}
        lk = kmin.data_ptr()  # one metadata buffer per layer: the layer's previous selection
        if lk in prev:
            taus["prev_min"] = sd.gather(-1, prev[lk]).min(-1).values
        prev[lk] = top.indices
        live = j < nb
        lo = kmin[i:i+1].float().masked_fill(~live[None, None, :, None], float("inf"))
        hi = kmax[i:i+1].float().masked_fill(~live[None, None, :, None], float("-inf"))
        for S in SS:
            pad = (-n) % S
            lo2 = torch.nn.functional.pad(lo, (0, 0, 0, pad), value=float("inf")).view(1, hkv, -1, S, d).amin(3)
            hi2 = torch.nn.functional.pad(hi, (0, 0, 0, pad), value=float("-inf")).view(1, hkv, -1, S, d).amax(3)
            okg = torch.isfinite(lo2).all(-1)
            lo2 = lo2.masked_fill(~okg[..., None], 0); hi2 = hi2.masked_fill(~okg[..., None], 0)
            bd = bound(q[i:i+1].float(), lo2, hi2, g)[0]  # [H, NS]
            bd = bd.repeat_interleave(S, -1)[:, :n]
            assert (bd[:, dyn] >= sd[:, dyn] - 1e-3).all()
            for name, tau in taus.items():
                passed = (bd >= tau[:, None]) & dyn[None]
                st = stats[(name, S)]
                st[0] += float(passed.sum()) / nd
                st[1] += hkv
    return out

ops.quest_scores = hook
model, tok = load_model("smollm2", dtype=torch.float32, device="cpu")
L = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
record_scores(model, tok, L, int(sys.argv[3]) if len(sys.argv) > 3 else 40, cfg)
print("K", K, "len", L, "calls", calls[0])
for (name, S), (tot, rows) in sorted(stats.items()):
    f = tot / rows
    print(f"{name:9s} S={S:2d}  passed {f:.3f}  read {1/S + f:.3f}")
