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


@pytest.mark.parametrize("fraction", [0.25, 0.0])
def test_static_decoder_captures_cuda_graphs_and_matches_eager(fraction):
    """The captured step (a conditional node per routed layer) gives the eager path's tokens and
    routing; at fraction 0 no row ever chooses a routed layer, so every conditional node skips."""
    from mixdepth.generate import generate
    from mixdepth.static import StaticDecoder, conditional_nodes_available

    model, cfg = _model()
    ids = torch.randint(0, cfg.vocab_size, (4, 64), device="cuda")
    with torch.no_grad():
        model.calibrate_causal(ids, 0.25)
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    want = generate(model, prompts, max_new_tokens=12, fraction=fraction).run()
    dec = StaticDecoder(model, compile=True)
    got = generate(model, prompts, max_new_tokens=12, fraction=fraction, decoder=dec).run()
    assert dec.captures >= 1 and dec.skip == ("graph" if conditional_nodes_available() else "host")
    assert got.tokens == want.tokens
    assert all(torch.equal(a, b) for a, b in zip(got.routing, want.routing))
