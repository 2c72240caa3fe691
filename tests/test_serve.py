"""Tests of `mixdepth serve` (issue 29): the engine alone (row reuse, a failing request, a full
queue, shutdown), and the OpenAI API on a uvicorn server on a free port of 127.0.0.1 driven by the
official `openai` client and httpx (completions and chat, streamed and not, stop strings, seeds,
usage, greedy text equal to `generate_text`, 4xx JSON bodies, the API key, 200 streams with
disconnects, the README's client example), then the page in headless Chromium, SIGTERM on the real
command and `mixdepth bench serve` on tiny settings (slow).

The served model is the `debug` preset with random weights, calibrated to route half of the tokens
of a random stream, with a small byte-level BPE tokenizer that has a ChatML chat template.
Every test name holds "serve", "server", "engine" or "openai" (`pytest -k`).
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mixdepth import ModelConfig, MoDTransformer
from mixdepth.generate import generate_text

pytest.importorskip("fastapi")
pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from mixdepth.serve.api import create_app  # noqa: E402
from mixdepth.serve.engine import Engine, EngineStopped, QueueFull, SamplingParams  # noqa: E402

CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PROMPTS = ["hello world", "The capital of France is", "What is it?"]


# ---- fixtures ------------------------------------------------------------------------------------
def make_tokenizer(folder: Path):
    """A byte-level BPE with `<s>`, `<|im_start|>`, `<|im_end|>` (the eos) and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mixdepth.data import HFTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the capital of France is Paris. What is it? " * 20], trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": CHATML}))
    return HFTokenizer.from_folder(folder)


