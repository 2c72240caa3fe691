"""Analytic FLOP, parameter and KV-byte accounting for any `ModelConfig` (paper section 3.3).

Conventions (checked against `torch.utils.flop_counter.FlopCounterMode` in the tests):
- A matmul of (m x n) by (n x p) costs 2*m*n*p FLOPs. Only matmuls are counted: the embedding
  lookup, norms, activations, softmax, RoPE, gather/scatter and top-k are excluded.
- Attention counts the full T x S score matrix (QK^T and AV), causal or not: this is what
  `FlopCounterMode` reports under the math SDPA backend. A causal kernel that skips the masked
  half does less work than this count.
- A routed layer counts k = ceil(C*T) tokens through its block and k^2 attention, plus its
  router's own cost on all T tokens (`Router.flops_per_token`: the router's dot product, and the
  expert-choice predictor where it runs).
- With `routing.unit` `attn` or `mlp`, k tokens go through that unit and all T through the other;
  attention is T x T when only the MLP is routed.
- A training step is forward + backward = 3x the forward, less the input gradient of the
  predictor's first layer, which is never computed (its input is detached).
- Decoding counts the expected cost per token at a context length, with a routed layer's block
  run for a fraction f (default: the capacity) of tokens and attending over f of the context.
- A MoE MLP counts its router (D x E') on every token that reaches the MLP, and `top_k` experts
  per token, times the non-no-op share (1 - `noop_fraction`) for integrated MoDE: the expected
  work. Capacity drops in training can only lower it; grouped_mm is not seen by `FlopCounterMode`,
  so the tests count the loop implementation. Parameters are counted in total and active (the
  expert weights one token uses).
"""

from __future__ import annotations

import dataclasses
import math

from .config import ModelConfig
from .model.routers import router_class


def _attn_matmul_params(cfg: ModelConfig) -> int:
    """Weights of the q, k, v and o projections."""
    q = cfg.n_heads * cfg.head_dim
    kv = cfg.n_kv_heads * cfg.head_dim
    return cfg.dim * q + 2 * cfg.dim * kv + q * cfg.dim


def _expert_width(cfg: ModelConfig) -> int:
    return cfg.moe.ffn_dim or cfg.ffn_dim


def _experts_per_token(cfg: ModelConfig) -> float:
    """Expected experts (not the no-op) one token runs: top_k, times the non-no-op share."""
    m = cfg.moe
    return m.top_k * ((1 - m.noop_fraction) if m.noop else 1.0)


def _mlp_matmul_params(cfg: ModelConfig, layer: int, active: bool = True) -> float:
    """Weights of a layer's MLP matmuls one token uses (`active`) or that exist (incl. the MoE router)."""
    if not cfg.moe.is_moe(layer):
        return 3 * cfg.dim * cfg.ffn_dim
    m = cfg.moe
    experts = _experts_per_token(cfg) if active else m.n_experts
    return experts * 3 * cfg.dim * _expert_width(cfg) + cfg.dim * (m.n_experts + int(m.noop))


def _block_matmul_params(cfg: ModelConfig, layer: int = 0) -> float:
    """Weights of one block's matmuls a token uses: q, k, v, o and the MLP (its active experts)."""
    return _attn_matmul_params(cfg) + _mlp_matmul_params(cfg, layer)




