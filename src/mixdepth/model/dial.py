"""The compute dial that holds: each row's routed fraction kept at what it asked, whatever the text.

A calibrated threshold routes the asked fraction of the *calibration* tokens; on other text the
causal scores shift and the fraction drifts with them (the tuned SmolLM2 asked for 0.9 routed
28-68% of chat answers). The `hold` rule decides each token of a row, at each routed layer, from
that row's own scores, causally:

1. Rank (a causal top-k): the token enters if its score would be in the top `fraction` of a
   window of the row's `WINDOW` previous scores at this layer, i.e. if fewer than
   `fraction * (m + 1)` of the m scores held exceed it. The window starts filled with `WINDOW`
   quantiles of the calibration scores (the threshold table), so a row's first tokens are
   decided as the calibrated threshold would; the row's own scores push them out one by one. An
   uncalibrated layer starts with an empty window.
2. Quota: a row that has routed more than `SLACK` tokens above `fraction * tokens` lets no
   further token in until it is back within; one as far below takes the next tokens whatever
   their scores. So after n tokens the routed fraction is within (SLACK + 1) / n of the target
   on any text; the rank alone keeps the quota from acting in the common case.

Both depend only on the row's earlier tokens and the token itself: causal, and a prompt decided
in one forward call equals the same tokens decided one by one (tested). The state of a row, per
routed layer, is the window (on the device), and the tokens seen and routed (on the host, where
the quota is decided: a routed layer's decision is read on the host anyway).

Dimensions: B rows, T tokens, W window.
"""

from __future__ import annotations

import math

import numpy as np
import torch

WINDOW = 64
"""Previous scores a token is ranked against."""

SLACK = 2
"""Tokens a row may be above or below its quota before the quota decides alone."""

RULES = ("hold", "threshold")
"""How an asked routed fraction is reached: `hold` (this module) or `threshold` (the calibration
table's threshold for that fraction, `MoDBlock.threshold_for`)."""

DEFAULT_RULE = "hold"
"""The rule of an asked fraction unless one is named (README: its cost against `threshold`)."""


def prior_window(table: torch.Tensor, window: int = WINDOW) -> torch.Tensor:
    """(W,) the calibration scores' quantiles a row's window starts with, from a layer's threshold
    table (thresholds for fractions 0, 0.001, ..., 1; NaN when uncalibrated: an empty window)."""
    if torch.isnan(table).any():
        return torch.full((window,), float("nan"), device=table.device)
    n = table.numel() - 1
    picks = [round((i + 0.5) / window * n) for i in range(window)]
    return table[picks].float().clamp(-3e38, 3e38)


class LayerDial:
    """One routed layer's dial state for B rows."""

    def __init__(self, prior: torch.Tensor, batch_size: int) -> None:
        self.prior = prior  # (W,)
        self.window = prior[None].repeat(batch_size, 1)  # (B, W), oldest first
        self.seen = np.zeros(batch_size, dtype=np.int64)
        self.routed = np.zeros(batch_size, dtype=np.int64)

    def reset_row(self, b: int) -> None:
        self.window[b] = self.prior
        self.seen[b] = self.routed[b] = 0

    def copy_row(self, src: LayerDial, src_row: int, dst_row: int) -> None:
        self.window[dst_row] = src.window[src_row]
        self.seen[dst_row], self.routed[dst_row] = src.seen[src_row], src.routed[src_row]

    def decide(self, score: torch.Tensor, fraction: np.ndarray, valid: torch.Tensor | None) -> torch.Tensor:
        """Decide the tokens of one call and advance the state.

        Args:
            score: (B, T) causal scores.
            fraction: (B,) host float: each row's target (NaN: the row does not use the dial; its
                decisions here are ignored by the caller and its state is left alone).
            valid: (B, T) bool, real tokens (right padding after them), or None for all.

        Returns:
            (B, T) bool on the device of `score`.
        """
        B, T = score.shape
        W = self.window.shape[1]
        s = score.detach().float()
        seq = torch.cat([self.window, s], dim=1)  # (B, W + T)
        ahead = seq.unfold(1, W, 1)[:, :T]  # (B, T, W): the W scores before each token
        above = (ahead > s[..., None]).sum(-1)  # (B, T); NaN (empty) entries never count
        held = (~torch.isnan(ahead)).sum(-1)  # (B, T)
        counts = np.ones((B, T), dtype=bool) if valid is None else valid.cpu().numpy()
        above, held = above.cpu().numpy(), held.cpu().numpy()  # one host transfer per layer
        use = ~np.isnan(fraction)
        f = np.where(use, fraction, 0.0)
        rank_ok = above < f[:, None] * (held + 1)  # (B, T)
        chosen = np.zeros((B, T), dtype=bool)
        seen, routed = self.seen.copy(), self.routed.copy()
        for t in range(T):  # the quota: sequential in t, vectorized over rows
            real = counts[:, t] & use
            quota = f * (seen + 1)
            c = np.where(routed < quota - SLACK, True, np.where(routed + 1 > quota + SLACK, False, rank_ok[:, t]))
            c &= real
            chosen[:, t] = c
            seen += real
            routed += c
        self.seen = np.where(use, seen, self.seen)
        self.routed = np.where(use, routed, self.routed)
        # the window keeps each row's last W real scores
        n = torch.from_numpy(counts.sum(1) * use).to(seq.device)  # (B,) real tokens this call
        idx = n[:, None] + torch.arange(W, device=seq.device)  # (B, W)
        self.window = seq.gather(1, idx)
        return torch.from_numpy(chosen).to(score.device)


class Dial:
    """Per-row routed fractions held by the `hold` rule, with one `LayerDial` per routed layer.

    Made by `MoDTransformer.make_dial` (for a forward without a cache) or kept by a `KVCache`
    (`KVCache.set_fraction`). A row whose fraction is NaN does not use the dial: its layers use
    their threshold.
    """

    def __init__(self, layers: dict[int, LayerDial], batch_size: int) -> None:
        self.layers = layers
        self.fraction = np.full(batch_size, np.nan)

    @classmethod
    def for_model(cls, model, batch_size: int, window: int = WINDOW) -> Dial:
        layers = {layer.layer_id: LayerDial(prior_window(layer.threshold_table, window), batch_size)
                  for layer in model.routed_layers}
        return cls(layers, batch_size)

    def set_fraction(self, row: int | None, fraction: float | None) -> None:
        """Hold row `row` (None: every row) at `fraction` (None: the row stops using the dial)."""
        if fraction is not None and (not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1
                                     or math.isnan(fraction)):
            raise ValueError(f"routed fraction must be in [0, 1], got {fraction}")
        rows = slice(None) if row is None else row
        self.fraction[rows] = np.nan if fraction is None else float(fraction)

    @property
    def active(self) -> bool:
        return bool((~np.isnan(self.fraction)).any())

    def reset_row(self, b: int) -> None:
        self.fraction[b] = np.nan
        for layer in self.layers.values():
            layer.reset_row(b)

    def copy_row(self, src: Dial, src_row: int, dst_row: int) -> None:
        self.fraction[dst_row] = src.fraction[src_row]
        for lid, layer in self.layers.items():
            layer.copy_row(src.layers[lid], src_row, dst_row)
