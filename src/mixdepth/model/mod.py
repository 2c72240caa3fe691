"""The Mixture-of-Depths layer: route -> gather -> block -> gate -> scatter (paper section 3).

For a routed layer with router scores r (B, T) and chosen token indices idx (B, K):

    x' = x + scatter(idx, gate(r[idx]) * f(x[idx]))

The block f (attention + MLP) runs on the K gathered tokens only: real compute skipping, not a
mask. The gathered tokens keep their sequence order and their original position ids, so RoPE and
causal attention see them exactly as in the full sequence. The gate multiplies only the block's
*output* (never the residual), which puts the router on the gradient path.

What depends on the kind of router (its gate, selection, causal score and losses) lives in the
router (`mixdepth.model.routers`); this module only moves tokens.

Modes (DESIGN.md section 3):
- `topk`: k = ceil(C*T) tokens per sequence chosen by the router (static k; non-causal).
- `causal`: each token decides alone from its own causal score against a threshold; the number
  chosen varies per row; used for sampling and its evaluation.
- `dense`: every token goes through (gate still applied; exact for the straight-through gate).

Causal thresholds are calibrated on data (`MoDTransformer.calibrate_causal`): each lies midway
between two distinct calibration scores (`thresholds_for_fractions`), never on a score, so tokens
whose scores tie (a token that skipped every earlier routed layer still holds its embedding, and
equal tokens score equally) are decided alike however the kernels round.

Dimensions: B batch, T tokens, K gathered tokens, D model width, N rows that run the block.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import ModelConfig
from .layers import Block, RotaryEmbedding
from .routers import chosen_first, make_router

N_FRACTIONS = 1001  # calibration table: thresholds for routed fractions 0, 0.001, ..., 1
TIE_TOLERANCE = 1e-5  # scores closer than this (relative to the largest) count as equal


def thresholds_for_fractions(scores: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Thresholds t such that `score > t` routes as close to each fraction of `scores` as ties allow.

    Every finite threshold lies midway between two distinct scores, so a score equal to a
    calibration score is decided the same way under any float rounding; scores within a relative
    `TIE_TOLERANCE` of each other count as one value (kernels round differently). Fraction 0 gives
    +inf (no token) and 1 gives -inf (every token).

    Args:
        scores: causal scores of calibration tokens, any shape.
        fractions: (F,) target fractions in [0, 1].

    Returns:
        (F,) fp32 thresholds.
    """
    s = scores.detach().flatten().double().sort().values  # (N,)
    s = s[~torch.isnan(s)]
    n = s.numel()
    if n == 0:
        raise ValueError("no calibration scores")
    tol = TIE_TOLERANCE * float(s.abs().max()) + 1e-30
    cut = ((s[1:] - s[:-1]) > tol).nonzero().squeeze(1)  # (C,) between s[i] and s[i+1]: n-1-i tokens above
    inf = torch.tensor([float("inf")], dtype=torch.float64)
    counts = torch.cat([torch.zeros(1), (n - 1 - cut).flip(0).double(), torch.full((1,), float(n))])  # ascending
    thresholds = torch.cat([inf, ((s[cut] + s[cut + 1]) / 2).flip(0), -inf])
    want = fractions.detach().double().cpu() * n
    hi = torch.searchsorted(counts, want).clamp(1, counts.numel() - 1)
    lo = hi - 1
    pick = torch.where(want - counts[lo] <= counts[hi] - want, lo, hi)
    return thresholds[pick].float()


