"""Shape, dtype and math checks of the Llama building blocks (RMSNorm, RoPE, attention, block)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixdepth.config import ModelConfig
from mixdepth.model import MLP, Attention, Block, RMSNorm, RotaryEmbedding, apply_rope, attention_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_shape_dtype_and_value(dtype):
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 16))
    norm = norm.to(dtype)  # a model cast to bf16 as a whole
    x = (torch.randn(2, 5, 16) * 3).to(dtype)
    y = norm(x)
    assert y.shape == x.shape and y.dtype == dtype
    xf = x.float()
    ref = xf / (xf.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * norm.weight.float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), ref, atol=tol, rtol=tol)
    if dtype == torch.float32:
        # unit weight gives unit RMS per token
        plain = RMSNorm(16, eps=0.0)(x)
        torch.testing.assert_close(plain.pow(2).mean(-1), torch.ones(2, 5), atol=1e-5, rtol=0)


def test_rmsnorm_fp32_weight_bf16_input_casts_back():
    # mixed precision (fp32 master weights, bf16 activations): STYLE says norms compute in fp32 and cast back
    y = RMSNorm(8)(torch.randn(3, 8).to(torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_rmsnorm_under_default_bf16():
    # the autouse fixture restores the default dtype afterwards
    torch.set_default_dtype(torch.bfloat16)
    norm = RMSNorm(8)
    y = norm(torch.randn(3, 8))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pos_shape", ["1d", "2d"])
def test_rope_shapes_dtype_and_norm(dtype, pos_shape):
    B, H, T, E = 2, 3, 7, 8
    rope = RotaryEmbedding(E, 32, 10000.0)
    pos = torch.arange(T) if pos_shape == "1d" else torch.stack([torch.arange(T), torch.arange(T) + 5])
    cos, sin = rope(pos)
    assert cos.shape == ((1 if pos_shape == "1d" else B), 1, T, E) and cos.dtype == torch.float32
    x = torch.randn(B, H, T, E).to(dtype)
    y = apply_rope(x, cos, sin)
    assert y.shape == x.shape and y.dtype == dtype
    # a rotation preserves each vector's norm
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.float().norm(dim=-1), x.float().norm(dim=-1), atol=tol, rtol=tol)
    # and it really rotates (position 0 is the identity, later positions are not)
    if pos_shape == "1d":
        torch.testing.assert_close(y[..., 0, :], x[..., 0, :])
    assert not torch.allclose(y[..., 1:, :].float(), x[..., 1:, :].float(), atol=1e-3)


def test_rope_relative_position_property():
    # <rope(q, m), rope(k, n)> depends only on m - n: what makes attention translation invariant
    E = 16
    rope = RotaryEmbedding(E, 64, 10000.0)
    q, k = torch.randn(1, 1, 1, E), torch.randn(1, 1, 1, E)

    def dot(m, n):
        cm, sm = rope(torch.tensor([m]))
        cn, sn = rope(torch.tensor([n]))
        return (apply_rope(q, cm, sm) * apply_rope(k, cn, sn)).sum()

    torch.testing.assert_close(dot(10, 3), dot(27, 20), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(dot(10, 3), dot(10, 4), atol=1e-4)


def test_rope_on_gathered_tokens_equals_rope_in_full_sequence():
    B, H, T, E = 2, 2, 12, 8
    rope = RotaryEmbedding(E, 32, 10000.0)
    x = torch.randn(B, H, T, E)
    cos, sin = rope(torch.arange(T))
    full = apply_rope(x, cos, sin)
    idx = torch.tensor([[1, 4, 9], [0, 7, 11]])  # (B, K) original positions of gathered tokens
    gathered = x.gather(2, idx[:, None, :, None].expand(B, H, 3, E))
    gc, gs = rope(idx)
    got = apply_rope(gathered, gc, gs)
    want = full.gather(2, idx[:, None, :, None].expand(B, H, 3, E))
    torch.testing.assert_close(got, want)
    # renumbering the gathered tokens 0..k-1 (a bug public implementations had) gives something else
    rc, rs = rope(torch.arange(3))
    assert not torch.allclose(apply_rope(gathered, rc, rs), want, atol=1e-3)


def test_rope_matches_hf_formula():
    # HF Llama: inv_freq = 1 / theta^(2i/E), emb = cat(freqs, freqs), x*cos + rotate_half(x)*sin
    E, theta = 8, 500.0
    rope = RotaryEmbedding(E, 16, theta)
    inv = 1.0 / theta ** (torch.arange(0, E, 2).double() / E)
    ang = torch.outer(torch.arange(16).double(), inv)
    torch.testing.assert_close(rope.cos, torch.cat([ang, ang], -1).cos().float())
    torch.testing.assert_close(rope.sin, torch.cat([ang, ang], -1).sin().float())


def test_rope_rotates_each_pair_by_its_angle():
    # HF's rotate_half layout: dims i and i + E/2 form a pair rotated by angle p * theta^(-2i/E)
    E, theta, p = 8, 10000.0, 5
    rope = RotaryEmbedding(E, 16, theta)
    x = torch.randn(1, 1, 1, E)
    cos, sin = rope(torch.tensor([p]))
    y = apply_rope(x, cos, sin)[0, 0, 0]
    x = x[0, 0, 0]
    for i in range(E // 2):
        ang = torch.tensor(p * theta ** (-2 * i / E), dtype=torch.float64)
        c, s = float(ang.cos()), float(ang.sin())
        a, b = float(x[i]), float(x[i + E // 2])
        assert float(y[i]) == pytest.approx(a * c - b * s, abs=1e-5)
        assert float(y[i + E // 2]) == pytest.approx(b * c + a * s, abs=1e-5)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("T", [1, 9])
def test_attention_module_matches_reference(n_kv_heads, T):
    cfg = ModelConfig(dim=32, n_heads=4, n_kv_heads=n_kv_heads, max_seq_len=16, n_layers=1)
    attn = Attention(cfg)
    rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    x = torch.randn(2, T, 32)
    cos, sin = rope(torch.arange(T))
    y = attn(x, cos, sin)
    assert y.shape == (2, T, 32)
    # the same computation, by hand, through the eager reference
    q = attn.q_proj(x).view(2, T, 4, cfg.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(2, T, n_kv_heads, cfg.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(2, T, n_kv_heads, cfg.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    ref = attn.o_proj(attention_reference(q, k, v).transpose(1, 2).reshape(2, T, 32))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rep", [1, 2, 4])
def test_sdpa_equals_attention_reference_with_masks(rep):
    B, G, T, S, E = 2, 2, 5, 8, 8
    q = torch.randn(B, G * rep, T, E)
    k, v = torch.randn(B, G, S, E), torch.randn(B, G, S, E)
    mask = torch.rand(B, 1, T, S) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=rep > 1)
    torch.testing.assert_close(got, attention_reference(q, k, v, mask), atol=1e-5, rtol=1e-5)
    # default mask of the reference: causal aligned to the end (queries are the last T of S keys)
    got = F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.ones(T, S, dtype=torch.bool).tril(S - T), enable_gqa=rep > 1)
    torch.testing.assert_close(got, attention_reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_attention_is_causal():
    cfg = ModelConfig(dim=32, n_heads=4, max_seq_len=16, n_layers=1)
    attn = Attention(cfg)
    cos, sin = RotaryEmbedding(cfg.head_dim, 16, cfg.rope_theta)(torch.arange(6))
    x = torch.randn(1, 6, 32)
    x2 = x.clone()
    x2[:, 4] += 1.0
    y, y2 = attn(x, cos, sin), attn(x2, cos, sin)
    torch.testing.assert_close(y[:, :4], y2[:, :4])
    assert not torch.allclose(y[:, 4:], y2[:, 4:])


def test_mlp_is_swiglu():
    cfg = ModelConfig(dim=16, n_heads=2, ffn_dim=24, n_layers=1)
    mlp = MLP(cfg)
    x = torch.randn(3, 16)
    ref = (F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), ref, atol=1e-6, rtol=1e-5)
    assert mlp.gate_proj.bias is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_shape_dtype_and_delta(dtype):
    cfg = ModelConfig(dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16, n_layers=2)
    block = Block(cfg, 0).to(dtype)
    rope = RotaryEmbedding(cfg.head_dim, 16, cfg.rope_theta)
    x = torch.randn(2, 7, 32).to(dtype)
    y, info = block(x, rope, torch.arange(7)[None])
    assert y.shape == x.shape and y.dtype == dtype and info is None
    cos, sin = rope(torch.arange(7)[None])
    torch.testing.assert_close(y, x + block.delta(x, cos, sin))
    # pre-norm Llama wiring: h = x + attn(norm1(x)); out = h + mlp(norm2(h))
    h = x + block.self_attn(block.input_layernorm(x), cos, sin)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: a different order of additions rounds differently
    torch.testing.assert_close(y, h + block.mlp(block.post_attention_layernorm(h)), atol=tol, rtol=tol)


def test_hf_module_names():
    from mixdepth.model import MoDTransformer

    cfg = ModelConfig.from_name("debug", tie_embeddings=False)
    keys = set(MoDTransformer(cfg).state_dict())
    for name in ("embed_tokens.weight", "norm.weight", "lm_head.weight", "layers.0.input_layernorm.weight",
                 "layers.0.post_attention_layernorm.weight", "layers.0.self_attn.q_proj.weight",
                 "layers.0.self_attn.k_proj.weight", "layers.0.self_attn.v_proj.weight",
                 "layers.0.self_attn.o_proj.weight", "layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight",
                 "layers.0.mlp.down_proj.weight", "layers.1.router.weight", "layers.1.predictor.fc1.weight"):
        assert name in keys, name
    assert "layers.0.router.weight" not in keys  # layer 0 is dense in the every-other-block layout
    assert not any("rope" in k for k in keys)  # RoPE tables are non-persistent buffers


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 16, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_few_rows_path_equals_f_linear(rows, bias):
    # inference with few rows takes W @ x^T on CPU (a faster BLAS kernel there); same product
    from mixdepth.model import layers
    from mixdepth.model.layers import Linear

    lin = Linear(512, 520, bias=bias)  # big enough to take the few-rows path
    assert lin.weight.numel() >= layers._BIG_WEIGHT
    if bias:
        torch.nn.init.normal_(lin.bias)
    x = torch.randn(rows, 1, 512)
    with torch.no_grad():
        y = lin(x)
    assert y.shape == (rows, 1, 520)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-4, atol=1e-4)
