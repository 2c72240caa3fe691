"""The Mixture-of-Depths layer: route -> gather -> block -> gate -> scatter (paper section 3).

For a routed layer with router scores r (B, T) and chosen token indices idx (B, K):

    x' = x + scatter(idx, gate(r[idx]) * f(x[idx]))

The block f (attention + MLP) runs on the K gathered tokens only: real compute skipping, not a
mask. The gathered tokens keep their sequence order and their original position ids, so RoPE and
causal attention see them exactly as in the full sequence. The gate multiplies only the block's
*output* (never the residual), which puts the router on the gradient path.

Modes (DESIGN.md section 3):
- `topk`: k = ceil(C*T) highest-scoring tokens per sequence (static k; non-causal).
- `causal`: each token decides alone from its own score (predictor or router logit against a
  threshold); the number chosen varies per row; used for sampling and its evaluation.
- `dense`: every token goes through (gate still applied; exact for the straight-through gate).

Dimensions: B batch, T tokens, K gathered tokens, D model width, N rows that run the block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from .layers import Block, RotaryEmbedding
from .routers import Predictor, balance_loss, chosen_first, make_router, topk_indices

N_QUANTILES = 201  # calibration table: score quantiles at 0%, 0.5%, ..., 100%


class MoDBlock(Block):
    """A transformer block behind a Mixture-of-Depths router.

    State-dict keys add `router.weight`, `predictor.fc{1,2}.*`, and two calibration buffers:
    `causal_threshold` (the causal decision is score > threshold) and `score_quantiles`.
    """

    routed = True

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__(cfg, layer_id)
        self.rc = cfg.routing
        self.router = make_router(self.rc.router, cfg.dim, self.rc.router_init_std)
        self.predictor = None
        if self.rc.router == "expert_choice":
            self.predictor = Predictor(cfg.dim, self.rc.predictor_hidden or max(1, cfg.dim // 8))
        self.register_buffer("causal_threshold", torch.zeros(()))
        self.register_buffer("score_quantiles", torch.full((N_QUANTILES,), float("nan")))

    # ---- pieces -------------------------------------------------------------------------------
    def gate(self, r: torch.Tensor) -> torch.Tensor:
        """Scale of the block output from the router score(s) r."""
        if self.rc.router == "random":
            return torch.ones_like(r)
        if self.rc.gate == "sigmoid":
            return torch.sigmoid(r)
        if self.rc.gate == "straight_through":
            return 1.0 + (r - r.detach())  # value 1, gradient of r
        return r

    def causal_score(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Per-token score from information at or before that token only. (B, T) fp32."""
        if self.rc.router == "random":
            raise ValueError("random routing has no causal decision: it cannot sample or run in causal mode")
        if self.rc.router == "expert_choice" and self.rc.causal_method == "predictor":
            return self.predictor(x)
        return r

    def set_causal_fraction(self, fraction: float) -> None:
        """Move the causal threshold so that `fraction` of calibration tokens enter the block."""
        if not 0 <= fraction <= 1:
            raise ValueError(f"routed fraction must be in [0, 1], got {fraction}")
        q = self.score_quantiles
        if torch.isnan(q).any():
            raise ValueError(f"layer {self.layer_id} has no calibration table: run calibrate_causal first")
        pos = (1 - fraction) * (N_QUANTILES - 1)
        lo = int(pos)
        hi = min(lo + 1, N_QUANTILES - 1)
        t = q[lo] + (q[hi] - q[lo]) * (pos - lo)
        # the ends mean "no token" and "every token" for any score, not the calibration extremes
        if fraction == 0:
            t = float("inf")
        elif fraction == 1:
            t = float("-inf")
        self.causal_threshold.fill_(float(t))

    def _run_block(self, x, rope: RotaryEmbedding, pos, idx, valid, r, cache_slot=None):
        """Gather idx (B, K), run the block, gate it, scatter-add back into x (B, T, D)."""
        B, T, D = x.shape
        K = idx.shape[1]
        idx_d = idx[..., None].expand(B, K, D)
        xs = x.gather(1, idx_d)  # (B, K, D)
        cos, sin = rope(pos.gather(1, idx))
        delta = self.delta(xs, cos, sin, cache_slot)  # (B, K, D)
        g = self.gate(r.gather(1, idx))  # (B, K)
        if valid is not None:
            g = g * valid
        return x.scatter_add(1, idx_d, delta * g[..., None].to(delta.dtype))

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x, rope, position_ids, *, mode="topk", cache=None, valid=None, want_scores=False):
        """Returns (x', info). info holds per-layer losses and statistics as tensors."""
        B, T, D = x.shape
        pos = position_ids.expand(B, T)
        r = self.router(x)  # (B, T) fp32
        info: dict = {}
        if mode == "dense":
            chosen = torch.ones(B, T, dtype=torch.bool, device=x.device) if valid is None else valid
            slot = cache.routed_slot(self.layer_id, chosen.sum(1).cpu(), pos) if cache is not None else None
            cos, sin = rope(pos)
            out = x + self.delta(x, cos, sin, slot) * self.gate(r)[..., None].to(x.dtype)
            info["chosen"] = chosen
            return out, info
        if mode == "topk":
            if cache is not None:
                raise ValueError("topk routing reads future tokens and cannot run with a KV cache; use causal")
            return self._forward_topk(x, rope, pos, r, info, want_scores)
        return self._forward_causal(x, rope, pos, r, info, cache, valid, want_scores)

    def _forward_topk(self, x, rope, pos, r, info, want_scores):
        B, T, _ = x.shape
        k = self.rc.k(T)
        if self.rc.router == "token_choice":
            wants = r > 0
            idx = topk_indices(r.masked_fill(~wants, float("-inf")), k)
            valid = wants.gather(1, idx)
            # valid tokens first, so padding never becomes a key of a valid token
            idx = idx.gather(1, ((~valid).long() * T + idx).argsort(dim=1))
            valid = wants.gather(1, idx)
            info["balance_loss"] = balance_loss(r, self.rc.capacity)
        else:
            idx, valid = topk_indices(r, k), None
        out = self._run_block(x, rope, pos, idx, valid, r)
        target = torch.zeros_like(r).scatter(1, idx, 1.0 if valid is None else valid.float())
        info["chosen"] = target.bool()
        info["frac"] = target.mean()
        if self.rc.router == "expert_choice":
            if self.rc.aux_loss_weight > 0:
                info["aux_loss"] = F.binary_cross_entropy_with_logits(r, target)
            p = self.predictor(x)
            info["predictor_loss"] = F.binary_cross_entropy_with_logits(p, target)
            score = p if self.rc.causal_method == "predictor" else r.detach()
            info["causal_acc"] = ((score > self.causal_threshold) == target.bool()).float().mean()
            if want_scores:
                info["score"] = score.detach()
        elif self.rc.router == "token_choice" and want_scores:
            info["score"] = r.detach()
        return out, info

    def _forward_causal(self, x, rope, pos, r, info, cache, valid, want_scores):
        B, T, _ = x.shape
        score = self.causal_score(x, r)  # (B, T)
        chosen = score > self.causal_threshold
        if valid is not None:
            chosen = chosen & valid
        info["chosen"] = chosen
        if cache is None:  # cached steps are counted by the caller from `chosen` (no extra ops per step)
            info["frac"] = chosen.float().mean() if valid is None else chosen.sum() / valid.sum().clamp(min=1)
        if want_scores:
            info["score"] = score.detach()
        if cache is None and self.rc.router == "expert_choice":
            # how well the causal rule agrees with what top-k would pick here (a statistic only)
            target = torch.zeros_like(r, dtype=torch.bool).scatter(1, topk_indices(r, self.rc.k(T)), True)
            info["causal_acc"] = (chosen == target).float().mean()
        if cache is not None and T == 1:
            return self._decode_step(x, rope, pos, r, chosen, cache), info
        counts = chosen.sum(1).cpu()  # (B,) one host sync: the block's shape depends on it
        K = int(counts.max())
        if K == 0:
            return x, info
        if cache is None:
            idx, ok = chosen_first(chosen, K)
            return self._run_block(x, rope, pos, idx, ok, r), info
        # with a cache: only the rows where some token chose the block run it
        rows_host = counts.nonzero().squeeze(1)  # (N,)
        if rows_host.numel() == B:
            idx, ok = chosen_first(chosen, K)
            slot = cache.routed_slot(self.layer_id, counts, pos.gather(1, idx))
            return self._run_block(x, rope, pos, idx, ok, r, slot), info
        rows = rows_host.to(x.device, non_blocking=True)
        xr, cr, pr, rr = x[rows], chosen[rows], pos[rows], r[rows]  # (N, T, ...)
        idx, ok = chosen_first(cr, K)
        slot = cache.routed_slot(self.layer_id, counts[rows_host], pr.gather(1, idx), rows=rows, rows_host=rows_host)
        out_rows = self._run_block(xr, rope, pr, idx, ok, rr, slot)
        return x.index_copy(0, rows, out_rows), info

    def _decode_step(self, x, rope, pos, r, chosen, cache):
        """One new token per row: only the rows whose token chose the block run it (by index)."""
        B = x.shape[0]
        rows_host = chosen[:, 0].cpu().nonzero().squeeze(1)  # (N,) the one host sync of the layer
        N = rows_host.numel()
        if N == 0:  # every row skips: the router (and predictor) was all this layer cost
            return x
        if N == B:
            cos, sin = rope(pos)
            delta = self.delta(x, cos, sin, cache.routed_slot(self.layer_id, torch.ones(B, dtype=torch.long), pos))
            return x + delta * self.gate(r)[..., None].to(delta.dtype)
        rows = rows_host.to(x.device, non_blocking=True)
        ps = pos.index_select(0, rows)  # (N, 1)
        cos, sin = rope(ps)
        slot = cache.routed_slot(self.layer_id, torch.ones(N, dtype=torch.long), ps, rows=rows, rows_host=rows_host)
        delta = self.delta(x.index_select(0, rows), cos, sin, slot)  # (N, 1, D)
        return x.index_add(0, rows, delta * self.gate(r.index_select(0, rows))[..., None].to(delta.dtype))
