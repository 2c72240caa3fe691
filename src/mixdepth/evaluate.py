"""Evaluation of a checkpoint: validation loss in `topk` mode (training-time routing) and in
`causal` mode (the sampling-time decision), their gap, predictor accuracy and routed fractions.

`topk` selects each routed layer's tokens from the whole sequence, so it reads future tokens;
`causal` decides per token from its own prefix (router or predictor against a calibrated
threshold), which is what sampling can do (paper section 3.5). The gap between the two losses is
the price of sampling causally. Batches are fixed windows of the validation split
(`TokenData.eval_offsets`), so two models are compared on the same tokens.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoint import load_model, verify_checkpoint
from .data import load_tokenizer, prepare_corpus
from .files import read_json_file
from .generate import fraction_thresholds
from .model.dial import DEFAULT_RULE
from .runtime import resolve_device

log = logging.getLogger("mixdepth")


@torch.no_grad()
def token_losses(model, x: torch.Tensor, y: torch.Tensor, mode: str, thresholds=None,
                 hold: float | None = None) -> tuple[torch.Tensor, Any]:
    """Per-token cross-entropy (B, T) of `model` on `x` against `y` in `mode` (with causal
    `thresholds` overriding the calibrated ones, or each row held at routed fraction `hold` by
    the `hold` rule), and the model output."""
    dial = model.make_dial(x.shape[0], hold) if hold is not None and mode == "causal" else None
    out = model(x, y, mode=mode, thresholds=thresholds, dial=dial)
    logits = out.logits.float()  # (B, T, V)
    losses = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, T)
    return losses, out


def _mean_lists(rows: list[list[float]]) -> list[float]:
    if not rows or not rows[0]:
        return []
    return [sum(r[i] for r in rows) / len(rows) for i in range(len(rows[0]))]


def _load_for_eval(checkpoint, data: str | None, seq_len: int | None, device, cache_dir):
    """(checkpoint folder, model, corpus name, its tokens, window length): the corpus the run
    trained on unless `data` names one, windows of the training length unless `seq_len`."""
    ckpt = verify_checkpoint(checkpoint)
    trainer = read_json_file(ckpt / "trainer.json") if (ckpt / "trainer.json").exists() else {}
    source = data or trainer.get("data")
    if not source:
        raise ValueError(f"checkpoint {ckpt} does not say which corpus it trained on; pass --data")
    model = load_model(ckpt, device)
    cfg = model.cfg
    T = seq_len if seq_len is not None else trainer.get("seq_len") or cfg.max_seq_len
    if not 1 <= T <= cfg.max_seq_len:
        raise ValueError(f"seq_len must be in [1, model.max_seq_len={cfg.max_seq_len}], got {T}")
    tokens = prepare_corpus(source, load_tokenizer(ckpt), cache_dir)
    tokens.check_fits(T, cfg.vocab_size)
    return ckpt, model, source, tokens, T


@torch.no_grad()
def run_eval(checkpoint: str | Path, *, data: str | None = None, batches: int = 20, seq_len: int | None = None,
             batch_size: int = 8, device: str = "auto", cache_dir: str | None = None,
             fraction: float | None = None, fraction_rule: str | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint on fixed validation windows in `topk` and `causal` modes.

    Args:
        checkpoint: a checkpoint folder or a run folder (its latest checkpoint).
        data: corpus ("shakespeare", a file or a folder); default: the one the run trained on.
        batches: number of batches of `batch_size` windows.
        seq_len: tokens per window; default: the training sequence length, else model.max_seq_len.
        batch_size: windows per batch.
        device: where to run: "auto" (cuda if available), "cpu", "cuda" or "cuda:N".
        cache_dir: cache of corpora and token files.
        fraction: routed fraction of the causal mode (the compute dial; default: the calibrated
            threshold), reached by `fraction_rule` (`generate.fraction_thresholds`: `hold` keeps each
            window at it, `threshold` takes the calibration table's threshold).

    Returns:
        dict with `loss_topk`, `ppl_topk`, `loss_causal`, `ppl_causal`, `causal_gap`
        (loss_causal - loss_topk), `causal_acc`, `routed_frac_topk`, `routed_frac_causal` (lists
        per routed layer), `tokens`, plus `checkpoint`, `router`, `capacity`, `note`. The causal
        entries are None for routers with no causal rule (random).
    """
    if fraction is not None and not 0 <= fraction <= 1:
        raise ValueError(f"--fraction must be in [0, 1], got {fraction}")
    if batches < 1 or batch_size < 1:
        raise ValueError(f"batches and batch_size must be >= 1, got {batches} and {batch_size}")
    device = resolve_device(device)
    ckpt, model, source, tokens, T = _load_for_eval(checkpoint, data, seq_len, device, cache_dir)
    cfg = model.cfg
    starts = tokens.eval_offsets(T, batches * batch_size)

    causal_ok = model.can_decode_causally
    if fraction is not None and not causal_ok:
        raise ValueError(f"--fraction sets the causal operating point, and {cfg.routing.router} routing "
                         "has no causal rule")
    thresholds, hold = fraction_thresholds(model, fraction, fraction_rule)
    held = fraction if hold else None
    sums = {"topk": 0.0, "causal": 0.0}
    frac = {"topk": [], "causal": []}
    acc: list[list[float]] = []
    n_tok = 0
    # the random router draws from the global RNG: keep the caller's stream untouched
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        for b in range(batches):
            x, y = tokens.batch_at("val", starts[b * batch_size:(b + 1) * batch_size], T, device)
            modes = ("topk", "causal") if causal_ok else ("topk",)
            for mode in modes:
                losses, out = token_losses(model, x, y, mode, thresholds if mode == "causal" else None, held)
                sums[mode] += float(losses.sum())
                if out.routed_frac is not None:
                    frac[mode].append(out.routed_frac.tolist())
                if mode == "topk" and out.causal_acc is not None:
                    acc.append(out.causal_acc.tolist())
            n_tok += y.numel()

    loss_topk = sums["topk"] / n_tok
    loss_causal = sums["causal"] / n_tok if causal_ok else None
    note = ""
    if not cfg.routed_layer_ids:
        note = "dense model: causal and topk modes are the same computation"
    elif not causal_ok:
        note = f"{cfg.routing.router} routing has no causal rule: causal mode skipped"
    return {
        "checkpoint": str(ckpt),
        "router": cfg.routing.router if cfg.routed_layer_ids else "none",
        "capacity": cfg.routing.capacity,
        "fraction": fraction,
        "fraction_rule": (fraction_rule or DEFAULT_RULE) if fraction is not None else None,
        "loss_topk": loss_topk,
        "ppl_topk": math.exp(loss_topk),
        "loss_causal": loss_causal,
        "ppl_causal": math.exp(loss_causal) if loss_causal is not None else None,
        "causal_gap": loss_causal - loss_topk if loss_causal is not None else None,
        "causal_acc": _mean_lists(acc),
        "routed_frac_topk": _mean_lists(frac["topk"]),
        "routed_frac_causal": _mean_lists(frac["causal"]),
        "routed_layers": cfg.routed_layer_ids,
        "tokens": n_tok,
        "note": note,
    }


