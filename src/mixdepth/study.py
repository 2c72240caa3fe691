"""The routing study (`mixdepth study`): does the learned router earn its keep?

The paper's most robust claim is that *which* tokens a routed block takes matters: random routing
is "drastically worse than both the baseline and normal MoD" (Raposo et al. 2024, section 4.1,
figure 5). A study here trains one architecture under several routing *arms* at equal training
FLOPs, with paired seeds (seed s gives every arm the same initialisation of the shared weights
and the same data order), and compares each arm with a reference arm (default: `learned`) by the
paired differences of their validation losses: mean over seeds and its standard error,
sd(d) / sqrt(n). A difference within two standard errors is "not resolved".

Arms (`ARMS`; any sweep variant name is an arm too, e.g. `mod-12.5-e2+router_lr_scale=10`):
- `learned`: expert choice, block output scaled by sigmoid(r) (the default gate);
- `learned-gate1`: expert choice with the value-1 gate 1 + s - stopgrad(s) (s = sigmoid(r)), so
  it differs from the controls below only in which tokens it takes;
- `random`: k random tokens (gate 1); `frozen`: expert choice with the router frozen at its random
  initialisation (gate 1; selects by content, learns nothing); `rule`: the tokens right after
  whitespace, the first k in sequence order, filled up with the earliest others (gate 1);
- `dropped`: capacity 0 on the routed layers (the blocks removed: the floor); `dense`: every
  token through every block (the ceiling);
- `learned-norm`, `learned-lr10`: the default router with an RMS-normalised input, or ten times
  the learning rate (the changes tried to make the router learn).

Besides the loss it reports the loss on word-initial bytes (the byte after whitespace: the
hardest to predict) and on the others, and for each routed layer how often a token right after
whitespace is selected, P(selected | previous byte is whitespace), against the base rate (the
capacity), from `topk` routing on the same validation windows.

Training goes through the sweep's machinery (`mixdepth.sweep`: one depth, one budget, the arms as
variants), so a study is resumable and runs `jobs` side by side. Layout of `out_dir`: the sweep's
(`runs/`, `results/`, `logs/`) plus `analysis/<run>.json`, `table.md`, `summary.csv`,
`findings.md` and `training_curves.png`.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .demo import fmt_mean_std, mean_std
from .files import read_json_file, write_json_atomic, write_text_atomic

ARMS: dict[str, tuple[str, str]] = {
    "learned": ("mod-12.5-e2", "expert choice, gate sigmoid(r) (default)"),
    "learned-gate1": ("mod-12.5-e2+gate=sigmoid_st", "expert choice, gate 1 + s - sg(s): value 1"),
    "learned-norm": ("mod-12.5-e2+router_norm=true", "expert choice, RMS-normalised router input"),
    "learned-lr10": ("mod-12.5-e2+router_lr_scale=10", "expert choice, router learning rate x10"),
    "random": ("random-12.5-e2", "k random tokens, gate 1"),
    "frozen": ("frozen-12.5-e2", "router frozen at its random init, gate 1"),
    "rule": ("rule-12.5-e2", "tokens after whitespace, in order, gate 1"),
    "dropped": ("mod-0-e2", "capacity 0: routed blocks dropped (floor)"),
    "dense": ("dense", "every token, every block (ceiling)"),
}
"""Named arms: name -> (sweep variant, what it is)."""
DEFAULT_ARMS = ["learned", "random", "frozen", "rule", "dropped", "dense"]
"""The arms of `mixdepth study` (the README's table); the router options were measured at 3e12 FLOPs
(`--budget 3e12 --arms learned,learned-gate1,learned-norm,learned-lr10,random,frozen,rule,dropped,dense`)."""


@dataclass(kw_only=True)
class StudyConfig:
    """Settings of a routing study (the CLI flags override them)."""

    out_dir: str = "runs/study-routing"
    """Folder of the study."""
    arms: list[str] = field(default_factory=lambda: list(DEFAULT_ARMS))
    """Arms: names of `ARMS` or sweep variant names."""
    reference: str = "learned"
    """The arm every other arm is compared with."""
    depth: int = 6
    """Layers (every other one routed: 3 routed layers at depth 6)."""
    aspect: int = 32
    """Width per layer of depth (dim = depth x aspect)."""
    head_dim: int = 32
    """Width of an attention head."""
    budget: float = 6e12
    """Training FLOPs of every arm (2,294 steps for the routed arms at the defaults)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Paired seeds: the same init and data order in every arm."""
    seq_len: int = 128
    """Tokens per training sequence."""
    batch_size: int = 2
    """Sequences per optimizer step (small: more steps at the budget)."""
    lr: float = 1e-3
    """Peak learning rate (cosine to lr/10); the sweep's 2e-3 scaled for an 8x smaller batch."""
    warmup: float = 0.05
    """Warmup as a fraction of each run's steps."""
    window: int = 0
    """Local attention window of the layers outside the routed pattern, in every arm (0: none): the
    routed layers (or, in the dense arm, the same layers) then carry the long-range information."""
    eval_batches: int = 16
    """Validation batches (of `batch_size` windows) of the evaluations during training."""
    eval_windows: int = 128
    """Validation windows (of `seq_len` tokens, the same for every arm) of the study's losses and
    selection statistics."""
    data: str = "shakespeare"
    """Corpus (bytes as tokens)."""
    jobs: int = 2
    """Runs trained side by side."""
    device: str = "cpu"
    """Where runs train and evaluate."""
    cache_dir: str | None = None
    """Cache of corpora and token files."""
    overwrite: bool = False
    """Replace run folders that hold other settings."""
    progress: bool = True
    """A progress bar on a terminal."""

    def __post_init__(self) -> None:
        from .sweep import parse_variant

        if not self.arms:
            raise ValueError("--arms must name at least one arm")
        if not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"--window must be an integer >= 0, got {self.window}")
        for a in self.arms:
            parse_variant(self.variant(a))
        if self.reference not in self.arms:
            raise ValueError(f"--reference {self.reference!r} is not among --arms {self.arms}")
        if len({self.variant(a) for a in self.arms}) != len(self.arms):
            raise ValueError(f"--arms names one variant twice: {self.arms}")
        if not self.seeds:
            raise ValueError("--seeds must name at least one seed")

    def variant(self, arm: str) -> str:
        """The sweep variant of an arm in this study (with the window, if any)."""
        return arm_variant(arm) + (f"+local_window={self.window}" if self.window else "")

    def sweep(self):
        """The sweep that trains the arms: one depth, one budget, the arms as variants, no speed."""
        from .sweep import SweepConfig

        return SweepConfig(out_dir=self.out_dir, variants=[self.variant(a) for a in self.arms], ablations=[],
                           depths=[self.depth], aspect=self.aspect, head_dim=self.head_dim, budgets=[self.budget],
                           seeds=list(self.seeds), seq_len=self.seq_len, batch_size=self.batch_size, lr=self.lr,
                           warmup=self.warmup, data=self.data, eval_batches=self.eval_batches, decode_tokens=0,
                           jobs=self.jobs, device=self.device, cache_dir=self.cache_dir, overwrite=self.overwrite,
                           progress=self.progress)


