"""The compute dial that holds: each row's routed fraction kept at what it asked, whatever the text.

A calibrated threshold routes the asked fraction of the *calibration* tokens; on other text the
causal scores shift and the fraction drifts with them (the tuned SmolLM2 asked for 0.9 routed
28-68% of chat answers). The `hold` rule decides each token of a row, at each routed layer, from
what that row has routed so far, causally:

1. A first decision: the calibration table's threshold for the asked fraction (`score >
   threshold`), as the `threshold` rule decides. A layer never calibrated has no threshold; it
   ranks instead (a causal top-k): the token passes if its score would be in the top `fraction`
   of the row's last `WINDOW` scores at this layer.
2. A quota: a row that has routed more than its slack above `fraction * tokens` lets no further
   token in until it is back within; one as far below takes the next tokens whatever their
   scores. The slack is `SLACK_FRACTION` of the row's tokens or `SLACK` tokens, whichever is more,
   so after n tokens the routed fraction is within max(SLACK_FRACTION, (SLACK + 1) / n) of the
   target on any text, and on text like the calibration text the quota rarely acts.

Both depend only on the row's earlier tokens and the token itself: causal, and a prompt decided
in one forward call equals the same tokens decided one by one (tested). The state of a row, per
routed layer, is the tokens seen and routed (on the host, where the quota is decided: a routed
layer's decision is read on the host anyway) and, for ranking, the window of scores (on the device).

What it costs against the `threshold` rule on in-distribution text is measured by `mixdepth eval
--compare-rules` (README, "The compute dial"); it is not the default (`DEFAULT_RULE`) because that
cost is small but not negligible.

Dimensions: B rows, T tokens, W window.
"""

from __future__ import annotations

import numpy as np
import torch

WINDOW = 64
"""Previous scores a token is ranked against (layers never calibrated)."""

SLACK = 2
"""Tokens a row may be above or below its quota before the quota decides alone..."""

SLACK_FRACTION = 0.04
"""...or this fraction of its tokens, whichever is more."""

RULES = ("hold", "threshold")
"""How an asked routed fraction is reached: `hold` (this module) or `threshold` (the calibration
table's threshold for that fraction, `MoDBlock.threshold_for`)."""

DEFAULT_RULE = "threshold"
"""The rule of an asked fraction unless one is named: `hold` costs a little loss on in-distribution
text (README, "The compute dial"), so it is asked for by name."""


class LayerDial:
    """One routed layer's dial state for B rows; `table` is the layer's threshold table (fractions
    0, 0.001, ..., 1), None for a layer never calibrated (it ranks)."""

    def __init__(self, table: torch.Tensor | None, batch_size: int, window: int, device) -> None:
        self.table = None if table is None else table.detach().float().cpu()
        self.prior = torch.full((window,), float("nan"), device=device)  # an empty window
        self.window = self.prior[None].repeat(batch_size, 1)  # (B, W), oldest first
        self.seen = np.zeros(batch_size, dtype=np.int64)
        self.routed = np.zeros(batch_size, dtype=np.int64)

    def reset_row(self, b: int) -> None:
        self.window[b] = self.prior
        self.seen[b] = self.routed[b] = 0

    def select_rows(self, idx: np.ndarray) -> None:
        self.window = self.window[torch.from_numpy(idx).to(self.window.device)]
        self.seen, self.routed = self.seen[idx], self.routed[idx]

    def prefix(self, n: int) -> LayerDial:
        view = object.__new__(LayerDial)
        view.table, view.prior = self.table, self.prior
        view.window, view.seen, view.routed = self.window[:n], self.seen[:n].copy(), self.routed[:n].copy()
        return view

    def merge_prefix(self, view: LayerDial) -> None:
        n = view.seen.shape[0]
        self.window[:n], self.seen[:n], self.routed[:n] = view.window, view.seen, view.routed

    def copy_row(self, src: LayerDial, src_row: int, dst_row: int) -> None:
        self.window[dst_row] = src.window[src_row]
        self.seen[dst_row], self.routed[dst_row] = src.seen[src_row], src.routed[src_row]

    def decide(self, score: torch.Tensor, fraction: np.ndarray, valid: torch.Tensor | None,
               hold: np.ndarray | None = None) -> torch.Tensor:
        """Decide the tokens of one call and advance the state.

        Args:
            score: (B, T) causal scores.
            fraction: (B,) host float: each row's target (NaN: the row does not use the dial; its
                decisions here are ignored by the caller and its state is left alone).
            valid: (B, T) bool, real tokens (right padding after them), or None for all.
            hold: (B,) host bool, the rows held by the quota (default: every row with a fraction);
                the others take the first decision alone (the `threshold` rule).

        Returns:
            (B, T) bool on the device of `score`.
        """
        B, T = score.shape
        s = score.detach().float()
        counts = np.ones((B, T), dtype=bool) if valid is None else valid.cpu().numpy()
        use = ~np.isnan(fraction)
        f = np.where(use, fraction, 0.0)
        if self.table is not None:  # the calibrated threshold of each row's fraction
            thr = self.table[torch.from_numpy(np.round(f * (self.table.numel() - 1)).astype(np.int64))]
            first = (s > thr.to(s.device)[:, None]).cpu().numpy()  # (B, T), one host transfer per layer
        else:
            first = self._rank(s, f, counts, use)
        chosen = np.zeros((B, T), dtype=bool)
        seen, routed = self.seen.copy(), self.routed.copy()
        held = use if hold is None else hold & use
        for t in range(T):  # the quota: sequential in t, vectorized over rows
            real = counts[:, t] & use
            quota = f * (seen + 1)
            slack = np.maximum(SLACK, SLACK_FRACTION * (seen + 1))
            c = np.where(routed < quota - slack, True, np.where(routed + 1 > quota + slack, False, first[:, t]))
            c = np.where(held, c, first[:, t]) & real
            chosen[:, t] = c
            seen += real
            routed += c
        self.seen = np.where(use, seen, self.seen)
        self.routed = np.where(use, routed, self.routed)
        return torch.from_numpy(chosen).to(score.device)

    def _rank(self, s: torch.Tensor, f: np.ndarray, counts: np.ndarray, use: np.ndarray) -> np.ndarray:
        """(B, T) host bool: each score in the top `f` of its row's last W scores (and itself);
        the window then keeps each row's last W real scores."""
        T, W = s.shape[1], self.window.shape[1]
        seq = torch.cat([self.window, s], dim=1)  # (B, W + T)
        ahead = seq.unfold(1, W, 1)[:, :T]  # (B, T, W): the W scores before each token
        above = (ahead > s[..., None]).sum(-1).cpu().numpy()  # (B, T); NaN (empty) entries never count
        held = (~torch.isnan(ahead)).sum(-1).cpu().numpy()  # (B, T)
        n = torch.from_numpy(counts.sum(1) * use).to(seq.device)  # (B,) real tokens this call
        self.window = seq.gather(1, n[:, None] + torch.arange(W, device=seq.device))
        return above < f[:, None] * (held + 1)


