"""Tests of `mixdepth.generate`: cached generation against uncached full forward passes, batching,
chunked prefill, sampling, stop tokens, KV accounting, statistics, errors and the CLI (issue 4).

Models are tiny `debug` presets with untied embeddings and a larger init, so greedy decoding does
not just repeat the last token, calibrated so that about half the tokens route: rows then route
differently, which the tests check before relying on it.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import generate_cli, greedy_by_full_forward
from mixdepth import ModelConfig, MoDTransformer
from mixdepth.generate import FINISHED, decode_one, generate, generate_text, prefill, sample

PROMPTS = [[10, 20, 30, 40, 50, 60, 70], [5, 6, 7], [200, 100, 50, 25, 12]]


def make_model(fraction: float | None = 0.5, **routing) -> MoDTransformer:
    torch.manual_seed(0)
    routing = {"capacity": 0.5, **routing}
    cfg = ModelConfig.from_name("debug", tie_embeddings=False, init_std=0.1, routing=routing)
    model = MoDTransformer(cfg).eval()
    if fraction is not None:
        model.calibrate_causal(torch.randint(0, cfg.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1)),
                               fraction=fraction)
    return model


@pytest.fixture(scope="module")
def model() -> MoDTransformer:
    return make_model()


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    return greedy_by_full_forward(model, prompt, n, mode="causal")


def run(model, prompts, **kw):
    return generate(model, prompts, **kw).run()


# ---- correctness against the uncached model ----------------------------------------------------
def test_greedy_batch_equals_full_forward_reference(model):
    n = 12
    res = run(model, PROMPTS, max_new_tokens=n, chunk_size=None)
    # the batch must really route differently per row, or this test proves less than it claims
    for j in range(len(res.routed_layers)):
        cols = [r[j, -n + 1 :] for r in res.routing]
        assert any(not torch.equal(cols[0], c) for c in cols[1:])
    for j in range(len(res.routed_layers)):
        frac = sum(int(r[j].sum()) for r in res.routing) / sum(r.shape[1] for r in res.routing)
        assert 0.05 < frac < 0.95
    for p, toks in zip(PROMPTS, res.tokens):
        assert len(set(toks)) > 2  # not a degenerate repeat
        assert toks == reference_greedy(model, p, n)


def test_batched_prompts_of_different_lengths_equal_each_alone(model):
    batch = run(model, PROMPTS, max_new_tokens=10)
    for b, p in enumerate(PROMPTS):
        alone = run(model, [p], max_new_tokens=10)
        assert batch.tokens[b] == alone.tokens[0]
        assert torch.equal(batch.routing[b], alone.routing[0])


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5])
def test_chunked_prefill_matches_unchunked(model, chunk_size):
    tokens = torch.zeros(len(PROMPTS), 7, dtype=torch.long)
    for b, p in enumerate(PROMPTS):
        tokens[b, : len(p)] = torch.tensor(p)
    lens = torch.tensor([len(p) for p in PROMPTS])

    cache = model.make_cache(len(PROMPTS))
    ref_logits, ref_routing = prefill(model, cache, tokens, lens)
    cache = model.make_cache(len(PROMPTS))
    logits, routing = prefill(model, cache, tokens, lens, chunk_size=chunk_size)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for lid in ref_routing:
        assert torch.equal(routing[lid], ref_routing[lid])
    full = run(model, PROMPTS, max_new_tokens=8, chunk_size=None)
    chunked = run(model, PROMPTS, max_new_tokens=8, chunk_size=chunk_size)
    assert chunked.tokens == full.tokens


def test_prefill_and_decode_one_logits_match_full_forward(model):
    """The gpt-fast-style pieces on their own: last-token logits of each row equal the full pass."""
    B = len(PROMPTS)
    tokens = torch.zeros(B, 7, dtype=torch.long)
    for b, p in enumerate(PROMPTS):
        tokens[b, : len(p)] = torch.tensor(p)
    lens = torch.tensor([len(p) for p in PROMPTS])
    cache = model.make_cache(B)
    logits, _ = prefill(model, cache, tokens, lens, chunk_size=3)
    nxt = torch.tensor([11, 22, 33])
    step_logits, _ = decode_one(model, cache, nxt)
    with torch.no_grad():
        for b, p in enumerate(PROMPTS):
            full = model(torch.tensor([p + [int(nxt[b])]]), mode="causal").logits[0]
            torch.testing.assert_close(logits[b], full[-2], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(step_logits[b], full[-1], rtol=1e-5, atol=1e-5)


# ---- sampling -----------------------------------------------------------------------------------
def test_sampling_is_reproducible_with_a_seed_and_seeds_differ(model):
    a = run(model, PROMPTS, max_new_tokens=16, temperature=1.0, seed=123)
    b = run(model, PROMPTS, max_new_tokens=16, temperature=1.0, seed=123)
    c = run(model, PROMPTS, max_new_tokens=16, temperature=1.0, seed=124)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert run(model, PROMPTS, max_new_tokens=8, temperature=0.7, generator=g1).tokens == \
        run(model, PROMPTS, max_new_tokens=8, temperature=0.7, generator=g2).tokens


def test_top_k_one_and_tiny_top_p_equal_greedy(model):
    greedy = run(model, PROMPTS, max_new_tokens=10).tokens
    assert run(model, PROMPTS, max_new_tokens=10, temperature=1.5, top_k=1, seed=3).tokens == greedy
    assert run(model, PROMPTS, max_new_tokens=10, temperature=1.5, top_p=1e-6, seed=3).tokens == greedy
    assert run(model, PROMPTS, max_new_tokens=10, temperature=1.5, seed=3).tokens != greedy


def test_sample_masks_top_k_and_top_p():
    # probabilities 0.5, 0.3, 0.15, 0.05 in a shuffled order
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log().expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    freq = torch.bincount(sample(logits, temperature=1.0, generator=g), minlength=4) / 2000
    torch.testing.assert_close(freq, probs, atol=0.04, rtol=0)  # the exponential race samples p
    for kw, allowed in (({"top_k": 2}, {1, 3}), ({"top_p": 0.7}, {1, 3}), ({"top_p": 0.85}, {0, 1, 3}),
                        ({"top_p": 0.5}, {1}), ({"top_k": 3, "top_p": 0.6}, {1, 3})):
        drawn = set(sample(logits, temperature=1.0, generator=g, **kw).tolist())
        assert drawn == allowed, kw
    assert sample(logits[:3], temperature=0).tolist() == [1, 1, 1]


# ---- stopping -----------------------------------------------------------------------------------
def test_stop_tokens_stop_rows_and_decoding_ends_when_all_rows_stopped(model):
    free = run(model, PROMPTS, max_new_tokens=12)
    row0 = free.tokens[0]
    i = next(i for i in range(2, 12) if row0[i] not in row0[:i])  # a token that row 0 first makes at step i
    stop_tok = row0[i]
    stream = generate(model, PROMPTS, max_new_tokens=12, stop=[stop_tok])
    steps = list(stream)
    res = stream.result
    assert res.tokens[0] == row0[: i + 1] and res.finish_reasons[0] == "stop"
    assert all(s[0] == FINISHED for s in steps[i + 1 :])  # a finished row produces nothing more
    for b in (1, 2):
        expect = free.tokens[b][: free.tokens[b].index(stop_tok) + 1] if stop_tok in free.tokens[b] else free.tokens[b]
        assert res.tokens[b] == expect

    # a stop sequence per row: every row stops early, and no decode step runs after the last one
    stops = [tuple(t[1:3]) for t in free.tokens]
    stream = generate(model, PROMPTS, max_new_tokens=12, stop=stops)
    steps = list(stream)
    assert stream.result.finish_reasons == ["stop"] * 3
    assert len(steps) == max(len(t) for t in stream.result.tokens) <= 3
    assert stream.result.decode_steps == len(steps) - 1


def test_rows_stop_when_the_context_is_full(model):
    ctx = model.cfg.max_seq_len
    res = run(model, [[1] * (ctx - 2), [2, 3]], max_new_tokens=6)
    assert len(res.tokens[0]) == 2 and res.finish_reasons[0] == "context"  # prompt + new = the context
    assert len(res.tokens[1]) == 6 and res.finish_reasons[1] == "length"


# ---- the cache really skips, and the statistics add up ----------------------------------------
def test_skipped_tokens_store_no_kv(model):
    free = run(model, PROMPTS, max_new_tokens=9)
    # row 1 stops after 2 tokens; later steps pass it as padding, which must store nothing
    res = run(model, PROMPTS, max_new_tokens=9, stop=[tuple(free.tokens[1][:2])])
    assert len(res.tokens[1]) == 2 and len(res.tokens[0]) == 9
    cache = res.cache
    for j, lid in enumerate(res.routed_layers):
        layer = cache.layers[lid]
        for b, r in enumerate(res.routing):
            n = int(r[j].sum())
            assert int(layer.lengths[b]) == n  # fill length = tokens that entered this block
            # and the stored tokens are exactly those, at their original positions
            assert layer.positions[b, :n].tolist() == r[j].nonzero().flatten().tolist()
    for layer in cache.layers:
        if not layer.routed:
            assert layer.lengths.tolist() == [r.shape[1] for r in res.routing]
    assert [r.shape[1] for r in res.routing] == [len(p) + len(t) - 1 for p, t in zip(PROMPTS, res.tokens)]


def test_statistics_are_consistent(model):
    res = run(model, PROMPTS, max_new_tokens=10)
    R = len(res.routed_layers)
    assert res.routed_layers == model.cfg.routed_layer_ids and R > 0
    fed = sum(r.shape[1] for r in res.routing)
    for j, lid in enumerate(res.routed_layers):
        assert res.routed_fraction[lid] == pytest.approx(sum(int(r[j].sum()) for r in res.routing) / fed)
        decoded = [r[j, p:] for r, p in zip(res.routing, res.prompt_lengths)]
        assert res.decode_routed_fraction[lid] == pytest.approx(
            sum(int(d.sum()) for d in decoded) / sum(d.numel() for d in decoded))
    assert res.skipped_fraction == pytest.approx(1 - sum(res.routed_fraction.values()) / R)
    cfg = model.cfg
    per_token = 2 * cfg.n_kv_heads * cfg.head_dim * 4  # fp32 keys + values
    cached = (cfg.n_layers - R) * fed + sum(int(r.sum()) for r in res.routing)
    assert res.kv_bytes_in_use == cached * per_token
    assert res.kv_bytes_dense == cfg.n_layers * fed * per_token
    assert res.kv_bytes_in_use < res.kv_bytes_dense
    assert res.kv_bytes_allocated >= res.kv_bytes_in_use
    assert res.new_tokens == 30 and res.decode_steps == 9
    assert res.tokens_per_s > 0 and res.decode_tokens_per_s > 0
    assert res.prefill_tokens == sum(map(len, PROMPTS))


def test_fraction_at_generation_time(model):
    thresholds = [float(layer.causal_threshold) for layer in model.routed_layers]
    everything = run(model, PROMPTS, max_new_tokens=6, fraction=1.0)
    assert all(f == 1.0 for f in everything.routed_fraction.values()) and everything.skipped_fraction == 0
    nothing = run(model, PROMPTS, max_new_tokens=6, fraction=0.0)
    assert all(f == 0.0 for f in nothing.routed_fraction.values()) and nothing.skipped_fraction == 1
    assert nothing.kv_bytes_in_use < everything.kv_bytes_in_use
    # the calibrated thresholds come back after the generation
    assert [float(layer.causal_threshold) for layer in model.routed_layers] == thresholds
    with pytest.raises(ValueError, match="never calibrated"):
        generate(make_model(fraction=None), PROMPTS, fraction=0.3, fraction_rule="threshold")


# ---- other routers and errors ------------------------------------------------------------------
@pytest.mark.parametrize("routing", [dict(router="none"), dict(router="token_choice"),
                                     dict(causal_method="aux_loss"), dict(unit="attn"), dict(unit="mlp")])
def test_other_routers_generate_like_the_reference(routing):
    model = make_model(fraction=None if routing.get("router") == "none" else 0.5, **routing)
    res = run(model, PROMPTS[:2], max_new_tokens=6)
    if "unit" in routing:  # the rows must route differently in decoding, or the per-row cache paths go untested
        rows = res.routing
        assert any(not torch.equal(rows[0][j, -5:], rows[1][j, -5:]) for j in range(len(res.routed_layers)))
    for p, toks in zip(PROMPTS, res.tokens):
        assert toks == reference_greedy(model, p, 6)


def test_random_routing_is_refused():
    model = make_model(fraction=None, router="random")
    with pytest.raises(ValueError, match="random routing cannot decode causally"):
        generate(model, PROMPTS)


@pytest.mark.parametrize("prompts, kw, message", [
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([[1] * 128], {}, "prompt 0 has 128 tokens, which leaves no room for new tokens in the model's context of 128"),
    ([[1, 256]], {}, "prompt 0 has token id 256, outside the vocabulary"),
    ([[1, -1]], {}, "prompt 0 has token id -1"),
    ([], {}, "non-empty list"),
    ([[1]], {"max_new_tokens": 0}, "max_new_tokens must be"),
    ([[1]], {"temperature": -1.0}, "temperature must be >= 0"),
    ([[1]], {"top_k": 0}, "top_k must be"),
    ([[1]], {"top_p": 1.5}, "top_p must be in"),
    ([[1]], {"stop": [300]}, "stop token id 300 out of range"),
    ([[1]], {"fraction": 2.0}, "fraction must be in"),
])
def test_bad_input_fails_at_the_call_with_one_line(model, prompts, kw, message):
    with pytest.raises(ValueError, match=message) as e:
        generate(model, prompts, **kw)  # raised before iterating
    assert "\n" not in str(e.value)


def test_generate_text_streams_and_cuts_at_stop_strings(model):
    from mixdepth.data import ByteTokenizer

    tok = ByteTokenizer()
    kw = dict(max_new_tokens=24, temperature=1.0, seed=0)
    free, _ = generate_text(model, tok, ["hello", "abc"], **kw)
    # a stop string: an ASCII character that row 0 first makes after a few others
    i = next(i for i, c in enumerate(free[0]) if i >= 2 and c.isascii() and c not in free[0][:i])
    target = free[0][i]
    pieces = {0: [], 1: []}
    texts, res = generate_text(model, tok, ["hello", "abc"], stop_strings=[target],
                               on_text=lambda b, s: pieces[b].append(s), **kw)
    assert texts[0] == free[0][:i] and res.finish_reasons[0] == "stop"
    assert len(res.tokens[0]) < 24
    assert texts[1] == free[1].split(target)[0]
    for b in (0, 1):
        assert "".join(pieces[b]) == texts[b]  # the streamed pieces add up to the returned text
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_text(model, tok, ["a", ""])


# ---- the command line ----------------------------------------------------------------------------
needs_checkpoint = pytest.mark.skipif(importlib.util.find_spec("mixdepth.checkpoint") is None,
                                      reason="mixdepth.checkpoint (save_checkpoint/load_model) has not landed")


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, model):
    from mixdepth.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(path, model)
    return path


cli = generate_cli


@needs_checkpoint
def test_cli_generates_and_prints_statistics(capsys, checkpoint_dir, model, tmp_path):
    code, out, err = cli(capsys, "--checkpoint", checkpoint_dir, "--prompt", "hello", "--max-new-tokens", 10,
                         "--temperature", 0, "--device", "cpu")
    assert code == 0, err
    expect, _ = generate_text(model, __import__("mixdepth.data").data.ByteTokenizer(), "hello", max_new_tokens=10)
    assert out.startswith("hello" + expect[0] + "\n")
    assert "tokens/s:" in out and "routed-layer work skipped:" in out and "for a dense model" in out
    skipped = float(out.split("routed-layer work skipped: ")[1].split("%")[0])
    assert 5 < skipped < 95

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond\n")
    png = tmp_path / "map.png"
    code, out, err = cli(capsys, "--checkpoint", checkpoint_dir, "--prompts-file", prompts, "--max-new-tokens", 5,
                         "--seed", 1, "--routing-map", png)
    assert code == 0, err
    assert "--- prompt 0" in out and "--- prompt 1" in out and "first prompt" in out and "second" in out
    for b in (0, 1):
        assert (tmp_path / f"map-{b}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / f"map-{b}.npz").exists()


@needs_checkpoint
def test_cli_errors_are_one_line(capsys, checkpoint_dir, tmp_path):
    from mixdepth.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "random", make_model(fraction=None, router="random"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = [
        (["--checkpoint", checkpoint_dir, "--prompt", ""], "the prompt is empty"),
        (["--checkpoint", checkpoint_dir, "--prompt", "x" * 200], "no room for new tokens in the model's context"),
        (["--checkpoint", tmp_path / "missing", "--prompt", "hi"], "not found"),
        (["--checkpoint", tmp_path / "random", "--prompt", "hi"], "random routing cannot decode causally"),
        (["--checkpoint", checkpoint_dir, "--prompts-file", empty], "holds no prompt"),
        (["--checkpoint", checkpoint_dir, "--prompts-file", tmp_path / "nope.txt"], "prompts file not found"),
        (["--checkpoint", checkpoint_dir, "--prompt", "hi", "--fraction", 3], "--fraction must be in"),
        (["--checkpoint", checkpoint_dir, "--prompt", "hi", "--top-p", 0], "top_p must be in"),
    ]
    for argv, message in cases:
        code, out, err = cli(capsys, *argv)
        assert code == 2, (argv, out, err)
        assert message in err, (argv, err)
        assert err.strip().count("\n") == 0 and "Traceback" not in err, err


@needs_checkpoint
def test_cli_refuses_a_tokenizer_that_does_not_match(capsys, tmp_path):
    """A BPE tokenizer with more ids than the model's 256: its merged tokens are unknown to the model."""
    pytest.importorskip("tokenizers")
    from mixdepth.checkpoint import save_checkpoint
    from mixdepth.data import BPETokenizer

    path = tmp_path / "bpe"
    save_checkpoint(path, make_model())
    bpe = BPETokenizer.train(["hello world, hello there. " * 50], vocab_size=300)
    assert max(bpe.encode("hello")) >= 256
    bpe.save(path)
    code, _, err = cli(capsys, "--checkpoint", path, "--prompt", "hello")
    assert code == 2 and "outside the model's vocabulary" in err and err.count("\n") == 1, err