def _routed_split(cfg: ModelConfig, layer: int) -> tuple[float, float]:
    """A routed layer's matmul weights per token: (behind the router, run by every token), by `routing.unit`."""
    attn, mlp = _attn_matmul_params(cfg), _mlp_matmul_params(cfg, layer)
    return {"block": (attn + mlp, 0.0), "attn": (attn, mlp), "mlp": (mlp, attn)}[cfg.routing.unit]


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by part. `total` counts a tied embedding once."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    biases = (q + 2 * kv) * cfg.qkv_bias + cfg.dim * cfg.o_bias
    mlp_biases = (2 * cfg.ffn_dim + cfg.dim) * cfg.mlp_bias  # dense MLPs only: the experts have none
    # + two RMSNorm weights (and the per-head q/k norms of Qwen3)
    block = _attn_matmul_params(cfg) + biases + 2 * cfg.dim + 2 * cfg.head_dim * cfg.qk_norm
    blocks = sum(block + int(_mlp_matmul_params(cfg, i, active=False)) + (0 if cfg.moe.is_moe(i) else mlp_biases)
                 for i in range(cfg.n_layers))
    idle = sum(_mlp_matmul_params(cfg, i, active=False) - _mlp_matmul_params(cfg, i) for i in range(cfg.n_layers))
    n_routed = len(cfg.routed_layer_ids)
    parts = router_class(cfg).param_counts(cfg)  # the router's own parts, by name
    embedding = cfg.vocab_size * cfg.dim
    head = 0 if cfg.tie_embeddings else embedding
    routing = {name: n_routed * n for name, n in parts.items()}
    total = embedding + head + blocks + cfg.dim + sum(routing.values())
    return {"total": total, "embedding": embedding, "lm_head": head, "blocks": blocks, **routing,
            "non_embedding": total - embedding, "active": round(total - idle)}  # expected for the no-op: rounded


def _attn_flops(cfg: ModelConfig, t: float, s: float) -> float:
    """QK^T and AV for t queries over s keys, all heads."""
    return 4 * t * s * cfg.n_heads * cfg.head_dim


def forward_flops(cfg: ModelConfig, seq_len: int, batch_size: int = 1, *, mode: str = "topk",
                  routed_fraction: float | None = None) -> float:
    """FLOPs of one forward pass over `batch_size` sequences of `seq_len` tokens.

    In `topk` mode a routed layer runs k = ceil(C*T) tokens; in `dense` mode all T; in `causal`
    mode the expected `routed_fraction` (default: the capacity) of them.
    """
    T = seq_len
    routed = set(cfg.routed_layer_ids)
    total = 0.0
    for i in range(cfg.n_layers):
        pm = _block_matmul_params(cfg, i)
        if i not in routed:
            total += 2 * T * pm + _attn_flops(cfg, T, T)
            continue
        if mode == "dense":
            k = T
        elif mode == "causal":
            k = T * (cfg.routing.capacity if routed_fraction is None else routed_fraction)
        else:
            k = cfg.routing.k(T)
        rp, ap = _routed_split(cfg, i)
        attn = _attn_flops(cfg, T, T) if cfg.routing.unit == "mlp" else _attn_flops(cfg, k, k)
        total += 2 * k * rp + 2 * T * ap + attn + T * router_class(cfg).flops_per_token(cfg, mode)
    total += 2 * T * cfg.dim * cfg.vocab_size  # lm_head
    return batch_size * total


def train_step_flops(cfg: ModelConfig, seq_len: int, batch_size: int = 1) -> float:
    """FLOPs of one training step (forward + backward) on `batch_size` x `seq_len` tokens."""
    fwd = forward_flops(cfg, seq_len, batch_size)
    unspent = router_class(cfg).untrained_flops_per_token(cfg) * seq_len * len(cfg.routed_layer_ids)
    return 3 * fwd - batch_size * unspent


def decode_flops_per_token(cfg: ModelConfig, context_len: int, routed_fraction: float | None = None) -> float:
    """Expected FLOPs to generate one token with `context_len` tokens already cached."""
    f = cfg.routing.capacity if routed_fraction is None else routed_fraction
    routed = set(cfg.routed_layer_ids)
    router = router_class(cfg).flops_per_token(cfg, "causal")
    total = 2 * cfg.dim * cfg.vocab_size
    for i in range(cfg.n_layers):
        pm = _block_matmul_params(cfg, i)
        if i in routed:
            rp, ap = _routed_split(cfg, i)
            attn = (_attn_flops(cfg, 1, context_len + 1) if cfg.routing.unit == "mlp"
                    else f * _attn_flops(cfg, 1, f * context_len + 1))
            total += router + f * 2 * rp + 2 * ap + attn
        else:
            total += 2 * pm + _attn_flops(cfg, 1, context_len + 1)
    return total


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 4, routed_fraction: float | None = None) -> float:
    """Expected bytes of keys and values cached per token (all layers)."""
    f = cfg.routing.capacity if routed_fraction is None else routed_fraction
    per_layer = 2 * cfg.n_kv_heads * cfg.head_dim * dtype_bytes
    n_routed = len(cfg.kv_routed_layer_ids)
    return per_layer * ((cfg.n_layers - n_routed) + f * n_routed)


