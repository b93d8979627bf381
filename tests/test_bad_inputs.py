"""Every bad input the public API and the CLI reject, with the exact error each gives.

The cases live in tests/bad_inputs_cases.py and tests/bad_inputs_files.py (a table, one entry per bad input);
they are the source of docs/ERRORS.md: ``test_errors_doc_is_current`` fails when the doc differs from
:func:`render_doc` (regenerate with ``PYTHONPATH=src python tests/test_bad_inputs.py > docs/ERRORS.md``).
"""

import importlib.util
import os
import sys

import pytest
import torch

import prr
from prr import memory
from prr.model.config import ModelConfig
from prr.model.engine import CacheFull, Engine

sys.path.insert(0, os.path.dirname(__file__))
import bad_inputs_files  # noqa: F401  (registers its cases)
from bad_inputs_cases import CASES, Case, CLIError, cli, setup, tiny_model

from conftest import make_cache


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_rejected_with_its_documented_error(c: Case, tmp_path):
    # The loaders import their file libraries first; the GPU image has no gguf (CI installs the model extra).
    for lib, ids in (("gguf", ("gguf",)), ("safetensors", ("safetensors", "hf-"))):
        if any(x in c.id for x in ids) and importlib.util.find_spec(lib) is None:
            pytest.skip(f"{lib} is not installed here")
    with pytest.raises(c.exc) as ei:
        c.fn(tmp_path)
    assert str(ei.value) == c.message.format(tmp=tmp_path)


def test_cache_full_returns_the_tokens_generated_so_far():
    # The caches hold whole 16-token pages: 30 + 2 tokens fill two pages exactly.
    model, prompt = tiny_model(), list(range(1, 31))
    base = Engine(model)
    base.prefill(prompt, 2)
    with pytest.raises(CacheFull) as ei:
        Engine(model).generate(prompt, 10, prefilled_from=base)
    full, _ = Engine(model).generate(prompt, 3)  # its own prefill has room for them
    assert ei.value.tokens == full and ei.value.stats.new_tokens == 3


def test_validation_also_guards_the_kernel_path():
    """The Triton wrappers check values before a launch (here on the CPU through the interpreter's dispatch)."""
    cache, q, idx, cnt = setup()
    cache, q = make_cache([100, 50], hkv=2, d=64, capacity=128, dtype=torch.float32), q.float()
    idx[0, 0, 0] = 64
    with prr.ops.backend.use_backend("triton"), pytest.raises(ValueError, match=r"indices\[0, 0, 0\] = 64"):
        prr.sparse_decode(q, cache, idx, cnt, 16)


def test_generate_on_a_real_24gb_host_refuses_llama_8b_in_fp32():
    """The issue's command, unpatched: where the fp32 weights (31.9 GiB) cannot fit it must refuse, not be killed."""
    free, _ = memory.free_bytes("cpu")
    if free is None or free * memory.HEADROOM >= memory.weight_bytes(ModelConfig.from_name("llama-3.1-8b"),
                                                                      torch.float32):
        pytest.skip("this host has room for the weights: the refusal is tested with a pinned figure above")
    with pytest.raises(CLIError, match="not enough memory for random weights of 8.03B parameters"):
        cli("generate", "--model", "llama-3.1-8b", "--device", "cpu", "--prompt", "hi")


def render_doc() -> str:
    lines = [
        "# Bad inputs and the errors they give",
        "",
        "Every row is a test: `tests/test_bad_inputs.py::test_bad_input_is_rejected_with_its_documented_error[<id>]`",
        "runs the call and requires exactly this error text (`{tmp}` is a temporary directory). This file is",
        "generated from the tables in `tests/bad_inputs_cases.py` and `tests/bad_inputs_files.py`",
        "(`PYTHONPATH=src python tests/test_bad_inputs.py > docs/ERRORS.md`) and a test fails when it is out of",
        "date. The CLI prints `prr <command>: error: <text>` and exits with status 2.",
        "",
        "Value checks (index ranges, duplicates, NaN/inf, lengths) read tensor data: they always run on CPU tensors;",
        "on CUDA they would cost a host sync inside the decode step, so there they run only in debug mode",
        "(`prr.set_debug(True)` or `PRR_DEBUG=1`) and never during CUDA-graph capture. Shape, dtype and device checks",
        "run everywhere.",
        "",
        f"{len(CASES)} cases.",
        "",
        "| id | bad input | rejected by | exception | error text |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in CASES:
        msg = c.message.replace("|", "\\|")
        lines.append(f"| `{c.id}` | {c.what} | `{c.api}` | {c.exc.__name__} | `{msg}` |")
    lines += [""]
    return "\n".join(lines)


def test_errors_doc_is_current():
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "ERRORS.md")
    with open(path, encoding="utf-8") as f:
        assert f.read() == render_doc(), "docs/ERRORS.md is stale: regenerate it (see this module's docstring)"
    assert len(CASES) >= 25


if __name__ == "__main__":
    sys.stdout.write(render_doc())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_checks_values_in_debug_mode_only():
    """On CUDA the decode path reads no values on the host: a bad block id passes the wrappers (the kernels must
    mask it: the output stays finite), and is refused in debug mode."""
    cache, q, idx, cnt = setup()
    cache = prr.KVCache(cache.k.float().cuda(), cache.v.float().cuda(), cache.page_table.cuda(),
                        cache.seq_lens.cuda())
    q, idx, cnt = q.float().cuda(), idx.clone(), cnt.cuda()
    idx[1, 0, 0] = 999
    idx = idx.cuda()
    prr.set_debug(True)
    try:
        with pytest.raises(ValueError, match=r"indices\[1, 0, 0\] = 999 is out of range"):
            prr.sparse_decode(q, cache, idx, cnt, 16)
    finally:
        prr.set_debug(False)
    o, _ = prr.sparse_decode(q, cache, idx, cnt, 16)
    assert torch.isfinite(o).all()