def format_report(r: dict[str, Any]) -> str:
    """A small text table of `run_eval`'s result."""

    def fl(xs: list[float]) -> str:
        return " ".join(f"{v:.3f}" for v in xs) if xs else "-"

    dial = (f", causal at --fraction {r['fraction']} ({r.get('fraction_rule')})" if r.get("fraction") is not None
            else "")
    lines = [f"checkpoint {r['checkpoint']}: router {r['router']}, capacity {r['capacity']}{dial}, "
             f"routed layers {r['routed_layers']}, {r['tokens']:,} validation tokens",
             f"{'mode':<8}{'loss':>9}{'ppl':>10}  routed fraction per routed layer"]
    lines.append(f"{'topk':<8}{r['loss_topk']:>9.4f}{r['ppl_topk']:>10.3f}  {fl(r['routed_frac_topk'])}")
    if r["loss_causal"] is not None:
        lines.append(f"{'causal':<8}{r['loss_causal']:>9.4f}{r['ppl_causal']:>10.3f}  {fl(r['routed_frac_causal'])}")
        rel = r["causal_gap"] / r["loss_topk"] * 100 if r["loss_topk"] else 0.0
        lines.append(f"causal gap (causal - topk): {r['causal_gap']:+.4f} ({rel:+.2f}%)")
    if r["causal_acc"]:
        lines.append(f"causal decision accuracy vs top-k per routed layer: {fl(r['causal_acc'])}")
    if r["note"]:
        lines.append(f"note: {r['note']}")
    return "\n".join(lines)