class Dial:
    """Per-row routed fractions and their rule (`hold` or `threshold`), with one `LayerDial` per
    routed layer.

    Made by `MoDTransformer.make_dial` (for a forward without a cache) or kept by a `KVCache`
    (`KVCache.set_fraction`). A row whose fraction is NaN does not use the dial: its layers use
    the calibrated threshold (or the call's `thresholds`).
    """

    def __init__(self, layers: dict[int, LayerDial], batch_size: int, calibrated: bool = True) -> None:
        self.layers = layers
        self.calibrated = calibrated
        self.fraction = np.full(batch_size, np.nan)
        self.hold = np.ones(batch_size, dtype=bool)  # per row: the hold rule, else the threshold rule

    @classmethod
    def for_model(cls, model, batch_size: int, window: int | None = None) -> Dial:
        w = WINDOW if window is None else window
        layers = {layer.layer_id: LayerDial(layer.threshold_table if layer.calibrated else None, batch_size, w,
                                            layer.threshold_table.device)
                  for layer in model.routed_layers}
        return cls(layers, batch_size, model.calibrated)

    def set_fraction(self, row: int | None, fraction: float | None, rule: str = "hold") -> None:
        """Route row `row` (None: every row) at `fraction` by `rule` (`hold`, or `threshold`: the
        calibration table's threshold for it); None: the row goes back to the calibrated threshold."""
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                     or not 0 <= fraction <= 1):
            raise ValueError(f"routed fraction must be in [0, 1], got {fraction}")
        if rule not in RULES:
            raise ValueError(f"fraction rule must be one of {RULES}, got {rule!r}")
        if fraction is not None and rule == "threshold" and fraction not in (0, 1) and not self.calibrated:
            raise ValueError("cannot set the routed fraction by threshold: the model was never calibrated "
                             "(hold it with the hold rule, or calibrate the model)")
        rows = slice(None) if row is None else row
        self.fraction[rows] = np.nan if fraction is None else float(fraction)
        self.hold[rows] = rule == "hold"

    @property
    def active(self) -> bool:
        return bool((~np.isnan(self.fraction)).any())

    def reset_row(self, b: int) -> None:
        self.fraction[b] = np.nan
        self.hold[b] = True
        for layer in self.layers.values():
            layer.reset_row(b)

    def select_rows(self, idx: np.ndarray) -> None:
        """Row i takes row idx[i]'s state (`KVCache.select_rows`)."""
        self.fraction, self.hold = self.fraction[idx], self.hold[idx]
        for layer in self.layers.values():
            layer.select_rows(idx)

    def prefix(self, n: int) -> Dial:
        """The first n rows (`KVCache.prefix`); `merge_prefix` takes their state back."""
        view = Dial({lid: layer.prefix(n) for lid, layer in self.layers.items()}, n, self.calibrated)
        view.fraction, view.hold = self.fraction[:n].copy(), self.hold[:n].copy()
        return view

    def merge_prefix(self, view: Dial) -> None:
        for lid, layer in self.layers.items():
            layer.merge_prefix(view.layers[lid])

    def copy_row(self, src: Dial, src_row: int, dst_row: int) -> None:
        self.fraction[dst_row], self.hold[dst_row] = src.fraction[src_row], src.hold[src_row]
        for lid, layer in self.layers.items():
            layer.copy_row(src.layers[lid], src_row, dst_row)
