"""``prr serve`` with the bundled SmolLM2 on the CPU, through the official ``openai`` client: completions, chat,
streaming, continuous batching equal to each request alone, bad inputs, the API key, disconnects, metrics."""

import concurrent.futures
import time

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import prr  # noqa: E402
from prr.model.engine import Engine  # noqa: E402
from prr.model.prompts import pydoc_text  # noqa: E402
from prr.model.sampling import SamplingConfig  # noqa: E402
from prr.serve.config import ServeConfig, build_scheduler  # noqa: E402
from prr.serve.server import ServerThread, build_app  # noqa: E402

KEY = "sk-test-key"
# 6 blocks of 16 tokens (3 dynamic): prompts of 100+ tokens decode sparsely; short prompts keep the prefills cheap
SPARSE = prr.SparseConfig.from_budget("quest", 96)
SEQ_LEN, POOL = 512, 8192


def _server(smollm, attention="prr", **kw):
    model, tok = smollm
    if attention == "prr":  # speculation on (ratio "auto" decodes as DSA in a server)
        kw.setdefault("ratio", 1.5)
    cfg = ServeConfig(attention=attention, sparse=SPARSE, max_batch=kw.pop("max_batch", 16), max_seq_len=SEQ_LEN,
                      max_tokens_in_cache=kw.pop("pool", POOL), api_key=KEY, max_tokens_cap=64, **kw)
    sch = build_scheduler(model, tok, cfg)
    return ServerThread(build_app(sch, "smollm2", cfg, drain_s=5), sch)


@pytest.fixture(scope="module")
def server(smollm):
    with _server(smollm) as srv:
        yield srv


def _client(srv, key=KEY):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=120)


def _health(srv) -> dict:
    return httpx.get(srv.url + "/health").json()


def _prompts(tok, n):
    """n prompts of 21 to 152 tokens of real text (some shorter than the sparse budget, some longer)."""
    ids = tok.encode(pydoc_text())
    return [ids[3000 + 700 * j: 3000 + 700 * j + 24 + (j * 37) % 131] for j in range(n)]