def arm_variant(arm: str) -> str:
    """The sweep variant of an arm (an `ARMS` name, or a variant name itself)."""
    return ARMS[arm][0] if arm in ARMS else arm


# ---- statistics ------------------------------------------------------------------------------------
def paired_difference(a: list[float], b: list[float]) -> tuple[float, float | None]:
    """Mean of a_s - b_s over paired seeds and its standard error sd/sqrt(n) (None for one seed)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired values need equal, non-empty lists, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(d)
    return mean, (statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None)


def verdict(diff: float, se: float | None) -> str:
    """`higher` / `lower` when |diff| > 2 standard errors, else `not resolved`."""
    if se is None:
        return "one seed: not resolved"
    if abs(diff) <= 2 * se:
        return "not resolved"
    return "higher" if diff > 0 else "lower"


# ---- per-run analysis: which tokens each routed layer takes, loss by kind of byte --------------------
def analyse_run(checkpoint: str, cfg: StudyConfig) -> dict[str, Any]:
    """Loss in `topk` mode (and `causal` mode, where the router has a causal rule), on word-initial
    and on other bytes, and per routed layer P(selected | previous byte is whitespace) and
    P(selected | byte is whitespace) in `topk` mode, on the study's `eval_windows` validation windows."""
    import torch
    import torch.nn.functional as F

    from .checkpoint import load_model
    from .config import WHITESPACE_BYTES
    from .data import load_tokenizer, prepare_corpus
    from .runtime import resolve_device

    device = resolve_device(cfg.device)
    model = load_model(checkpoint, device)
    model.eval()
    tokens = prepare_corpus(cfg.data, load_tokenizer(checkpoint), cfg.cache_dir)
    starts = tokens.eval_offsets(cfg.seq_len, cfg.eval_windows)
    ws = torch.tensor(WHITESPACE_BYTES, device=device)
    sums = {"initial": 0.0, "other": 0.0, "causal": 0.0}
    counts = {"initial": 0, "other": 0}
    sel: dict[int, dict[str, float]] = {}
    per = 16  # windows per forward
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        for b in range(0, cfg.eval_windows, per):
            x, y = tokens.batch_at("val", starts[b:b + per], cfg.seq_len, device)
            out = model(x, y, mode="topk", return_routing=True)
            loss = F.cross_entropy(out.logits.float().transpose(1, 2), y, reduction="none")  # (B, T)
            if model.can_decode_causally:
                sums["causal"] += float(model(x, y, mode="causal").lm_loss) * y.numel()
            # y[t] is word-initial when the byte before it (x[t]) is whitespace and it is not
            initial = torch.isin(x, ws) & ~torch.isin(y, ws)
            for key, mask in (("initial", initial), ("other", ~initial)):
                sums[key] += float(loss[mask].sum())
                counts[key] += int(mask.sum())
            prev = torch.cat([torch.full_like(x[:, :1], -1), x[:, :-1]], 1)
            after, is_ws = torch.isin(prev, ws) | (prev < 0), torch.isin(x, ws)
            for layer, chosen in out.routing.items():
                s = sel.setdefault(layer, {"after": 0.0, "n_after": 0, "ws": 0.0, "n_ws": 0, "all": 0.0, "n": 0})
                s["after"] += float(chosen[after].sum())
                s["n_after"] += int(after.sum())
                s["ws"] += float(chosen[is_ws].sum())
                s["n_ws"] += int(is_ws.sum())
                s["all"] += float(chosen.sum())
                s["n"] += chosen.numel()
    layers = {str(i): {"p_after_ws": s["after"] / max(1, s["n_after"]), "p_is_ws": s["ws"] / max(1, s["n_ws"]),
                       "base_rate": s["all"] / max(1, s["n"])} for i, s in sorted(sel.items())}
    n = counts["initial"] + counts["other"]
    return {"checkpoint": checkpoint, "tokens": n, "loss": (sums["initial"] + sums["other"]) / n,
            "loss_causal": sums["causal"] / n if model.can_decode_causally else None,
            "loss_initial": sums["initial"] / max(1, counts["initial"]),
            "loss_other": sums["other"] / max(1, counts["other"]),
            "frac_initial": counts["initial"] / max(1, counts["initial"] + counts["other"]), "layers": layers}


