"""CUDA checks, run by hand on a GPU machine (`pytest -m gpu`); skipped without CUDA."""

import pytest
import torch

from mixdepth import ModelConfig, MoDTransformer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model(dtype=torch.float32, **routing):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("debug", routing=routing)
    with torch.device("cuda"):
        return MoDTransformer(cfg).to(dtype=dtype).eval(), cfg


@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
def test_cached_decoding_matches_full_forward_on_cuda(router):
    model, cfg = _model(router=router)
    ids = torch.randint(0, cfg.vocab_size, (3, 40), device="cuda")
    with torch.no_grad():
        model.calibrate_causal(ids, 0.3)
        full = model(ids, mode="causal").logits
        cache = model.make_cache(3, 64)
        model(ids[:, :17], mode="causal", cache=cache, input_pos=torch.zeros(3, dtype=torch.long))
        steps = [model(ids[:, t:t + 1], mode="causal", cache=cache, input_pos=torch.full((3,), t)).logits
                 for t in range(17, 40)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 17:], rtol=1e-4, atol=1e-4)


def test_bf16_training_step_and_compiled_blocks():
    model, cfg = _model(torch.bfloat16)
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (4, 65), device="cuda")
    eager = model(ids[:, :-1], ids[:, 1:], mode="topk")
    assert eager.logits.dtype == torch.bfloat16 and torch.isfinite(eager.loss)
    eager.loss.backward()
    assert model.layers[1].router.weight.grad.abs().sum() > 0
    for layer in model.layers:
        layer.compile(fullgraph=True)  # inductor
    compiled = model(ids[:, :-1], ids[:, 1:], mode="topk")
    torch.testing.assert_close(compiled.loss.float(), eager.loss.float(), rtol=2e-2, atol=2e-2)


def test_generate_on_cuda():
    from mixdepth.generate import generate

    model, cfg = _model()
    ids = torch.randint(0, cfg.vocab_size, (2, 32), device="cuda")
    with torch.no_grad():
        model.calibrate_causal(ids, 0.25)
    gen = generate(model, [[1, 2, 3, 4], [5, 6]], max_new_tokens=8)
    result = gen.run()
    assert len(result.tokens) == 2 and all(len(t) > 0 for t in result.tokens)


def test_static_decoder_captures_cuda_graphs_and_matches_eager():
    """Captured steps (a conditional node per routed layer) give the eager path's tokens, routing and
    logits; one decoder serves generations at other fractions (its thresholds are copied into the
    captured buffer; at fraction 0 every conditional node skips); a routed buffer that grows is
    captured again."""
    from mixdepth.generate import decode_one, generate
    from mixdepth.static import StaticDecoder

    model, cfg = _model()
    ids = torch.randint(0, cfg.vocab_size, (3, 40), device="cuda")
    with torch.no_grad():
        model.calibrate_causal(ids, 0.25)
    dec = StaticDecoder(model, compile=True)
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    for fraction in (0.25, 0.5, 0.0):
        want = generate(model, prompts, max_new_tokens=12, fraction=fraction).run()
        got = generate(model, prompts, max_new_tokens=12, fraction=fraction, decoder=dec).run()
        assert got.tokens == want.tokens, fraction
        assert all(torch.equal(a, b) for a, b in zip(got.routing, want.routing)), fraction
    assert dec.captures >= 1
    with torch.no_grad():
        eager = model.make_cache(3, 48)
        model(ids[:, :10], mode="causal", cache=eager)
        src = model.make_cache(3, 48)
        model(ids[:, :10], mode="causal", cache=src)
        captured = dec.captures
        dec.start(src, headroom=1)  # grows every few steps: each growth is a new capture
        for t in range(10, 40):
            want, _ = decode_one(model, eager, ids[:, t])
            got, _ = dec.step(ids[:, t])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert dec.captures > captured + 1
    assert dec.skip == "graph", "conditional nodes fell back (see the warning)"


def test_bench_decode_compile_on_cuda():
    from mixdepth import bench

    cfg = ModelConfig.from_name("debug")
    rec = bench.bench_decode(cfg, 8, 64, 16, device=torch.device("cuda"), dtype=torch.bfloat16, rounds=2,
                             compile=True)
    assert rec["ratio"] > 0 and rec["captures"] == 2 and rec["mod_peak_bytes"] > 0