def make_model(vocab_size: int, eos: int) -> MoDTransformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("debug", vocab_size=vocab_size, init_std=0.1, routing={"capacity": 0.5})
    model = MoDTransformer(cfg).eval()
    with torch.no_grad():
        model.calibrate_causal(torch.randint(0, vocab_size, (4, 96), generator=torch.Generator().manual_seed(1)), 0.5)
        model.lm_head.weight[eos] = 0  # a random model says eos rarely: the length tests stay about length
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A uvicorn server in a thread of this process, on a free port of 127.0.0.1."""

    def __init__(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
        self.base = f"http://127.0.0.1:{self.server.config.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("serve") / "tok")


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok.vocab_size, tok.stop_ids[0])


@pytest.fixture(scope="module")
def served(model, tok):
    engine = Engine(model, tok, max_batch=8)
    server = Server(create_app(engine, "tiny", max_body_bytes=4096))
    yield server, engine
    server.close()
    assert not engine.alive  # the app's lifespan stopped the engine


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].base + "/v1", api_key="none", max_retries=0, timeout=60)


def wait_idle(engine: Engine, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if (s["running"], s["waiting"]) == (0, 0) or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


# ---- the engine alone ----------------------------------------------------------------------------
def run_engine(engine: Engine, prompts, params, timeout: float = 60.0):
    """Submit every prompt, wait for all; returns (requests, their texts)."""
    texts: dict[int, list[str]] = {}
    reqs = [engine.submit(p, params, lambda ev, i=i: texts.setdefault(i, []).append(ev.text))
            for i, p in enumerate(prompts)]
    deadline = time.monotonic() + timeout
    while not all(r.done for r in reqs):
        assert time.monotonic() < deadline, "the engine did not finish"
        time.sleep(0.01)
    return reqs, ["".join(texts.get(i, [])) for i in range(len(reqs))]


def test_engine_reuses_its_rows_and_matches_generate(model, tok):
    engine = Engine(model, tok, max_batch=2).start()
    try:
        rows_seen = set()
        prompts = [tok.encode(p) for p in PROMPTS * 2]
        allocated = engine.cache.bytes_allocated()
        orig_release = engine._release

        def release(row, **kw):
            rows_seen.add(row)
            return orig_release(row, **kw)

        engine._release = release
        reqs, texts = run_engine(engine, prompts, SamplingParams(max_tokens=10, temperature=0))
        assert rows_seen == {0, 1}  # six requests through two rows
        assert all(r.finish_reason == "length" and len(r.out_ids) == 10 for r in reqs)
        for p, text in zip(PROMPTS * 2, texts):
            assert text == generate_text(model, tok, p, max_new_tokens=10, temperature=0)[0][0]
        s = wait_idle(engine)
        assert sorted(engine.free_rows) == [0, 1] and not engine.running
        assert s["kv_bytes_in_use"] == 0 and engine.cache.bytes_in_use() == 0
        assert engine.cache.batch_size == 2 and engine.cache.bytes_allocated() == allocated
    finally:
        engine.shutdown()


def test_engine_failing_request_fails_alone(model, tok):
    engine = Engine(model, tok, max_batch=4).start()
    try:
        good: list = []

        def boom(ev):
            raise RuntimeError("the client's queue is gone")

        bad = engine.submit(tok.encode("hello world"), SamplingParams(max_tokens=20, temperature=0), boom)
        ok = engine.submit(tok.encode("hello world"), SamplingParams(max_tokens=20, temperature=0), good.append)
        deadline = time.monotonic() + 60
        while not (bad.done and ok.done):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert bad.finish_reason == "abort" and len(bad.out_ids) < 20  # dropped at its first token
        assert ok.finish_reason == "length" and len(ok.out_ids) == 20
        assert "".join(e.text for e in good) == generate_text(model, tok, "hello world", max_new_tokens=20,
                                                              temperature=0)[0][0]
        # a failure inside the model step of one request's prefill fails that request only
        orig = engine._prefill_batch

        def prefill_batch(reqs):
            if any(r.params.seed == 666 for r in reqs):
                raise RuntimeError("poisoned prompt")
            return orig(reqs)

        engine._prefill_batch = prefill_batch
        reqs = [engine.submit(tok.encode(p), SamplingParams(max_tokens=5, temperature=0.5, seed=s), lambda ev: None)
                for p, s in [("hello", 1), ("world", 666), ("What", 2)]]
        while not all(r.done for r in reqs):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert [r.error is not None for r in reqs] == [False, True, False]
        assert "poisoned prompt" in reqs[1].error and engine.alive
        assert wait_idle(engine)["running"] == 0 and sorted(engine.free_rows) == [0, 1, 2, 3]
    finally:
        engine.shutdown()


def test_engine_queue_full_and_shutdown(model, tok):
    engine = Engine(model, tok, max_batch=1, max_waiting=2)  # not started: nothing leaves the queue
    p = SamplingParams(max_tokens=4)
    events: list = []
    for _ in range(3):  # one for the free row, two waiting for a row
        engine.submit([5, 6], p, events.append)
    with pytest.raises(QueueFull, match="2 requests are waiting for a row"):
        engine.submit([5, 6], p, events.append)
    with pytest.raises(ValueError, match="maximum context length is 128"):
        engine.submit([5] * 100, SamplingParams(max_tokens=29), events.append)
    engine.begin_shutdown()
    assert not engine.stats()["accepting"]  # /health answers 503 from here
    engine.shutdown(timeout=5)  # the waiting ones end with an error
    assert not engine.alive and [e.error for e in events] == ["the server is shutting down"] * 3
    with pytest.raises(EngineStopped):
        engine.submit([5, 6], p, events.append)


def test_engine_shutdown_ends_running_requests(model, tok):
    engine = Engine(model, tok, max_batch=2).start()
    events: list = []
    req = engine.submit(tok.encode("hello"), SamplingParams(max_tokens=120, temperature=0), events.append)
    while not req.out_ids:
        time.sleep(0.001)
    t0 = time.monotonic()
    engine.shutdown(timeout=0)  # no time to finish: the running request is ended
    assert time.monotonic() - t0 < 5 and not engine.alive
    assert req.finish_reason == "abort" and events[-1].finish_reason == "abort" and len(req.out_ids) < 120
    assert engine.cache.bytes_in_use() == 0


# ---- the OpenAI API ------------------------------------------------------------------------------
def test_openai_completions_streamed_and_not_with_usage(client, tok, model):
    r = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0)
    text = r.choices[0].text
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length" and text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tok.encode(PROMPTS[1])), 12)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    extra = r.model_extra["mixdepth"]  # routing statistics beside the standard fields
    assert len(extra["routed_layers_per_token"]) == 12 and 0 <= extra["routed_fraction"] <= 1
    assert all(0 <= n <= len(model.routed_layers) for n in extra["routed_layers_per_token"])
    # greedy text equals the library's generation for the same prompt
    assert text == generate_text(model, tok, PROMPTS[1], max_new_tokens=12, temperature=0)[0][0]
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert sum(len(c.model_extra["mixdepth"]["routed_layers"]) for c in chunks if c.choices) == 12
    # token ids as the prompt
    ids = tok.encode(PROMPTS[1])
    assert client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0).choices[0].text == text


def test_openai_chat_streamed_and_not(client, tok, model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    msg = r.choices[0].message
    assert msg.role == "assistant" and r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(tok.chat_ids(messages))
    want, res = generate_text(model, tok, messages[0]["content"], chat=True, max_new_tokens=10, temperature=0)
    assert msg.content == want[0] and r.usage.completion_tokens == len(res.tokens[0])
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    # max_completion_tokens is the newer name of max_tokens
    r2 = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=3, temperature=0)
    assert r2.usage.completion_tokens <= 3


def test_openai_stop_strings(client):
    full = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0).choices[0].text
    stop = full[6:9]
    cut = full.index(stop)
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop, "§§"])
    assert r.choices[0].text == full[:cut] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 24
    parts = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=stop,
                                      stream=True)
    assert "".join(c.choices[0].text for c in parts if c.choices) == full[:cut]


def test_openai_same_seed_same_text_whatever_the_batch(client, served):
    def ask(seed, prompt=PROMPTS[2]):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=1.0, top_p=0.95,
                                         seed=seed).choices[0].text

    alone = ask(7)
    assert ask(7) == alone
    assert ask(8) != alone or ask(9) != alone
    # the same request again among others decoding beside it
    results: dict = {}
    def run(i):
        results[i] = ask(7 if i == 2 else 100 + i, PROMPTS[i % 3])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results[2] == alone


def test_openai_models_health_and_metrics(client, served):
    server, engine = served
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.base + "/health").json() == {"status": "ok"}
    client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0)
    m = httpx.get(server.base + "/metrics").text
    for name in ("mixdepth_requests_running 0.0", "mixdepth_requests_waiting 0.0", "mixdepth_generated_tokens_total",
                 "mixdepth_tokens_per_second", 'mixdepth_routed_fraction{layer="1"}', "mixdepth_kv_bytes_in_use",
                 "mixdepth_kv_bytes_dense", 'mixdepth_requests_finished_total{reason="length"}'):
        assert name in m, name


BAD_BODIES = [
    ("missing prompt", {"model": "tiny"}, 400, "prompt"),
    ("missing model", {"prompt": "x"}, 400, "model"),
    ("max_tokens a string", {"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("max_tokens as text digits", {"model": "tiny", "prompt": "x", "max_tokens": "12"}, 400, "max_tokens"),
    ("temperature a string", {"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("prompt a number", {"model": "tiny", "prompt": 5}, 400, "prompt"),
    ("max_tokens beyond the context", {"model": "tiny", "prompt": "x", "max_tokens": 1000}, 400, "max_tokens"),
    ("unknown model", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("n > 1", {"model": "tiny", "prompt": "x", "n": 2}, 400, "n"),
    ("logprobs", {"model": "tiny", "prompt": "x", "logprobs": 1}, 400, "logprobs"),
    ("unknown field", {"model": "tiny", "prompt": "x", "frobnicate": True}, 400, "frobnicate"),
    ("fraction out of range", {"model": "tiny", "prompt": "x", "mixdepth": {"fraction": 1.5}}, 400,
     "mixdepth.fraction"),
    ("token id outside the vocabulary", {"model": "tiny", "prompt": [1, 99999]}, 400, "prompt"),
    ("seed beyond 64 bits", {"model": "tiny", "prompt": "x", "seed": 2**64}, 400, "seed"),
    ("stream_options without stream", {"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}},
     400, "stream_options"),
    ("oversized body", {"model": "tiny", "prompt": "x" * 5000}, 413, None),
]


@pytest.mark.parametrize("case,body,status,param", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_server_refuses_bad_bodies_with_openai_errors(served, case, body, status, param):
    r = httpx.post(served[0].base + "/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_server_refuses_bad_chat_and_json(served):
    base = served[0].base
    for body, param in [({"model": "tiny"}, "messages"), ({"model": "tiny", "messages": []}, "messages"),
                        ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
                        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "tools")]:
        r = httpx.post(base + "/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    for content in (b"{not json", b"", b"[1, 2]"):
        r = httpx.post(base + "/v1/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"] == "the body is not a JSON object", r.text
        assert r.json()["error"]["param"] is None  # no field is to blame
    r = httpx.get(base + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_openai_errors_raise_in_the_client(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="tiny", prompt="x", max_tokens=10_000)


def test_engine_max_waiting_counts_only_requests_that_wait_for_a_row(model, tok):
    """--max-waiting 0 means no queue, not no service: requests that free rows take are accepted."""
    engine = Engine(model, tok, max_batch=2, max_waiting=0)  # not started: nothing leaves the queue
    for _ in range(2):
        engine.submit([5, 6], SamplingParams(max_tokens=4), lambda ev: None)
    with pytest.raises(QueueFull, match="0 requests are waiting for a row"):
        engine.submit([5, 6], SamplingParams(max_tokens=4), lambda ev: None)


def test_server_api_key_and_full_queue(model, tok):
    engine = Engine(model, tok, max_batch=1, max_waiting=0)  # no queue: a request finding the row busy gets 429
    decode = engine._decode

    def slow_decode():
        time.sleep(0.02)
        decode()

    engine._decode = slow_decode
    server = Server(create_app(engine, "tiny", api_key="sesame"))
    try:
        r = httpx.post(server.base + "/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        for path, body in [("/v1/completions", {"model": "tiny"}), ("/v1/chat/completions", {"messages": 5})]:
            r = httpx.post(server.base + path, json=body)  # no key: 401 before the body is looked at
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        r = httpx.get(server.base + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert httpx.get(server.base + "/health").status_code == 200  # open, as /metrics and the page
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", max_retries=0).models.list()
        c = openai.OpenAI(base_url=server.base + "/v1", api_key="sesame", max_retries=0)
        assert c.models.list().data[0].id == "tiny"
        busy = engine.submit(tok.encode("hello"), SamplingParams(max_tokens=110), lambda ev: None)
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model="tiny", prompt="x", max_tokens=2)
        engine.cancel(busy)
        assert wait_idle(engine)["running"] == 0
        assert c.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2
    finally:
        server.close()


def test_server_200_streams_with_disconnects_leave_nothing_behind(served, tok):
    server, engine = served
    wait_idle(engine)
    allocated = engine.cache.bytes_allocated()
    rng = random.Random(0)
    cut_after = [rng.choice([None, 1, 2, 5]) for _ in range(200)]

    async def one(i, client):
        body = {"model": "tiny", "prompt": PROMPTS[i % 3], "max_tokens": 12, "temperature": 0.8, "seed": i,
                "stream": True}
        n = 0
        async with client.stream("POST", server.base + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    n += 1
                    if cut_after[i] is not None and n >= cut_after[i]:
                        return "cut"  # leaving the block closes the connection mid-stream
        return "whole"

    async def main():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(i, client) for i in range(200))), 120)

    outcomes = asyncio.run(main())
    assert outcomes.count("cut") > 50 and outcomes.count("whole") > 20
    s = wait_idle(engine)
    assert (s["running"], s["waiting"]) == (0, 0)
    assert sorted(engine.free_rows) == list(range(engine.max_batch)) and not engine.running
    assert engine.cache.bytes_in_use() == 0 and engine.cache.bytes_allocated() == allocated  # no pool growth
    assert s["finished"].get("abort", 0) > 0  # the cut streams were cancelled, not run to their end


def test_server_dial_holds_per_request_on_text_unlike_the_calibration_text(served, client, monkeypatch):
    """The model was calibrated on uniform random ids; these prompts repeat a few ids, where the
    calibrated threshold routes far from what is asked. Held requests stay within 0.05 per layer."""
    server, engine = served
    seen = []
    orig = engine.cache.__class__.set_fraction

    def spy(cache, row, fraction, rule=None):
        seen.append((fraction, rule))
        return orig(cache, row, fraction, rule)

    monkeypatch.setattr(engine.cache.__class__, "set_fraction", spy)
    prompt = [7, 8, 9, 7, 8, 9, 10] * 6
    drift = 0.0
    for f in (0.25, 0.75):
        held = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0,
                                         extra_body={"mixdepth": {"fraction": f, "fraction_rule": "hold"}})
        extra = held.model_extra["mixdepth"]
        assert extra["fraction"] == f and extra["fraction_rule"] == "hold"
        for lid, got in extra["routed_fraction_per_layer"].items():
            assert abs(got - f) <= 0.05, (f, lid, got)
        by_threshold = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0,
                                                 extra_body={"mixdepth": {"fraction": f}})  # the default rule
        assert by_threshold.model_extra["mixdepth"]["fraction_rule"] == "threshold"
        drift = max(drift, *(abs(v - f) for v in by_threshold.model_extra["mixdepth"]["routed_fraction_per_layer"]
                             .values()))
    assert drift > 0.05, drift  # what holding fixes: the calibrated threshold does not transfer here
    assert (0.25, "hold") in seen and (0.25, "threshold") in seen
    bad = httpx.post(server.base + "/v1/completions", json={"model": "tiny", "prompt": "x", "mixdepth": {
        "fraction": 0.5, "fraction_rule": "nearest"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("mixdepth")


def test_server_refuses_a_threshold_fraction_on_an_uncalibrated_model(tok):
    model = MoDTransformer(ModelConfig.from_name("debug", vocab_size=tok.vocab_size, routing={"capacity": 0.5}))
    engine = Engine(model.eval(), tok, max_batch=2)
    server = Server(create_app(engine, "raw"))
    try:
        r = httpx.post(server.base + "/v1/completions", json={"model": "raw", "prompt": "hello", "max_tokens": 4,
                                                              "mixdepth": {"fraction": 0.5}})
        assert r.status_code == 400 and "never calibrated" in r.json()["error"]["message"]
        r = httpx.post(server.base + "/v1/completions", json={"model": "raw", "prompt": "hello", "max_tokens": 4,
                                                              "mixdepth": {"fraction": 0.5, "fraction_rule": "hold"}})
        assert r.status_code == 200, r.text
        plain = httpx.post(server.base + "/v1/completions", json={"model": "raw", "prompt": "hello", "max_tokens": 4})
        assert plain.json()["mixdepth"]["routed_fraction"] == 1.0  # never calibrated: every token, every block
    finally:
        server.close()


# ---- the real command (slow) ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model, tok):
    from mixdepth.checkpoint import save_checkpoint

    return save_checkpoint(tmp_path_factory.mktemp("serve") / "ck", model, tokenizer=tok)


def start_command(ckpt: Path, *args: str):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mixdepth", "serve", str(ckpt), "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mixdepth serve did not start: {proc.stdout.read()[-2000:]}")
        time.sleep(0.2)


@pytest.mark.slow
def test_serve_command_stops_on_sigterm(checkpoint):
    proc, base = start_command(checkpoint, "--shutdown-timeout", "2")
    try:
        name = httpx.get(base + "/v1/models").json()["data"][0]["id"]
        assert name == checkpoint.name
        lines: list[str] = []

        def stream():
            body = {"model": name, "prompt": "hello", "max_tokens": 100, "temperature": 0, "stream": True}
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30) as r:
                lines.extend(line for line in r.iter_lines() if line)

        t = threading.Thread(target=stream)
        t.start()
        deadline = time.monotonic() + 30
        while not lines and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once it has shut down, so the exit status is SIGTERM's
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM) and time.monotonic() - t0 < 10
        t.join(15)
        assert lines and lines[-1] == "data: [DONE]"  # the running stream ended cleanly (finished or aborted)
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- the page in a real browser (slow) -------------------------------------------------------------
def find_chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: no
    websocket library needed): JSON messages separated by NUL bytes, on the browser's fds 3 and 4."""

    def __init__(self, exe: str, tmp: Path) -> None:
        to_r, to_w = os.pipe()  # we write commands, the browser reads them on fd 3
        from_r, from_w = os.pipe()  # the browser writes on fd 4
        # move the browser's ends above 4 first, so that placing them on 3 and 4 cannot clobber each other
        hi_r, hi_w = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)

        def place():
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--remote-debugging-pipe", f"--user-data-dir={tmp / 'profile'}", "--window-size=1100,800", "about:blank"],
            pass_fds=(3, 4), preexec_fn=place, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in (to_r, from_w, hi_r, hi_w):
            os.close(fd)
        self.w, self.r = os.fdopen(to_w, "wb", buffering=0), os.fdopen(from_r, "rb", buffering=0)
        self.buf, self.next_id, self.session = b"", 0, None

    def send(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if self.session is not None and not method.startswith("Target."):
            msg["sessionId"] = self.session
        self.w.write(json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self.buf:
                assert time.monotonic() < deadline, f"no answer to {method}"
                chunk = self.r.read(65536)
                assert chunk, "the browser closed its pipe"
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": url})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def eval(self, js: str):
        return self.send("Runtime.evaluate", {"expression": js, "returnByValue": True})["result"].get("value")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.mark.slow
def test_serve_page_in_headless_chromium(served, client, tmp_path):
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium here: install Debian's chromium (apt-get install -y chromium), as .ci/run does")
    server, engine = served
    prompt = PROMPTS[1]
    want = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    browser = Chromium(exe, tmp_path)
    try:
        browser.open(server.base + "/")
        deadline = time.monotonic() + 60
        while browser.eval("document.getElementById('model') && document.getElementById('model').textContent") \
                != "tiny":
            assert time.monotonic() < deadline, "the page did not load the model list"
            time.sleep(0.1)
        # type the prompt, set the form, press Generate, as a user would
        browser.eval(f"""document.getElementById('prompt').value = {json.dumps(prompt)};
                         document.getElementById('max-tokens').value = '12';
                         document.getElementById('temperature').value = '0';
                         document.getElementById('go').click();""")
        while not str(browser.eval("document.getElementById('status').textContent")).startswith(("done", "error")):
            assert time.monotonic() < deadline, "the answer did not finish streaming"
            time.sleep(0.1)
        assert browser.eval("document.getElementById('status').textContent") == "done (length)"
        spans = browser.eval("""Array.from(document.querySelectorAll('#out span.tok')).map(
                                  s => [s.textContent, s.dataset.routed, s.style.background])""")
        assert "".join(s[0] for s in spans) == want  # the rendered tokens are the model's answer
        counts = [int(n) for s in spans for n in s[1].split(",") if n]
        assert len(counts) == 12 and all(0 <= n <= len(engine.routed_layer_ids) for n in counts)
        assert all(s[2].startswith("rgb") for s in spans)  # each token coloured
        frac = float(browser.eval("document.getElementById('routed-fraction').textContent"))
        assert frac == pytest.approx(sum(counts) / (12 * len(engine.routed_layer_ids)), abs=1e-3)
        assert float(browser.eval("document.getElementById('tokens-per-s').textContent")) > 0
        shot = browser.send("Page.captureScreenshot", {"format": "png"})["data"]
        (tmp_path / "page.png").write_bytes(base64.b64decode(shot))
        assert (tmp_path / "page.png").stat().st_size > 1000
    finally:
        browser.close()


@pytest.mark.slow
def test_serve_bench_runs_both_servers_and_writes_table_and_curve(tmp_path, capsys):
    from mixdepth.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "serve", "--preset", "debug", "--concurrency", "1,2", "--requests", "2", "--new-tokens", "4",
                 "--prompt-len", "8", "--out", str(out)]) == 0
    recs = json.loads((out / "bench-serve.json").read_text())["records"]
    assert [(r["concurrency"], r["model"]) for r in recs] == [(1, "dense"), (1, "mod"), (2, "dense"), (2, "mod")]
    assert all(r["requests"] == 2 and r["tokens"] == 8 and r["tok_s"] > 0 for r in recs)
    assert all(r["ttft_p50_ms"] > 0 and r["itl_p99_ms"] >= r["itl_p50_ms"] > 0 for r in recs)
    table = (out / "bench-serve.md").read_text()
    assert table.count("\n| ") == 4 and "MoD/dense" in table and table in capsys.readouterr().out
    assert (out / "bench-serve.png").stat().st_size > 1000
    assert not list(out.glob("serve-*.log")) or all("Traceback" not in p.read_text() for p in out.glob("serve-*.log"))


