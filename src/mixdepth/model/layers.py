"""Llama-style building blocks: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Module names follow Hugging Face's Llama (`self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`,
...), so converting a pretrained model is a near-identity key map. `Block.delta()` returns what
the block *adds* to the residual stream, f(x) in the paper's x' = x + r * f(x) (section 3.1).

Dimensions: B batch, T tokens (or k routed tokens), D model width, H query heads,
G key/value heads, E head width, S cache slots, F MLP hidden width.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig

# Decoding multiplies a handful of rows by each weight matrix, and which CPU kernel is fastest for
# that shape depends on the machine: on one 2-core Xeon, W @ x^T (the same product, transposed) ran
# 2-3x faster than F.linear's x @ W^T (8 layers of d=512 weights, 1 row: 3.6 vs 7.1 ms); on another
# it ran 3x slower (d=512, 1 row: 52 vs 15 us). So the choice is measured, once per shape and
# process, on the first inference call (`_transposed_is_faster`). A single row is duplicated, since
# one-row products take a slower matrix-vector path. Inference on CPU only, for weights too big to
# stay in cache (small ones, such as the predictor's, gain nothing); training, CUDA and traced code
# (torch.compile) use F.linear.
_FEW_ROWS = 16
_BIG_WEIGHT = 1 << 18  # elements: a 512 x 512 projection
_TRANSPOSED_FASTER: dict[tuple[int, int, int], bool] = {}  # (rows, out, in) -> W @ x^T measured faster


def _transposed_mm(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x2 @ W^T computed as (W @ x2^T)^T; (M, in) -> (M, out)."""
    rows = x2.shape[0]
    if rows == 1:
        x2 = x2.repeat(2, 1)
    return torch.mm(weight, x2.t())[:, :rows].t()


def _transposed_is_faster(rows: int, weight: torch.Tensor) -> bool:
    """Whether W @ x^T beats F.linear by 20% for `rows` rows on this machine (best of 5 timings each)."""
    key = (rows, *weight.shape)
    if key not in _TRANSPOSED_FASTER:
        x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)

        def best(fn) -> float:
            fn()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return min(times)

        plain = best(lambda: F.linear(x, weight))
        _TRANSPOSED_FASTER[key] = best(lambda: _transposed_mm(x, weight)) < 0.8 * plain
    return _TRANSPOSED_FASTER[key]


class Linear(nn.Linear):
    """Linear layer, bias-free unless asked (converted models may carry biases). Every matmul in
    the model goes through it, so FLOPs and parameter counts can be read off the module tree (see
    `mixdepth.flops`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (x.device.type != "cpu" or rows > _FEW_ROWS or rows == 0 or self.weight.numel() < _BIG_WEIGHT
                or torch.is_grad_enabled() or torch.compiler.is_compiling()  # a compiler picks its own kernels
                or not _transposed_is_faster(rows, self.weight)):
            return F.linear(x, self.weight, self.bias)
        y = _transposed_mm(x.reshape(rows, self.in_features), self.weight)  # (M, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back (as Hugging Face's Llama)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(dtype) * h.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding table, looked up by position id.

    Routed tokens keep their original position ids, so a gathered token is rotated exactly as it
    would be in the full sequence (the bug "positions renumbered 0..k-1" cannot happen here: the
    table is only ever indexed by the original ids).
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, scaling: dict | None = None) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        inv_freq = rope_inv_freq(head_dim, theta, scaling)  # (E/2,)
        t = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (S, E/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (S, E), HF's rotate_half layout
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) or (T,) position ids -> cos, sin of shape (B|1, 1, T, E) in fp32."""
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        return self.cos[position_ids][:, None], self.sin[position_ids][:, None]


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """(E/2,) fp32 inverse frequencies, computed in the same fp32 steps as Hugging Face's, so a
    converted model's angles are bit-equal to its source's.

    `scaling` (`ModelConfig.rope_scaling`): `linear` divides every frequency by `factor`; `llama3`
    (Llama 3.1) divides the low frequencies by `factor`, keeps the high ones and interpolates between.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, E) by the position angles, in fp32, cast back."""
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def attention_reference(q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eager attention (softmax(QK^T/sqrt(E)) V) with GQA and a boolean mask; for tests only."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
    if mask is None:
        T, S = q.shape[-2], k.shape[-2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention on `F.scaled_dot_product_attention`.

    Without a cache it attends causally within the given tokens (for a routed layer: among the
    gathered tokens, whose order is the original order). With a cache slot it stores its keys and
    values there first (`CacheSlot.update`) and attends over what the cache holds for each row,
    with the mask the cache returns. This is the model's one attention call.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        if cfg.qk_norm:  # Qwen3: each head's query and key normalised before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm
        self.gqa = cfg.n_kv_heads != cfg.n_heads

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None,
                mask: torch.Tensor | None = None, window: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
        """`mask` (B, 1, T, T) bool, without a cache: which keys each query reads instead of the causal
        prefix (`MoDBlock._forward_relaxed`). `window` (W, query positions (B|1, T)): a query reads only
        keys at positions p - W < j <= p (a dense layer's key j sits at position j, with or without
        a cache)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, E)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, T, E)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, T, E)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            keys, values, causal, rows = k, v, T > 1 and mask is None, None
        else:  # the cache stores this call's keys and says what each query may read
            keys, values, mask, causal, rows = cache.update(k, v)
        if window is not None:
            w, qpos = window
            j = torch.arange(keys.shape[-2], device=keys.device)
            band = ((j <= qpos[..., None]) & (qpos[..., None] - j < w))[:, None]  # (B|1, 1, T, L)
            mask, causal = (band if mask is None else mask & band), False
        if rows is not None:  # queries of some batch rows only: zero queries for the others
            q = q.new_zeros(keys.shape[0], *q.shape[1:]).index_copy_(0, rows, q)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=self.gqa)
        if rows is not None:
            y = y.index_select(0, rows)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*E)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """A pre-norm transformer block (attention + MLP), as Hugging Face's `LlamaDecoderLayer`."""

    routed = False

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        # the window of a block outside the routed pattern (used by `forward`, which routed blocks do not run)
        self.local_window = 0 if cfg.routing.in_pattern(layer_id) else cfg.local_window
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.moe.is_moe(layer_id):
            from .moe import MoE  # moe imports this module

            self.mlp = MoE(cfg)
        else:
            self.mlp = MLP(cfg)

    def delta(self, x: torch.Tensor, cos, sin, cache=None, mask=None, window=None) -> torch.Tensor:
        """f(x): what the block adds to the residual stream, (B, T, D) -> (B, T, D)."""
        a = self.self_attn(self.input_layernorm(x), cos, sin, cache, mask, window)
        return a + self.mlp(self.post_attention_layernorm(x + a))

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, position_ids, *, cache=None, **_) -> tuple:
        cos, sin = rope(position_ids)
        slot = cache.dense_slot(self.layer_id) if cache is not None else None
        window = (self.local_window, position_ids) if self.local_window else None
        return x + self.delta(x, cos, sin, slot, window=window), None

    def decode_static(self, x: torch.Tensor, cos, sin, cache, active: torch.Tensor) -> torch.Tensor:
        """One static-shape decode step (`mixdepth.static`): every row runs the block, (B, 1, D) ->
        (B, 1, D); a row that is not `active` (B,) stores its key and value in the spare slot."""
        return x + self.delta(x, cos, sin, cache.static_slot(self.layer_id, active))