def _analysis(cfg: StudyConfig, result: dict[str, Any]) -> dict[str, Any]:
    """A run's analysis, computed once per checkpoint and kept in analysis/<run>.json."""
    path = Path(cfg.out_dir) / "analysis" / f"{result['run']}.json"
    if path.exists():
        saved = read_json_file(path, "study analysis")
        if saved.get("checkpoint") == result["checkpoint"] and saved.get("eval_windows") == cfg.eval_windows:
            return saved
    a = analyse_run(result["checkpoint"], cfg)
    a["eval_windows"] = cfg.eval_windows
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, a)
    return a


# ---- the table -------------------------------------------------------------------------------------
def summarise_arms(cfg: StudyConfig, results: list[dict[str, Any]], analyses: dict[str, dict]) -> list[dict]:
    """One row per arm: mean ± std of its losses over seeds, the paired difference to the reference
    (mean, standard error, verdict), and the selection statistics per routed layer (mean over seeds)."""
    by_arm = {a: sorted((r for r in results if r["variant"] == cfg.variant(a)), key=lambda r: r["seed"])
              for a in cfg.arms}
    ref = by_arm[cfg.reference]
    rows = []
    for arm, rs in by_arm.items():
        row: dict[str, Any] = {"arm": arm, "variant": cfg.variant(arm), "about": ARMS.get(arm, ("", ""))[1],
                               "seeds": len(rs), "steps": rs[0]["steps"],
                               "fwd_flops_per_token": rs[0]["fwd_flops_per_token"]}
        an = [analyses[r["run"]] for r in rs]
        for key, src in (("loss_topk", "loss"), ("loss_causal", "loss_causal")):
            vals = [a[src] for a in an if a.get(src) is not None]
            row[key], row[key + "_std"] = mean_std(vals) if len(vals) == len(rs) else (None, None)
        for key in ("loss_initial", "loss_other"):
            row[key], row[key + "_std"] = mean_std([a[key] for a in an])
        layers = sorted(an[0]["layers"], key=int)
        row["selection"] = {i: {k: statistics.fmean(a["layers"][i][k] for a in an)
                                for k in ("p_after_ws", "p_is_ws", "base_rate")} for i in layers}
        if arm != cfg.reference:
            if [r["seed"] for r in rs] != [r["seed"] for r in ref]:
                raise ValueError(f"arm {arm} and {cfg.reference} were trained on different seeds")
            for key, ref_key in (("loss", "d_loss"), ("loss_initial", "d_initial"), ("loss_other", "d_other")):
                row[ref_key], row[ref_key + "_se"] = paired_difference([analyses[r["run"]][key] for r in rs],
                                                                       [analyses[r["run"]][key] for r in ref])
            row["verdict"] = verdict(row["d_loss"], row["d_loss_se"])
        rows.append(row)
    return rows