def test_openai_readme_example_runs_against_the_server(served, capsys):
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = next(b for b in re.findall(r"```py\n(.*?)```", readme, flags=re.S) if "OpenAI(base_url" in b)
    exec(compile(code.replace("http://127.0.0.1:8000", served[0].base), "README.md", "exec"), {})
    assert "prompt_tokens" in capsys.readouterr().out


def test_engine_long_prompts_prefill_chunk_by_chunk_between_decode_steps(model, tok):
    engine = Engine(model, tok, max_batch=3, chunk_size=4).start()
    try:
        steps: list[str] = []
        for name in ("_decode", "_prefill_long_chunk", "_prefill"):
            orig = getattr(engine, name)
            setattr(engine, name, lambda *a, _o=orig, _n=name, **k: (steps.append(_n), _o(*a, **k))[1])
        long_prompt = "hello world, the capital of France is Paris. What is it? hello world"
        prompts = [PROMPTS[0], long_prompt, PROMPTS[1], long_prompt]
        assert len(tok.encode(long_prompt)) > 3 * 4
        reqs, texts = run_engine(engine, [tok.encode(p) for p in prompts], SamplingParams(max_tokens=12, temperature=0))
        for p, text in zip(prompts, texts):
            assert text == generate_text(model, tok, p, max_new_tokens=12, temperature=0, chunk_size=4)[0][0]
        # the long prompts went chunk by chunk, and rows that were decoding got a step between chunks
        assert steps.count("_prefill_long_chunk") >= 2 * 3
        between = [steps[i + 1] for i, s in enumerate(steps[:-1]) if s == "_prefill_long_chunk"]
        assert "_decode" in between
        assert all(r.finish_reason == "length" for r in reqs)
        assert wait_idle(engine)["running"] == 0 and engine.cache.bytes_in_use() == 0 and engine._long is None
    finally:
        engine.shutdown()


