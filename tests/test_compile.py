"""torch.compile is opt-in: per-block compilation must trace whole graphs (no graph breaks) in
topk and dense modes and give the eager model's logits and gradients."""

import pytest
import torch

from mixdepth import ModelConfig, MoDTransformer


@pytest.mark.slow
@pytest.mark.parametrize("router", ["expert_choice", "token_choice", "none"])
def test_blocks_compile_fullgraph_and_match_eager(router):
    cfg = ModelConfig.from_name("debug", routing=dict(router=router))
    eager = MoDTransformer(cfg)
    compiled = MoDTransformer(cfg)
    compiled.load_state_dict(eager.state_dict())
    for layer in compiled.layers:
        layer.compile(backend="aot_eager", fullgraph=True)  # fullgraph: a graph break is an error
    x = torch.randint(0, cfg.vocab_size, (2, 48))
    for mode in ("topk", "dense"):
        a, b = eager(x, x, mode=mode), compiled(x, x, mode=mode)
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    a.loss.backward()
    b.loss.backward()
    ga = eager.layers[1].self_attn.q_proj.weight.grad
    gb = compiled.layers[1].self_attn.q_proj.weight.grad
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)