class MoDBlock(Block):
    """A transformer block behind a Mixture-of-Depths router.

    State-dict keys add the router's (`router.weight`, `predictor.fc{1,2}.*`) and two calibration
    buffers: `causal_threshold` (the causal decision is score > threshold) and `threshold_table`
    (the threshold for each routed fraction 0, 0.001, ..., 1, for moving the operating point
    without data).
    """

    routed = True

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__(cfg, layer_id)
        self.rc = cfg.routing
        self.router = make_router(cfg)
        for name, module in self.router.companions.items():
            self.add_module(name, module)
        self.reset_calibration()

    def reset_calibration(self, device: str | torch.device | None = None) -> None:
        """Uncalibrated: no table (NaN) and threshold -inf, until `calibrate` sets them.

        A layer never calibrated (a fresh conversion, a model before its first causal evaluation)
        lets every token through in causal mode: the block's dense function, the one operating
        point that needs no data. This is the library's one decision for uncalibrated routers, so
        every entry point (forward, `generate`, the CLI, the transformers model, the server) shares it.
        """
        self.register_buffer("causal_threshold", torch.full((), float("-inf"), device=device))
        self.register_buffer("threshold_table", torch.full((N_FRACTIONS,), float("nan"), device=device))

    @property
    def calibrated(self) -> bool:
        return not bool(torch.isnan(self.threshold_table).any())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # checkpoints saved before the rule above hold threshold 0 beside an empty table
        table = state_dict.get(prefix + "threshold_table")
        if table is not None and not table.is_meta and bool(torch.isnan(table).any()):
            self.causal_threshold.fill_(float("-inf"))

    # ---- the causal operating point --------------------------------------------------------------
    def calibrate(self, scores: torch.Tensor, fraction: float) -> float:
        """Set the threshold table from calibration scores, and the threshold to route `fraction`."""
        grid = torch.linspace(0, 1, N_FRACTIONS, dtype=torch.float64)
        self.threshold_table.copy_(thresholds_for_fractions(scores, grid))
        self.causal_threshold.fill_(float(thresholds_for_fractions(scores, torch.tensor([fraction]))[0]))
        return float(self.causal_threshold)

    def threshold_for(self, fraction: float) -> torch.Tensor:
        """The threshold that routes `fraction` of the calibration tokens (to 0.001), from the table.

        Fractions 0 and 1 need no calibration: +inf lets no token in and -inf every token (the
        block's dense function), which is what the table holds at its ends.
        """
        if not 0 <= fraction <= 1:
            raise ValueError(f"routed fraction must be in [0, 1], got {fraction}")
        if fraction in (0, 1):
            return torch.full((), float("inf") if fraction == 0 else float("-inf"), device=self.threshold_table.device)
        table = self.threshold_table
        if torch.isnan(table).any():
            raise ValueError(f"layer {self.layer_id} has no calibration table: run calibrate_causal first")
        return table[round(fraction * (N_FRACTIONS - 1))].clone()

    def set_causal_fraction(self, fraction: float) -> None:
        """Move the causal threshold so that `fraction` of calibration tokens enter the block."""
        self.causal_threshold.copy_(self.threshold_for(fraction))

    # ---- pieces -------------------------------------------------------------------------------
    def _run_block(self, x, rope: RotaryEmbedding, pos, idx, valid, r, cache_slot=None):
        """Gather idx (B, K), run the block, gate it, scatter-add back into x (B, T, D)."""
        B, T, D = x.shape
        K = idx.shape[1]
        idx_d = idx[..., None].expand(B, K, D)
        xs = x.gather(1, idx_d)  # (B, K, D)
        cos, sin = rope(pos.gather(1, idx))
        delta = self.routed_delta(xs, cos, sin, cache_slot)  # (B, K, D)
        g = self.router.gate(r.gather(1, idx))  # (B, K)
        if valid is not None:
            g = g * valid
        return x.scatter_add(1, idx_d, delta * g[..., None].to(delta.dtype))

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x, rope, position_ids, *, mode="topk", cache=None, valid=None, want_scores=False,
                threshold=None, calibrate=None, relax=None, prev_ids=None, dial=None):
        """Returns (x', info). info holds `chosen` (B, T), `losses` (name -> tensor) and statistics.

        `threshold` overrides the calibrated causal threshold for this call (a per-call routed
        fraction); the module itself is never changed by a forward, except with `calibrate` (a
        fraction, causal mode): the layer then first calibrates itself on this call's scores.
        `relax` (a fraction, dense mode) trains routers of a frozen model: see `_forward_relaxed`.
        `prev_ids` (B, T): the token before each token (-1 before the first), for routers that read
        token ids (`Router.needs_ids`). `dial` (a `mixdepth.model.dial.Dial`, causal mode): its rows
        with a fraction are decided by the `hold` rule instead of the threshold.

        With `routing.unit` `mlp`, every token runs attention (and is cached) first, and the router
        then decides who runs the MLP; with `attn`, the router decides who runs attention, and every
        token runs the MLP after it.
        """
        B, T, D = x.shape
        pos = position_ids.expand(B, T)
        if self.rc.unit == "mlp":
            cos, sin = rope(pos)
            slot = cache.dense_slot(self.layer_id) if cache is not None else None
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, slot)
        if relax is not None:
            out, info = self._forward_relaxed(x, pos, rope, relax, valid)
        else:
            out, info = self._route(x, pos, rope, mode, cache, valid, want_scores, threshold, calibrate, prev_ids,
                                    dial)
        if self.rc.unit == "attn":
            out = out + self.mlp(self.post_attention_layernorm(out))
        return out, info

    def routed_delta(self, xs: torch.Tensor, cos, sin, cache_slot=None, mask=None) -> torch.Tensor:
        """f(x) of the routed unit, (B, K, D) -> (B, K, D): the block, its attention or its MLP."""
        if self.rc.unit == "block":
            return self.delta(xs, cos, sin, cache_slot, mask)
        if self.rc.unit == "attn":
            return self.self_attn(self.input_layernorm(xs), cos, sin, cache_slot, mask)
        return self.mlp(self.post_attention_layernorm(xs))

    def _slot(self, cache, counts, positions, **rows):
        """The cache slot of the routed tokens (None when only the MLP is routed: attention was cached
        for every token)."""
        if cache is None or self.rc.unit == "mlp":
            return None
        return cache.routed_slot(self.layer_id, counts, positions, **rows)

    def _forward_relaxed(self, x, pos, rope, fraction: float, valid):
        """Every token runs the unit; its output is kept where the causal score is in the top
        `fraction` of this call's tokens, by a hard 0/1 gate whose gradient is a sigmoid's around
        that cut (straight-through). Attention reads the chosen tokens (and each token itself), so
        a chosen token computes exactly what it computes gathered, and a skipped one what it
        would if it alone were added. So the forward is what sampling at `fraction` computes (the
        cut being this batch's quantile instead of a calibrated threshold), and every token,
        chosen or not, tells the router by its gradient whether the unit's output would help it,
        which `topk` mode can only tell of the chosen ones.
        """
        r = self.router(x)  # (B, T)
        score = self.router.causal_score(x, r)
        s = score.detach()
        live = s if valid is None else s[valid]
        if 0 < fraction < 1:
            cut = torch.quantile(live.float(), 1 - fraction)
        else:
            cut = live.min() - 1 if fraction else live.max() + 1
        chosen = s > cut
        if valid is not None:
            chosen = chosen & valid
        width = live.std(unbiased=False).clamp_min(1e-6)
        soft = torch.sigmoid((score - cut) / width)
        gate = chosen.float() + soft - soft.detach()  # (B, T): value 0 or 1
        cos, sin = rope(pos)
        T = x.shape[1]
        eye = torch.eye(T, dtype=torch.bool, device=x.device)
        keys = (chosen[:, None, None, :] | eye) & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        gate = gate * self.router.gate(r)  # the gate sampling applies (1 for straight-through)
        out = x + self.routed_delta(x, cos, sin, mask=keys) * gate[..., None].to(x.dtype)  # keys: (B, 1, T, T)
        if valid is None:
            losses, _ = self.router.topk_terms(x, r, chosen.float())
            frac = chosen.float().mean()
        else:  # padding neither trains the router nor counts
            losses, _ = self.router.topk_terms(x[valid][None], r[valid][None], chosen[valid][None].float())
            frac = chosen.sum() / valid.sum().clamp(min=1)
        return out, {"losses": losses, "chosen": chosen, "frac": frac}

    def _route(self, x, pos, rope, mode, cache, valid, want_scores, threshold, calibrate, prev_ids=None, dial=None):
        B, T, D = x.shape
        r = self.router(x, prev_ids) if self.router.needs_ids else self.router(x)  # (B, T) fp32
        info: dict = {"losses": {}}
        if mode == "dense":
            chosen = torch.ones(B, T, dtype=torch.bool, device=x.device) if valid is None else valid
            slot = self._slot(cache, chosen.sum(1).cpu(), pos) if cache is not None else None
            cos, sin = rope(pos)
            out = x + self.routed_delta(x, cos, sin, slot) * self.router.gate(r)[..., None].to(x.dtype)
            info["chosen"] = chosen
            return out, info
        if mode == "topk":
            if cache is not None:
                raise ValueError("topk routing reads future tokens and cannot run with a KV cache; use causal")
            return self._forward_topk(x, rope, pos, r, info, want_scores)
        if calibrate is not None:
            score = self.router.causal_score(x, r)
            self.calibrate(score if valid is None else score[valid], calibrate)
        t = self.causal_threshold if threshold is None else threshold
        return self._forward_causal(x, rope, pos, r, info, cache, valid, want_scores, t, dial)

    def _forward_topk(self, x, rope, pos, r, info, want_scores):
        k = self.rc.k(x.shape[1])
        if k == 0:  # capacity 0: the block is dropped
            out, target = x, torch.zeros_like(r)
        else:
            idx, valid = self.router.select(r, k)
            out = self._run_block(x, rope, pos, idx, valid, r)
            target = torch.zeros_like(r).scatter(1, idx, 1.0 if valid is None else valid.float())
        info["chosen"] = target.bool()
        info["frac"] = target.mean()
        info["losses"], score = self.router.topk_terms(x, r, target)
        if score is not None:
            # how well the causal rule agrees with the top-k choice here (a statistic only)
            info["causal_acc"] = ((score > self.causal_threshold) == info["chosen"]).float().mean()
            if want_scores:
                info["score"] = score
        return out, info

    def _topk_mask(self, r: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: the tokens `topk` mode would choose from these router scores."""
        k = self.rc.k(r.shape[1])
        if k == 0:
            return torch.zeros_like(r, dtype=torch.bool)
        idx, valid = self.router.select(r, k)
        return torch.zeros_like(r, dtype=torch.bool).scatter(1, idx, True if valid is None else valid)

    def _forward_causal(self, x, rope, pos, r, info, cache, valid, want_scores, threshold, dial=None):
        B, T, _ = x.shape
        score = self.router.causal_score(x, r)  # (B, T)
        chosen = score > threshold
        if dial is not None and dial.active:  # rows with a fraction of their own: the dial decides
            held = dial.layers[self.layer_id].decide(score, dial.fraction, valid, dial.hold)
            use = torch.from_numpy(~np.isnan(dial.fraction)).to(x.device)
            chosen = torch.where(use[:, None], held, chosen)
        if valid is not None:
            chosen = chosen & valid
        info["chosen"] = chosen
        if cache is None:  # cached steps are counted by the caller from `chosen` (no extra ops per step)
            info["frac"] = chosen.float().mean() if valid is None else chosen.sum() / valid.sum().clamp(min=1)
            # how well the causal rule agrees with what top-k would pick here (a statistic only)
            info["causal_acc"] = (chosen == self._topk_mask(r)).float().mean()
        if want_scores:
            info["score"] = score.detach()
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
            slot = self._slot(cache, counts, pos.gather(1, idx))
            return self._run_block(x, rope, pos, idx, ok, r, slot), info
        rows = rows_host.to(x.device, non_blocking=True)
        xr, cr, pr, rr = x[rows], chosen[rows], pos[rows], r[rows]  # (N, T, ...)
        idx, ok = chosen_first(cr, K)
        slot = self._slot(cache, counts[rows_host], pr.gather(1, idx), rows=rows, rows_host=rows_host)
        out_rows = self._run_block(xr, rope, pr, idx, ok, rr, slot)
        return x.index_copy(0, rows, out_rows), info

    # ---- static-shape decoding (mixdepth.static) ----------------------------------------------
    # A decode step split in three, so the caller can skip `run_static` when no row chose the block
    # (a CUDA graph conditional node, torch.cond, or a host `if` on a CPU).
    def decide_static(self, x, cos, sin, cache, active, threshold=None):
        """(B, 1, D) -> (x, router scores (B, 1), chosen (B,) bool): the causal decision of each
        active row. With `routing.unit` `mlp`, every active row runs attention first."""
        if self.rc.unit == "mlp":
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache.static_slot(self.layer_id, active))
        r = self.router(x)  # (B, 1)
        t = self.causal_threshold if threshold is None else threshold
        return x, r, (self.router.causal_score(x, r) > t)[:, 0] & active

    def run_static(self, x, r, chosen, cos, sin, cache):
        """The routed unit for every row, kept for the `chosen` ones: the others neither change
        their residual (a select, not a multiply: their discarded output may be anything) nor
        store a key or value (spare slot). The weights are read once, whoever chose."""
        slot = cache.static_slot(self.layer_id, chosen) if self.rc.unit != "mlp" else None
        delta = self.routed_delta(x, cos, sin, slot)  # (B, 1, D)
        gated = delta * self.router.gate(r)[..., None].to(delta.dtype)
        return x + torch.where(chosen[:, None, None], gated, 0.0)

    def finish_static(self, x):
        """What every row runs after the routed unit: the MLP, when only attention is routed."""
        return x + self.mlp(self.post_attention_layernorm(x)) if self.rc.unit == "attn" else x

    def _decode_step(self, x, rope, pos, r, chosen, cache):
        """One new token per row: only the rows whose token chose the block run it (by index)."""
        B = x.shape[0]
        rows_host = chosen[:, 0].cpu().nonzero().squeeze(1)  # (N,) the one host sync of the layer
        N = rows_host.numel()
        if N == 0:  # every row skips: the router (and predictor) was all this layer cost
            return x
        gate = self.router.gate
        if N == B:
            cos, sin = rope(pos)
            delta = self.routed_delta(x, cos, sin, self._slot(cache, torch.ones(B, dtype=torch.long), pos))
            return x + delta * gate(r)[..., None].to(delta.dtype)
        rows = rows_host.to(x.device, non_blocking=True)
        ps = pos.index_select(0, rows)  # (N, 1)
        cos, sin = rope(ps)
        slot = self._slot(cache, torch.ones(N, dtype=torch.long), ps, rows=rows, rows_host=rows_host)
        delta = self.routed_delta(x.index_select(0, rows), cos, sin, slot)  # (N, 1, D)
        return x.index_add(0, rows, delta * gate(r.index_select(0, rows))[..., None].to(delta.dtype))