def test_server_frees_the_row_of_a_whole_response_whose_client_left_while_tokens_flow(model, tok):
    """A non-streamed request's client that goes away is noticed even while tokens keep coming."""
    engine = Engine(model, tok, max_batch=2)
    decode = engine._decode

    def slow_decode():  # a token every 20 ms: always sooner than any polling interval
        time.sleep(0.02)
        decode()

    engine._decode = slow_decode
    server = Server(create_app(engine, "tiny"))
    try:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(server.base + "/v1/completions", timeout=0.6,
                       json={"model": "tiny", "prompt": "hello", "max_tokens": 110, "temperature": 0})
        s = wait_idle(engine, timeout=10)
        assert s["finished"] == {"abort": 1} and s["generated_tokens"] < 80, s
    finally:
        server.close()


def test_server_answers_503_to_the_waiting_requests_it_ends_on_shutdown(model, tok):
    """A request still waiting for a row when the server begins to stop never started: 503 (retry
    elsewhere), as a new request then gets, not a 500."""
    engine = Engine(model, tok, max_batch=1)
    decode = engine._decode

    def slow_decode():
        time.sleep(0.02)
        decode()

    engine._decode = slow_decode
    server = Server(create_app(engine, "tiny"))
    answers: dict = {}

    def ask(name, stream):
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 110, "temperature": 0, "stream": stream}
        r = httpx.post(server.base + "/v1/completions", json=body, timeout=30)
        answers[name] = (r.status_code, r.text)

    def wait_for(what, condition):
        deadline = time.monotonic() + 20
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.01)

    try:
        threads = [threading.Thread(target=ask, args=("running", False))]
        threads[0].start()
        wait_for("the first request did not start", lambda: engine.stats()["running"] == 1)
        threads += [threading.Thread(target=ask, args=(name, name == "streamed")) for name in ("whole", "streamed")]
        for t in threads[1:]:
            t.start()
        wait_for("the others did not queue behind it", lambda: engine.stats()["waiting"] == 2)
        engine.begin_shutdown()
        for t in threads:
            t.join(30)
        assert answers["running"][0] == 200  # the running one finishes
        status, text = answers["whole"]
        assert status == 503 and json.loads(text)["error"]["code"] == "service_unavailable", text
        status, text = answers["streamed"]  # its 200 went out already: the error is the last chunk
        error = json.loads(text.split("data: ")[1])["error"]
        assert status == 200 and error["code"] == "service_unavailable" and text.endswith("data: [DONE]\n\n")
    finally:
        server.close()