def test_completion_chat_and_stream(server, smollm):
    model, tok = smollm
    c = _client(server)
    prompt = _prompts(tok, 1)[0]
    r = c.completions.create(model="smollm2", prompt=prompt, max_tokens=10, temperature=0)
    alone, _ = Engine(model, tok, attention="prr", sparse=SPARSE).generate(prompt, 10, stop_at_eos=False)
    assert r.choices[0].text == tok.decode(alone) and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 10
    # a seeded draw is the same as the engine's alone (the sampler keys on the request's seed, not its slot)
    sampled = SamplingConfig(temperature=0.9, top_p=0.95, top_k=50, seed=7)
    r = c.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0.9, top_p=0.95, seed=7,
                             extra_body={"top_k": 50})
    alone, _ = Engine(model, tok, attention="prr", sparse=SPARSE).generate(prompt, 8, sampling=sampled,
                                                                          stop_at_eos=False)
    assert r.choices[0].text == tok.decode(alone)

    def draw(j):  # the same request beside others, in whatever slot it lands: the same draw
        kw = {"temperature": 0.9, "top_p": 0.95, "seed": 7, "extra_body": {"top_k": 50}} if j == 2 else {}
        return c.completions.create(model="smollm2", prompt=prompt if j == 2 else "Hello", max_tokens=8,
                                    **kw).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        assert list(pool.map(draw, range(3)))[2] == tok.decode(alone)

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = c.chat.completions.create(model="smollm2", messages=msgs, temperature=0)
    assert r.choices[0].message.content == "The capital of France is Paris."
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.role == "assistant"
    parts = [ch.choices[0].delta.content or "" for ch in
             c.chat.completions.create(model="smollm2", messages=msgs, temperature=0, stream=True) if ch.choices]
    assert "".join(parts) == r.choices[0].message.content and len(parts) > 3

    text = "The Python language reference describes"
    whole = c.completions.create(model="smollm2", prompt=text, max_tokens=12, temperature=0, stop=[" and"])
    chunks = list(c.completions.create(model="smollm2", prompt=text, max_tokens=12, temperature=0, stop=[" and"],
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason

    listed = c.models.list().data
    assert [m.id for m in listed] == ["smollm2"]


@pytest.mark.parametrize("attention", ["dense", "dsa", "prr"])
def test_concurrent_requests_each_get_what_they_get_alone(smollm, attention):
    """16 greedy requests at once (continuous batching: they join and leave the batch at different steps) give
    each the tokens it gets alone."""
    _, tok = smollm
    prompts = _prompts(tok, 16)
    lengths = [2 + j % 4 for j in range(16)]
    with _server(smollm, attention) as srv:
        c = _client(srv)

        def ask(j):
            r = c.completions.create(model="smollm2", prompt=prompts[j], max_tokens=lengths[j], temperature=0)
            return r.choices[0].text, r.usage.completion_tokens

        alone = [ask(j) for j in range(16)]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            together = list(pool.map(ask, range(16)))
        assert together == alone
        assert [n for _, n in alone] == lengths
        assert srv.server.scheduler.peak_running > 4  # they were decoded together
        h = _health(srv)
        assert h["running"] == 0 and h["pages_in_use"] == 0


def test_prr_with_ratio_auto_serves_as_dsa(smollm):
    """One server, many contexts: no context to profile the speculation at, so ``ratio="auto"`` (the default)
    decodes PRR as serialized DSA, says why in /health, and answers as the DSA server does."""
    _, tok = smollm
    prompt = _prompts(tok, 4)[3]
    texts = {}
    for name, attention, kw in (("auto", "prr", {"ratio": "auto"}), ("dsa", "dsa", {})):
        with _server(smollm, attention, max_batch=2, **kw) as srv:
            r = _client(srv).completions.create(model="smollm2", prompt=prompt, max_tokens=6, temperature=0)
            texts[name] = r.choices[0].text
            h = _health(srv)
            runner = srv.server.scheduler.runner
            if name == "auto":
                assert runner.requested == "prr" and runner.attention == "dsa"
                assert h["attention"] == "dsa" and h["speculation"]["speculation"] == "off"
                assert "pass a ratio to speculate" in h["speculation"]["reason"]
            else:
                assert h["attention"] == "dsa" and h["speculation"] is None
    assert texts["auto"] == texts["dsa"]


BAD = [
    ("not json", b"{bad", 400),
    ("not an object", b"[1, 2]", 400),
    ("no model", {"prompt": "hi"}, 400),
    ("unknown model", {"model": "gpt-4", "prompt": "hi"}, 404),
    ("no prompt", {"model": "smollm2"}, 400),
    ("empty prompt", {"model": "smollm2", "prompt": ""}, 400),
    ("token id out of range", {"model": "smollm2", "prompt": [1, 10 ** 9]}, 400),
    ("temperature", {"model": "smollm2", "prompt": "hi", "temperature": -1}, 400),
    ("temperature type", {"model": "smollm2", "prompt": "hi", "temperature": "hot"}, 400),
    ("top_p", {"model": "smollm2", "prompt": "hi", "top_p": 1.5}, 400),
    ("max_tokens zero", {"model": "smollm2", "prompt": "hi", "max_tokens": 0}, 400),
    ("max_tokens over the cap", {"model": "smollm2", "prompt": "hi", "max_tokens": 10 ** 6}, 400),
    ("n", {"model": "smollm2", "prompt": "hi", "n": 2}, 400),
    ("logprobs", {"model": "smollm2", "prompt": "hi", "logprobs": 3}, 400),
    ("stop", {"model": "smollm2", "prompt": "hi", "stop": [1]}, 400),
    ("stream", {"model": "smollm2", "prompt": "hi", "stream": "yes"}, 400),
    ("prompt over the window", {"model": "smollm2", "prompt": [1] * SEQ_LEN}, 400),
    ("prompt + max_tokens over the window", {"model": "smollm2", "prompt": [1] * (SEQ_LEN - 10), "max_tokens": 20},
     400),
]
BAD_CHAT = [
    ("no messages", {"model": "smollm2"}, 400),
    ("messages not a list", {"model": "smollm2", "messages": "hi"}, 400),
    ("bad role", {"model": "smollm2", "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("bad content", {"model": "smollm2", "messages": [{"role": "user", "content": 3}]}, 400),
    ("image part", {"model": "smollm2", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
]


def test_bad_inputs_are_4xx_with_an_openai_error_body(server):
    h = {"Authorization": f"Bearer {KEY}"}
    for route, cases in (("/v1/completions", BAD), ("/v1/chat/completions", BAD_CHAT)):
        for name, body, status in cases:
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = httpx.post(server.url + route, headers=h, **kw)
            assert r.status_code == status, (route, name, r.text)
            err = r.json()["error"]
            assert err["message"] and err["type"], name
    r = httpx.post(server.url + "/v1/completions", headers=h, content=b"x" * (5 << 20))
    assert r.status_code == 413 and "error" in r.json()
    assert httpx.get(server.url + "/v1/nothing", headers=h).status_code == 404
    r = httpx.get(server.url + "/v1/completions", headers=h)
    assert r.status_code == 405 and "error" in r.json()
    c = _client(server)
    with pytest.raises(openai.BadRequestError, match="context"):
        c.completions.create(model="smollm2", prompt=[1] * SEQ_LEN, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-4", prompt="hi", max_tokens=4)
    assert _health(server)["status"] == "ok"  # none of it hurt the server


def test_api_key_is_required(server):
    with pytest.raises(openai.AuthenticationError):
        _client(server, "wrong-key").completions.create(model="smollm2", prompt="hi", max_tokens=2)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(server.url + "/v1/completions", json={"model": "smollm2", "prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 64, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=h, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]
        assert got[0].startswith("data: ")
        assert _health(server)["running"] == 1 and _health(server)["pages_in_use"] > 0
    deadline = time.monotonic() + 30
    while (h2 := _health(server))["running"] or h2["pages_in_use"]:
        assert time.monotonic() < deadline, h2
        time.sleep(0.05)
    r = _client(server).completions.create(model="smollm2", prompt="Once upon a time", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and _health(server)["pages_in_use"] == 0


def test_metrics_parse_as_prometheus_text(server):
    parser = pytest.importorskip("prometheus_client.parser")
    long = _prompts(server.server.scheduler.runner.tok, 4)[3]  # 135 tokens: sparse steps with dynamic blocks
    _client(server).completions.create(model="smollm2", prompt=long, max_tokens=4, temperature=0)
    fams = {f.name: f for f in parser.text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    val = {s.name: s.value for f in fams.values() for s in f.samples if not s.labels}
    assert fams["prr_time_to_first_token_seconds"].type == "histogram"
    assert fams["prr_time_per_output_token_seconds"].type == "histogram"
    assert val["prr_time_to_first_token_seconds_count"] >= 1 and val["prr_generation_tokens_total"] >= 4
    assert val["prr_requests_running"] == 0 and val["prr_requests_waiting"] == 0
    assert val["prr_cache_pages_in_use"] == 0 and val["prr_cache_pages_total"] == POOL // 16
    assert 0.0 <= val["prr_prr_hit_rate"] <= 1.0  # a prompt longer than the budget ran sparse steps
    done = [s for s in fams["prr_requests"].samples if s.labels.get("outcome") == "completed"]
    assert done and done[0].value >= 1


def test_a_full_queue_answers_429(smollm):
    """One slot, a queue of one: of four concurrent requests at least one is refused with 429, none is lost. A
    request within the window but over the whole KV cache (256 tokens here) is refused with 400."""
    with _server(smollm, "dense", max_batch=1, max_queue=1, pool=256) as srv:
        c = _client(srv)
        with pytest.raises(openai.BadRequestError, match="KV cache"):
            c.completions.create(model="smollm2", prompt=[1] * 300, max_tokens=20)

        def ask(_):
            try:
                return c.completions.create(model="smollm2", prompt="Count: one, two,", max_tokens=8, temperature=0,
                                            extra_body={"ignore_eos": True}).usage.completion_tokens
            except openai.RateLimitError:
                return 429

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            out = list(pool.map(ask, range(4)))
        assert 429 in out and 8 in out and set(out) <= {8, 429}


def test_sigterm_stops_the_server_cleanly(tmp_path):
    """``prr serve`` in a process of its own: SIGTERM lets the request in flight finish, then exits with 0."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import threading

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.path.abspath("src"),
                                                                    os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "prr", "serve", "--model", "smollm2", "--attention", "dense",
                             "--port", str(port), "--max-batch", "2", "--max-seq-len", "256",
                             "--max-tokens-in-cache", "1024", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        out = {}

        def ask():
            body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0,
                    "ignore_eos": True}
            out["r"] = httpx.post(url + "/v1/completions", json=body, timeout=60)

        t = threading.Thread(target=ask)
        t.start()
        while httpx.get(url + "/health").json()["running"] == 0 and t.is_alive():
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert proc.wait(60) == 0
        assert out["r"].status_code == 200 and out["r"].json()["usage"]["completion_tokens"] == 24
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