# ---- the rule of an asked fraction: what holding it costs ----------------------------------------
@torch.no_grad()
def compare_fraction_rules(checkpoint: str | Path, fractions: list[float], *, data: str | None = None,
                           batches: int = 20, seq_len: int | None = None, batch_size: int = 8,
                           device: str = "auto", cache_dir: str | None = None) -> dict[str, Any]:
    """Causal loss and routed fractions at each asked fraction under both rules (`hold` and
    `threshold`, `generate.fraction_thresholds`), on the same validation windows.

    The loss difference (hold - threshold) is paired by window, with its standard error over
    windows. A window's routed fraction is the mean over routed layers of the fraction of its
    tokens that entered; `off` is the mean and `off_max` the largest |window fraction - asked| (how
    well a rule holds the dial on this text).
    """
    device = resolve_device(device)
    ckpt, model, source, tokens, T = _load_for_eval(checkpoint, data, seq_len, device, cache_dir)
    if not model.routed_layers or not model.can_decode_causally:
        raise ValueError("comparing fraction rules needs routed layers with a causal rule")
    if not model.calibrated:
        raise ValueError("the threshold rule needs a calibrated model (this one was never calibrated)")
    for f in fractions:
        if not 0 <= f <= 1:
            raise ValueError(f"fractions must be in [0, 1], got {f}")
    starts = tokens.eval_offsets(T, batches * batch_size)
    rows = []
    for f in fractions:
        per = {"hold": ([], []), "threshold": ([], [])}  # per window: loss, routed fraction
        for b in range(batches):
            x, y = tokens.batch_at("val", starts[b * batch_size:(b + 1) * batch_size], T, device)
            for rule in per:
                thresholds, hold = fraction_thresholds(model, f, rule)
                dial = model.make_dial(x.shape[0], f) if hold else None
                out = model(x, mode="causal", thresholds=thresholds, dial=dial, return_routing=True)
                loss = F.cross_entropy(out.logits.float().transpose(1, 2), y, reduction="none").mean(1)  # (B,)
                routed = torch.stack([m.float().mean(1) for m in out.routing.values()]).mean(0)  # (B,)
                per[rule][0].extend(loss.tolist())
                per[rule][1].extend(routed.tolist())
        diff = torch.tensor(per["hold"][0]) - torch.tensor(per["threshold"][0])
        row = {"fraction": f, "diff": float(diff.mean()), "diff_se": float(diff.std() / math.sqrt(diff.numel()))}
        for rule, (loss, routed) in per.items():
            dev = (torch.tensor(routed) - f).abs()
            row[rule] = {"loss": sum(loss) / len(loss), "routed": sum(routed) / len(routed),
                         "off": float(dev.mean()), "off_max": float(dev.max())}
        rows.append(row)
    return {"checkpoint": str(ckpt), "data": source, "seq_len": T, "windows": batches * batch_size,
            "rows": rows}


def format_rule_comparison(r: dict[str, Any]) -> str:
    """A markdown table of `compare_fraction_rules`."""
    lines = [f"{r['checkpoint']} on {r['data']}: {r['windows']} windows of {r['seq_len']} tokens, causal mode",
             "", "| asked | loss, threshold | loss, hold | hold - threshold | routed, threshold (mean / max off) "
             "| routed, hold (mean / max off) |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        th, ho = row["threshold"], row["hold"]
        verdict = "not resolved" if abs(row["diff"]) < 2 * row["diff_se"] else ("hold worse" if row["diff"] > 0
                                                                              else "hold better")
        lines.append(f"| {row['fraction']:g} | {th['loss']:.4f} | {ho['loss']:.4f} | {row['diff']:+.4f} ± "
                     f"{row['diff_se']:.4f} ({verdict}) | {th['routed']:.3f} ({th['off']:.3f} / {th['off_max']:.3f}) "
                     f"| {ho['routed']:.3f} ({ho['off']:.3f} / {ho['off_max']:.3f}) |")
    return "\n".join(lines)