def format_table(cfg: StudyConfig, rows: list[dict]) -> str:
    """Markdown: arms with losses (mean ± std over seeds) and paired differences to the reference
    (mean ± standard error), then the selection statistics per routed layer."""
    ref = cfg.reference
    head = ["arm", "what it is", "steps", "loss (topk)", f"paired diff vs {ref}", "verdict", "loss, word-initial",
            "diff", "loss, other bytes", "diff", "loss (causal)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([
            r["arm"], r["about"] or r["variant"], str(r["steps"]), fmt_mean_std(r["loss_topk"], r["loss_topk_std"]),
            fmt_mean_std(r.get("d_loss"), r.get("d_loss_se"), sign=True) if r["arm"] != ref else "(reference)",
            r.get("verdict", "-"), fmt_mean_std(r["loss_initial"], r["loss_initial_std"]),
            fmt_mean_std(r.get("d_initial"), r.get("d_initial_se"), sign=True) if r["arm"] != ref else "-",
            fmt_mean_std(r["loss_other"], r["loss_other_std"]),
            fmt_mean_std(r.get("d_other"), r.get("d_other_se"), sign=True) if r["arm"] != ref else "-",
            fmt_mean_std(r["loss_causal"], r["loss_causal_std"])]) + " |")
    routed = [r for r in rows if r["selection"]]
    if routed:
        layers = list(routed[0]["selection"])
        lines += ["", "Which tokens each routed layer takes (topk, validation windows, mean over seeds): "
                      "P(selected | previous byte is whitespace) / P(selected | byte is whitespace) / base rate", ""]
        head = ["arm"] + [f"layer {i}" for i in layers]
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for r in routed:
            cells = [f"{s['p_after_ws']:.3f} / {s['p_is_ws']:.3f} / {s['base_rate']:.3f}"
                     for s in r["selection"].values()]
            lines.append("| " + " | ".join([r["arm"], *cells]) + " |")
    return "\n".join(lines)


