"""Static-shape decode steps (issue 20): the same logits, routing and cache as the eager cached path
and a full causal forward, for batches whose rows route differently, after chunked prefill; one
traced graph with no host sync inside; generation with them gives the eager path's tokens."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import generate_cli
from mixdepth import ModelConfig, MoDTransformer
from mixdepth.generate import decode_one, generate
from mixdepth.kvcache import StaticCache
from mixdepth.static import StaticDecoder, bucket, static_step, when_always, when_cond, when_host

B, VOCAB = 3, 256
ATOL = 1e-5
ROUTERS = [("expert_choice", "predictor"), ("expert_choice", "aux_loss"), ("token_choice", "predictor")]


def _ids(B: int = B, T: int = 26, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _model(router="expert_choice", method="predictor", unit="block", fraction=0.4) -> MoDTransformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("debug", tie_embeddings=False, init_std=0.1,
                                routing=dict(router=router, causal_method=method, unit=unit, capacity=0.5))
    model = MoDTransformer(cfg).eval()
    model.calibrate_causal(_ids(4, 64, seed=7), fraction)
    return model


def _prefilled(model, ids, chunks=(6, 5), max_len=32):
    cache = model.make_cache(ids.shape[0], max_len)
    pos = 0
    for c in chunks:
        model(ids[:, pos : pos + c], mode="causal", cache=cache)
        pos += c
    return cache, pos


@pytest.mark.parametrize("unit", ["block", "attn", "mlp"])
@pytest.mark.parametrize("router, method", ROUTERS)
@torch.no_grad()
def test_static_steps_equal_eager_decoding_and_full_forward(router, method, unit):
    model = _model(router, method, unit)
    ids = _ids()
    full = model(ids, mode="causal", return_routing=True)
    eager, start = _prefilled(model, ids)
    static_src, _ = _prefilled(model, ids)
    dec = StaticDecoder(model)
    static = dec.start(static_src)
    assert static.batch_size == 4  # 3 rows in the bucket of 4: one padding row
    routed = [layer.layer_id for layer in model.routed_layers]
    for t in range(start, ids.shape[1]):
        want, masks = decode_one(model, eager, ids[:, t])
        got, chosen = dec.step(ids[:, t])
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
        torch.testing.assert_close(got, full.logits[:, t], rtol=0, atol=ATOL)
        for j, lid in enumerate(routed):
            assert torch.equal(chosen[j], masks[lid]) and torch.equal(chosen[j], full.routing[lid][:, t])
    decoded = {lid: full.routing[lid][:, start:] for lid in routed}
    assert any(len(set(m.sum(1).tolist())) > 1 for m in decoded.values()), "rows should route differently"
    # a routed layer holds exactly the tokens that chose it: the eager cache's fill, and nothing for padding
    for lid in model.cfg.kv_routed_layer_ids:
        assert static.layers[lid].lengths.tolist() == eager.layers[lid].lengths.tolist() + [0]
    assert static.seq_lengths.tolist() == [ids.shape[1]] * B + [0]
    assert static.bytes_in_use() == eager.bytes_in_use() and static.dense_bytes() == eager.dense_bytes()


def _static_copy(model, ids):
    cache, start = _prefilled(model, ids)
    static = StaticCache(model.cfg, 4, cache.max_seq_len, 1, torch.float32, "cpu")
    static.load(cache, headroom=8)
    return static, start


@torch.no_grad()
def test_skip_strategies_agree_and_a_layer_no_row_chose_is_untouched():
    model = _model()
    ids = _ids()
    routed = model.routed_layers
    # the first routed layer chosen by no row (threshold +inf), the second by every active row (-inf)
    thresholds = torch.tensor([float("inf"), float("-inf")])
    active = torch.tensor([True, True, False, False])  # row 2 finished, row 3 padding
    tokens = torch.cat([ids[:, 11], torch.zeros(1, dtype=torch.long)])
    results = []
    for when in (when_always, when_host, when_cond):
        static, _ = _static_copy(model, ids)
        before = copy.deepcopy(static)
        logits, chosen = static_step(model, static, tokens, active, thresholds, when)
        results.append((logits, chosen, static))
        assert not chosen[0].any() and torch.equal(chosen[1], active)
        skipped = static.layers[routed[0].layer_id]
        old = before.layers[routed[0].layer_id]
        assert torch.equal(skipped.lengths, old.lengths)
        if when is when_always:  # the unit ran masked: only the spare slot was written
            assert torch.equal(skipped.k[:, :, : old.spare], old.k[:, :, : old.spare])
            assert not torch.equal(skipped.k, old.k)
        else:  # skipped: not even the spare slot
            assert torch.equal(skipped.k, old.k) and torch.equal(skipped.v, old.v)
        for now, was in zip(static.layers, before.layers):  # inactive rows: nothing stored, nothing advanced
            assert torch.equal(now.lengths[2:], was.lengths[2:])
            assert torch.equal(now.k[2:, :, : was.spare], was.k[2:, :, : was.spare])
        assert static.seq_lengths.tolist() == (before.seq_lengths + active.long()).tolist()
    for logits, chosen, static in results[1:]:
        torch.testing.assert_close(logits[:2], results[0][0][:2], rtol=0, atol=ATOL)
        assert torch.equal(chosen, results[0][1])
        assert all(torch.equal(a.lengths, b.lengths) for a, b in zip(static.layers, results[0][2].layers))


@torch.no_grad()
def test_step_traces_as_one_graph_with_a_cond_per_routed_layer_and_no_host_sync(monkeypatch):
    import mixdepth.model.layers as layers

    monkeypatch.setattr(layers, "_BIG_WEIGHT", 0)  # the CPU few-row matmul choice (timed) on every weight
    model = _model()
    ids = _ids()
    static, _ = _static_copy(model, ids)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    step = torch.compile(static_step, fullgraph=True, dynamic=False, backend=backend)  # a graph break is an error
    tokens = torch.cat([ids[:, 11], torch.zeros(1, dtype=torch.long)])
    active = torch.tensor([True, True, True, False])
    want_cache = copy.deepcopy(static)
    want, want_chosen = static_step(model, want_cache, tokens, active, None, when_host)
    monkeypatch.setattr(layers, "_TRANSPOSED_FASTER", {})  # not yet measured: the trace meets the timing
    got, chosen = step(model, static, tokens, active, None, when_cond)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    assert torch.equal(chosen, want_chosen)
    assert all(torch.equal(a.lengths, b.lengths) for a, b in zip(static.layers, want_cache.layers))
    assert len(graphs) == 1
    nodes = list(graphs[0].graph.nodes)
    conds = [n for n in nodes if n.target is torch.ops.higher_order.cond]
    assert len(conds) == len(model.routed_layers)
    syncs = [n for n in nodes if n.op == "call_method" and n.target in ("item", "tolist", "__bool__", "cpu")]
    syncs += [n for n in nodes if n.op == "call_function" and "nonzero" in str(n.target)]
    assert not syncs, f"host syncs in the step: {syncs}"


@torch.no_grad()
def test_compiled_decoder_generates_the_eager_tokens():
    model = _model(fraction=0.5)
    prompts = [[10, 20, 30, 40, 50, 60, 70], [5, 6, 7], [200, 100, 50, 25, 12]]
    free = generate(model, prompts, max_new_tokens=14).run()
    kw = dict(max_new_tokens=14, stop=[[free.tokens[1][3]]], chunk_size=4)  # row 1 stops early
    want = generate(model, prompts, **kw).run()
    assert len({len(t) for t in want.tokens}) > 1, "rows should finish at different steps"
    dec = StaticDecoder(model, compile=True, backend="aot_eager")
    got = generate(model, prompts, decoder=dec, **kw).run()
    assert got.tokens == want.tokens and got.finish_reasons == want.finish_reasons
    assert all(torch.equal(a, b) for a, b in zip(got.routing, want.routing))
    assert got.routed_fraction == want.routed_fraction and got.kv_bytes_in_use == want.kv_bytes_in_use
    assert got.compile_s > 0 and got.compile_tokens >= len(prompts)  # timed apart from decoding
    # the decoder is kept: a second generation reuses its buffers and compiled step, same tokens again
    again = generate(model, prompts, decoder=dec, **kw).run()
    assert again.tokens == want.tokens and again.compile_s == 0 and again.compile_tokens == 0


@torch.no_grad()
def test_a_kept_decoder_decodes_each_generation_at_its_own_fraction():
    """One decoder, generations at two fractions and then at the calibrated one: each equals the eager
    generation at that fraction (tokens, routing, KV bytes), so `start` takes the generation's
    thresholds instead of the calibrated ones."""
    model = _model(fraction=0.5)
    prompts = [[10, 20, 30, 40, 50, 60, 70], [5, 6, 7], [200, 100, 50, 25, 12]]
    dec = StaticDecoder(model)
    eager = {}
    for fraction in (0.2, 0.8, None):
        kw = dict(max_new_tokens=12, fraction=fraction, fraction_rule="threshold")
        want = eager[fraction] = generate(model, prompts, **kw).run()
        got = generate(model, prompts, **kw, decoder=dec).run()
        assert got.tokens == want.tokens, fraction
        assert all(torch.equal(a, b) for a, b in zip(got.routing, want.routing)), fraction
        assert got.routed_fraction == want.routed_fraction, fraction
        assert got.decode_routed_fraction == want.decode_routed_fraction, fraction
        assert got.kv_bytes_in_use == want.kv_bytes_in_use, fraction
    # the fractions really decode differently, or this proves nothing about the thresholds
    low, high = eager[0.2].decode_routed_fraction, eager[0.8].decode_routed_fraction
    assert all(low[i] < high[i] for i in low), (low, high)
    assert eager[0.2].kv_bytes_in_use < eager[0.8].kv_bytes_in_use
    for f in (0.2, 0.8):
        assert any(not torch.equal(a, b) for a, b in zip(eager[f].routing, eager[None].routing)), f


@pytest.mark.parametrize("backend", [None, "eager"])
@torch.no_grad()
def test_routed_buffers_grow_between_steps_when_rows_route_more(backend):
    model = _model(fraction=0.6)
    ids = _ids(T=30)
    full = model(ids, mode="causal")
    cache, start = _prefilled(model, ids)
    dec = StaticDecoder(model, compile=backend is not None, backend=backend)  # compiled: each size recompiles
    static = dec.start(cache, headroom=1)
    sizes = {layer.spare for layer in static.layers if layer.routed}
    for t in range(start, ids.shape[1]):
        logits, _ = dec.step(ids[:, t])
        torch.testing.assert_close(logits, full.logits[:, t], rtol=0, atol=ATOL)
    assert {layer.spare for layer in static.layers if layer.routed} != sizes  # grew
    for layer in static.layers:
        assert int(layer.lengths.max()) <= layer.spare


@torch.no_grad()
def test_a_compiled_decoder_outlives_dynamos_recompile_limit():
    """Buckets x buffer sizes make more compiled variants than dynamo's default limit (8), which with
    fullgraph would be a hard error."""
    model = _model()
    dec = StaticDecoder(model, compile=True, backend="eager")
    for rows in (1, 2, 3, 5, 9, 17):
        for headroom in (3, 40):  # two sizes of the routed buffers per bucket
            ids = _ids(B=rows, T=14, seed=rows)
            full = model(ids, mode="causal")
            cache, start = _prefilled(model, ids, chunks=(12,), max_len=20)
            dec.start(cache, headroom=headroom)
            logits, _ = dec.step(ids[:, start])
            torch.testing.assert_close(logits, full.logits[:, start], rtol=0, atol=ATOL)
    assert len(dec._seen) > 8


def test_a_decoder_started_again_refuses_the_older_batch():
    model = _model()
    ids = _ids()
    dec = StaticDecoder(model)
    dec.start(_prefilled(model, ids)[0])
    first = dec.started
    dec.step(ids[:, 11], started=first)
    dec.start(_prefilled(model, ids)[0])
    with pytest.raises(ValueError, match="one generation at a time"):
        dec.step(ids[:, 12], started=first)


def test_buckets():
    assert [bucket(n) for n in (1, 2, 3, 8, 9, 32, 33, 300)] == [1, 2, 4, 8, 16, 32, 64, 512]


def test_models_the_static_step_cannot_run_are_refused():
    moe = MoDTransformer(ModelConfig.from_name("debug", moe=dict(n_experts=4)))
    with pytest.raises(ValueError, match="MoE"):
        StaticDecoder(moe)
    rand = MoDTransformer(ModelConfig.from_name("debug", routing=dict(router="random")))
    with pytest.raises(ValueError, match="cannot decode causally"):
        StaticDecoder(rand)
    with pytest.raises(ValueError, match="before start"):
        StaticDecoder(_model()).step(torch.zeros(1, dtype=torch.long))


@pytest.mark.slow
def test_cli_generate_and_bench_compile(capsys, tmp_path):
    """`generate --compile` prints what `generate` prints (greedy); `bench decode --compile` times
    static steps of both models (inductor on this CPU)."""
    from mixdepth.checkpoint import save_checkpoint
    from mixdepth.cli import main
    from mixdepth.data import ByteTokenizer

    model = _model(fraction=0.5)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer=ByteTokenizer())
    args = ("--checkpoint", tmp_path / "ckpt", "--prompts-file", tmp_path / "p.txt", "--max-new-tokens", 8,
            "--temperature", 0, "--device", "cpu")
    (tmp_path / "p.txt").write_text("hello\nthe static step\n")
    code, eager, err = generate_cli(capsys, *args)
    assert code == 0, err
    code, compiled, err = generate_cli(capsys, *args, "--compile")
    assert code == 0, err
    text = lambda out: out.split("\n---\n")[0]  # noqa: E731 (the statistics hold timings)
    assert text(compiled) == text(eager) and "--- prompt 1" in compiled
    out = tmp_path / "bench.json"
    code = main(["bench", "decode", "--preset", "debug", "--decode-batches", "2", "--context", "24",
                 "--new-tokens", "6", "--rounds", "1", "--device", "cpu", "--compile", "--json", str(out)])
    assert code == 0
    rec = __import__("json").loads(out.read_text())[0]
    assert rec["settings"]["compile"] and rec["mod_compile_s"] > 0 and rec["ratio"] > 0
    assert "compile" in capsys.readouterr().out
