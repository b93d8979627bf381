import torch, prr
from prr.ops.backend import use_backend
from prr.ops.select import triton as sk
gen = torch.Generator().manual_seed(7)
for trial, n in enumerate([40, 300, 2000, 5000]):
    scores = torch.randn(2, 3, n, generator=gen) * 10.0 ** (trial - 1)
    nblk = torch.tensor([n, max(1, n // 3)], dtype=torch.int32)
    for k in (5, 100, 700):
        out = []
        for r in (0, 8, 4):
            sk.RADIX_BITS = r
            out.append(prr.select_blocks(scores.cuda(), nblk.cuda(), k, 1, 2))
        for r, o in zip((8, 4), out[1:]):
            eq = torch.equal(out[0][0], o[0]) and torch.equal(out[0][1], o[1])
            if not eq:
                print("n", n, "k", k, "radix", r, "cnt", out[0][1].tolist(), o[1].tolist(), "first idx", out[0][0][0,0,:8].tolist(), o[0][0,0,:8].tolist())
print("done")