JUDGED = {"random": "random routing", "frozen": "a frozen (never trained) router", "rule": "the whitespace rule",
          "learned-gate1": "learned routing with the value-1 gate", "dropped": "the routed blocks dropped",
          "dense": "the dense model"}


def findings(cfg: StudyConfig, rows: list[dict]) -> list[str]:
    """Each arm against the reference, judged by the paired difference and its standard error."""
    ref = cfg.reference
    refrow = next(r for r in rows if r["arm"] == ref)
    loss = fmt_mean_std(refrow["loss_topk"], refrow["loss_topk_std"])
    out = [f"Reference: {ref} ({refrow['about'] or refrow['variant']}), loss {loss} over {refrow['seeds']} seeds at "
           f"{cfg.budget:.3g} training FLOPs."]
    for r in rows:
        if r["arm"] == ref:
            continue
        what = JUDGED.get(r["arm"], r["arm"])
        d, se, v = r["d_loss"], r["d_loss_se"], r["verdict"]
        se_s = f" ± {se:.4f} (standard error of the paired difference)" if se is not None else ""
        if v == "not resolved" or v.startswith("one seed"):
            word = "not resolved: the difference is within 2 standard errors"
        else:
            word = f"{ref} is {'better' if v == 'higher' else 'worse'} by more than 2 standard errors"
        out.append(f"{ref} vs {what} ({r['arm']}): {what} {r['loss_topk']:.4f}, paired difference {d:+.4f}{se_s}; "
                   f"{word}. On word-initial bytes {r['d_initial']:+.4f}, on the others {r['d_other']:+.4f}.")
    for r in rows:
        if r["arm"] in (ref, "learned-gate1") and r["selection"]:
            s = r["selection"]
            parts = ", ".join(f"layer {i}: {v['p_after_ws']:.2f} (base {v['base_rate']:.3f})" for i, v in s.items())
            out.append(f"{r['arm']} selects tokens right after whitespace with probability {parts}.")
    return out


# ---- the whole study --------------------------------------------------------------------------------
def run_study(cfg: StudyConfig, *, echo=None) -> dict[str, Any]:
    """Train (or reuse) every arm at every seed, analyse, and write the table, findings and plot."""
    from .sweep import _csv, _run_all, check_plan, echo_report, plan, plot_training_curves, summarise

    say = echo or (lambda line: None)
    scfg = cfg.sweep()
    out = Path(cfg.out_dir)
    specs = plan(scfg)
    tcs = check_plan(scfg, specs)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    routed = sorted({i for tc in tcs.values() for i in tc.model.routed_layer_ids})
    say(f"routing study {out}: {len(cfg.arms)} arms x {len(cfg.seeds)} seeds at {cfg.budget:.3g} FLOPs, depth "
        f"{cfg.depth} (routed layers {routed} in the routed arms), {cfg.jobs} at a time")
    write_json_atomic(out / "study.json", dataclasses.asdict(cfg))
    results = _run_all(scfg, specs, tcs, say)
    analyses = {r["run"]: _analysis(cfg, r) for r in results}
    rows = summarise_arms(cfg, results, analyses)
    table = format_table(cfg, rows)
    notes = findings(cfg, rows)
    cols = ["arm", "variant", "seeds", "steps", "fwd_flops_per_token", "loss_topk", "loss_topk_std", "d_loss",
            "d_loss_se", "verdict", "loss_initial", "loss_initial_std", "d_initial", "d_initial_se", "loss_other",
            "loss_other_std", "d_other", "d_other_se", "loss_causal", "loss_causal_std"]
    write_text_atomic(out / "summary.csv", _csv(rows, cols))
    write_text_atomic(out / "table.md", table + "\n")
    write_text_atomic(out / "findings.md", "\n".join(f"- {n}" for n in notes) + "\n")
    sweep_rows = summarise(results, {})
    fig = plot_training_curves(results, sweep_rows, out / "training_curves.png")
    echo_report(say, table, notes)
    say(f"\ndone in {time.perf_counter() - t0:.0f} s; outputs in {out}")
    return {"out_dir": str(out), "results": results, "rows": rows, "table": table, "findings": notes,
            "figure": str(fig)}
