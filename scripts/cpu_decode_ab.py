"""Wall time per generated token on the CPU (bundled SmolLM2, ~6K-token passkey prompt, Quest budget 2048, 24 new
tokens after a shared dense prefill, PRR calibration included, best of 3), for comparing two commits the same
way: run it from each checkout, `PYTHONPATH=src python3 scripts/cpu_decode_ab.py LABEL`."""

import sys
import time

from prr.algo.sparse import SparseConfig
from prr.model import load_model
from prr.model.engine import Engine
from prr.model.prompts import passkey_prompt


def main(label: str) -> None:
    model, tok = load_model("smollm2")
    ids, _ = passkey_prompt(tok, 6000, 0.75)
    base = Engine(model, tok, attention="dense")
    res = {}
    for att in ("dsa", "prr"):
        eng = Engine(model, tok, attention=att, sparse=SparseConfig.from_budget("quest", 2048), ratio=1.0)
        times = []
        for _ in range(3):
            base.prefill(ids, 25)
            t = time.perf_counter()
            eng.generate(ids, 24, prefilled_from=base)
            times.append(time.perf_counter() - t)
        res[att] = round(min(times) * 1e3 / 24, 1)
    print(label, "wall ms per generated token (24 tokens, calibration included, best of 3):", res)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