def test_engine_forgets_old_token_times_without_a_metrics_scrape(model, tok, monkeypatch):
    """The tokens/s record keeps the last RATE_WINDOW_S seconds only, also when no one reads stats()
    (a server never scraped must not grow with every token it makes)."""
    import mixdepth.serve.engine as engine_module

    monkeypatch.setattr(engine_module, "RATE_WINDOW_S", 0.0, raising=False)
    engine = Engine(model, tok, max_batch=2).start()
    try:
        run_engine(engine, [tok.encode(p) for p in PROMPTS], SamplingParams(max_tokens=20, temperature=0))
        assert engine._generated == 60 and len(engine._recent) <= 1
    finally:
        engine.shutdown()


def test_engine_step_failing_where_unexpected_ends_its_rows_and_goes_on(model, tok):
    """A step that raises outside the parts that handle their own failures (here: sampling after a
    decode step) ends the running requests with an error instead of leaving them running forever."""
    engine = Engine(model, tok, max_batch=2).start()
    try:
        sample, calls = engine._sample, []

        def sample_once_broken(logits, reqs):
            calls.append(len(reqs))
            if len(calls) == 3:  # the prefill (both prompts together), then the second decode step
                raise RuntimeError("broken sampler")
            return sample(logits, reqs)

        engine._sample = sample_once_broken
        reqs = [engine.submit(tok.encode(p), SamplingParams(max_tokens=20, temperature=0), lambda ev: None)
                for p in PROMPTS[:2]]
        deadline = time.monotonic() + 20
        while not all(r.done for r in reqs):
            assert time.monotonic() < deadline, "the requests of the failed step never ended"
            time.sleep(0.01)
        assert all("broken sampler" in r.error for r in reqs)
        assert sorted(engine.free_rows) == [0, 1] and engine.cache.bytes_in_use() == 0
        (after,), _ = run_engine(engine, [tok.encode(PROMPTS[2])], SamplingParams(max_tokens=5, temperature=0))
        assert after.finish_reason == "length" and engine.alive
    finally:
        engine.shutdown()