def dense_twin(cfg: ModelConfig) -> ModelConfig:
    """The dense baseline at the same dimensions (no routers); for MoE, of the same active size: a
    dense MLP as wide as the `top_k` experts a token runs when it does not take the no-op."""
    twin = dataclasses.replace(cfg, routing=dataclasses.replace(cfg.routing, router="none"))
    if cfg.moe.n_experts:
        twin = dataclasses.replace(twin, ffn_dim=_expert_width(cfg) * cfg.moe.top_k,
                                   moe=dataclasses.replace(cfg.moe, n_experts=0, noop=False))
    return twin


def ideal_speedup(cfg: ModelConfig, seq_len: int, kind: str = "train", context_len: int = 0) -> float:
    """Dense FLOPs / MoD FLOPs: the speed-up a perfectly efficient implementation would show."""
    dense = dense_twin(cfg)
    if kind == "train":
        return train_step_flops(dense, seq_len) / train_step_flops(cfg, seq_len)
    if kind == "prefill":
        return forward_flops(dense, seq_len) / forward_flops(cfg, seq_len)
    if kind == "decode":
        return decode_flops_per_token(dense, context_len) / decode_flops_per_token(cfg, context_len)
    raise ValueError(f"kind must be train, prefill or decode, got {kind!r}")


def variant_name(cfg: ModelConfig) -> str:
    """`mod`, `moe`, `staged-mode`, `integrated-mode`, a router's name, or `dense`."""
    router, moe = cfg.routing.router, cfg.moe
    if moe.n_experts:
        if moe.noop:
            return "integrated-mode"
        return "moe" if router == "none" else ("staged-mode" if router == "expert_choice" else f"moe+{router}")
    return "dense" if router == "none" else router


def steps_for_budget(cfg: ModelConfig, flop_budget: float, seq_len: int, batch_size: int) -> int:
    """Training steps of `batch_size` x `seq_len` tokens that fit in `flop_budget` FLOPs (isoFLOP)."""
    if flop_budget <= 0:
        raise ValueError(f"FLOP budget must be > 0, got {flop_budget}")
    return max(1, math.floor(flop_budget / train_step_flops(cfg, seq_len, batch_size)))


def flops_table(cfg: ModelConfig, seq_len: int, batch_size: int = 1, context_len: int | None = None) -> list[dict]:
    """Rows comparing `cfg` with its dense twin, for `mixdepth flops`."""
    context_len = seq_len if context_len is None else context_len
    rows = []
    for name, c in (("dense", dense_twin(cfg)), (variant_name(cfg), cfg)):
        p = param_counts(c)
        rows.append({
            "model": name,
            "params": p["total"],
            "active_params": p["active"],
            "fwd_flops_per_seq": forward_flops(c, seq_len),
            "train_flops_per_step": train_step_flops(c, seq_len, batch_size),
            "decode_flops_per_token": decode_flops_per_token(c, context_len),
            "kv_bytes_per_token_fp32": kv_bytes_per_token(c, 4),
        })
    base = rows[0]
    for r in rows:
        r["train_ratio_vs_dense"] = r["train_flops_per_step"] / base["train_flops_per_step"]
        r["decode_ratio_vs_dense"] = r["decode_flops_per_token"] / base["decode_flops_per_token"]
    return rows


def format_table(rows: list[dict]) -> str:
    cols = list(rows[0])

    def fmt(v):
        if isinstance(v, str):
            return v
        if isinstance(v, float) and v < 10:
            return f"{v:.3f}"
        return f"{v:.4g}" if isinstance(v, float) else f"{v:,}"

    cells = [[c for c in cols]] + [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(s.rjust(w) for s, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