def test_stream_returns_the_result_as_stop_iteration_value(model):
    stream = generate(model, PROMPTS[:1], max_new_tokens=3)
    steps = []
    with pytest.raises(StopIteration) as e:
        while True:
            steps.append(int(next(stream)[0]))
    assert e.value.value is stream.result and stream.result.tokens == [steps]


# ---- generation state is per call ------------------------------------------------------------------
def test_concurrent_generations_with_different_fractions_match_alone():
    """Two generations at different routed fractions, on one model, from two threads at once, give
    exactly the tokens each gives alone: no generation state lives on the model."""
    import threading

    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(max_new_tokens=24, temperature=0.9, top_k=50, seed=3)
    alone = {f: run(model, PROMPTS, fraction=f, **kw) for f in (0.2, 0.8)}
    assert alone[0.2].tokens != alone[0.8].tokens  # the fractions really change the generation
    assert alone[0.2].routed_fraction != alone[0.8].routed_fraction
    for _ in range(3):
        got: dict[float, object] = {}
        start = threading.Barrier(2)

        def work(f: float, got=got, start=start) -> None:
            start.wait()
            got[f] = run(model, PROMPTS, fraction=f, **kw)

        threads = [threading.Thread(target=work, args=(f,)) for f in alone]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for f, res in alone.items():
            assert got[f].tokens == res.tokens
            assert got[f].routed_fraction == res.routed_fraction
    # and the model itself (weights, calibrated thresholds) is as it was
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_fraction_thresholds_are_per_call(model):
    ids = torch.tensor([PROMPTS[0]])
    calibrated = model(ids, mode="causal", return_routing=True).routing
    everything = model(ids, mode="causal", return_routing=True, thresholds=model.causal_thresholds(1.0)).routing
    assert all(m.all() for m in everything.values())
    again = model(ids, mode="causal", return_routing=True).routing
    assert all(torch.equal(again[i], calibrated[i]) for i in calibrated)