def test_serve_bench_counts_no_stream_that_failed_midway():
    """`bench serve` stops on a stream whose server ended it with an error chunk, rather than
    counting its few tokens as a finished request."""
    from mixdepth.serve.loadgen import _one

    sse = ('data: {"choices": [{"text": "a"}], "mixdepth": {"routed_layers": [1]}}\n\n'
           'data: {"error": {"message": "decode step failed: out of memory", "type": "server_error"}}\n\n'
           "data: [DONE]\n\n")

    async def main():
        transport = httpx.MockTransport(lambda request: httpx.Response(200, text=sse))
        async with httpx.AsyncClient(transport=transport) as client:
            return await _one(client, "http://server", {})

    with pytest.raises(ValueError, match="out of memory"):
        asyncio.run(main())


def test_openai_chat_message_names_reach_the_chat_template(client, served, monkeypatch):
    """A field the server takes is used, not dropped: a message's `name` goes to the template."""
    engine = served[1]
    seen = []
    chat_ids = engine.chat_ids
    monkeypatch.setattr(engine, "chat_ids", lambda messages: (seen.append(messages), chat_ids(messages))[1])
    client.chat.completions.create(model="tiny", max_tokens=2, messages=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "ada"}])
    assert [(m["role"], m.get("name")) for m in seen[0]] == [("system", None), ("user", "ada")]


def test_server_tokenizes_prompts_off_the_event_loop(client, served, monkeypatch):
    """Encoding a (long) prompt runs in a worker thread, never on the thread that serves every stream."""
    server, engine = served
    threads = []
    encode = engine.encode
    monkeypatch.setattr(engine, "encode", lambda text: (threads.append(threading.current_thread()), encode(text))[1])
    client.completions.create(model="tiny", prompt="hello", max_tokens=2)
    assert threads and server.thread not in threads
