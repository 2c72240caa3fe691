"""isoFLOP sweeps (`mixdepth sweep`): every variant at each FLOP budget over a family of model sizes.

The paper's central comparison (Raposo et al. 2024, section 4.1, figures 3-4) is made at equal
training FLOPs: for each budget, models of several sizes train on exactly that many FLOPs, and the
loss is drawn against the parameter count (an isoFLOP curve); the minimum of each curve is the best
model that budget buys. A sweep here:

1. builds the runs: variants (`VARIANT_HELP`) x sizes x budgets x seeds. The sizes are one knob,
   `depth` (as nanochat's `--depth`): `n_layers = depth`, `dim = depth * aspect`, heads of
   `head_dim`, the Llama MLP width. Every run of a seed sees the same data in the same order
   (the sampler is seeded by the seed alone) and trains `flops.steps_for_budget` steps;
   `ablations` run at one size only (`ablation_depth`) to keep a sweep affordable;
2. trains them, one at a time or `jobs` side by side in worker processes (one progress view), each
   through `train.train_or_reuse`: a finished run is reused, never retrained, a cut-off run resumes
   from its checkpoint, so a killed sweep picks up where it stopped and gives the same table;
3. evaluates each run on the same validation windows (`evaluate.run_eval`): loss in `topk` and
   `causal` mode, the causal decision's agreement with top-k; its FLOPs per forward pass and
   parameters (`flops`); then, one variant and size at a time with nothing else running, decode
   speed against the dense twin (`bench.bench_decode` on the trained model);
4. writes `runs.csv` (one row per run), `summary.csv` and `table.md` (mean and spread over seeds),
   `findings.md` (where the paper's claims hold and where not, with the spread) and the plots:
   the isoFLOP curves (`isoflop.png`, minimum of each curve marked), loss against FLOPs per forward
   pass (`loss_vs_forward_flops.png`) and training curves against FLOPs (`training_curves.png`).

Layout of `out_dir`: `runs/<run>/` (ordinary run folders), `results/<run>.json` (a run's
evaluation, written when it is done), `logs/<run>.log` (a worker's output), `speed.json`, and the
outputs above. Run names are `<variant>-d<depth>-b<budget>-s<seed>`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .demo import fmt_mean_std, mean_std
from .files import read_json_file, write_json_atomic, write_text_atomic

log = logging.getLogger("mixdepth")

FIXED_VARIANTS = ("dense", "moe", "staged-mode", "integrated-mode")
ROUTED_KINDS = {"mod": "expert_choice", "mod-aux": "expert_choice", "random": "random", "token-choice": "token_choice",
                "frozen": "frozen", "rule": "rule"}
VARIANT_RE = re.compile(r"^(mod-aux|mod|random|token-choice|frozen|rule)-(\d+(?:\.\d+)?)-e(\d+)$")
VARIANT_HELP = ("dense; mod-<C%>-e<n> (MoD, expert choice at C percent capacity on every n-th block, causal "
                "decision by predictor; mod-0-e<n> drops those blocks), mod-aux-<C%>-e<n> (causal decision by the aux "
                "BCE loss), random-<C%>-e<n>, token-choice-<C%>-e<n>, frozen-<C%>-e<n> (router never trained), "
                "rule-<C%>-e<n> (the tokens after whitespace); moe, staged-mode (MoE + mod-12.5-e2), integrated-mode "
                "(MoE + a no-op expert); any of them +field=value... to set routing or model fields "
                "(e.g. mod-12.5-e2+gate=sigmoid_st+router_norm=true)")
MAIN_MOD = "mod-12.5-e2"
"""The paper's best MoD: 12.5% capacity, every other block."""


# ---- settings -------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class SweepConfig:
    """Settings of a sweep (`PRESETS` names two; the CLI flags override their fields)."""

    out_dir: str = "runs/sweep"
    """Folder of the sweep (see the module docstring for its layout)."""
    variants: list[str] = field(default_factory=lambda: ["dense", MAIN_MOD])
    """Variants trained at every size, budget and seed (the isoFLOP curves)."""
    ablations: list[str] = field(default_factory=list)
    """Variants trained at `ablation_depth` only, at every budget and seed."""
    depths: list[int] = field(default_factory=lambda: [2, 3, 4])
    """The size family: one model per depth (n_layers = depth, dim = depth * aspect)."""
    aspect: int = 64
    """Model width per layer of depth (nanochat's 64)."""
    head_dim: int = 64
    """Width of an attention head; heads = dim / head_dim."""
    ablation_depth: int = 0
    """Depth of the ablation runs; 0: the middle of `depths`."""
    budgets: list[float] = field(default_factory=lambda: [3e12, 1e13])
    """Training FLOPs per run (`flops.train_step_flops` per step)."""
    ablation_budgets: list[float] = field(default_factory=list)
    """Budgets of the ablation runs; empty: all of `budgets`."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds: model init, data order and random routing; the same schedule for every variant."""
    seq_len: int = 256
    """Tokens per training sequence."""
    max_seq_len: int = 0
    """model.max_seq_len of every size; 0: `seq_len`."""
    batch_size: int = 8
    """Sequences per optimizer step."""
    lr: float = 2e-3
    """Peak learning rate (cosine to lr/10)."""
    warmup: float = 0.05
    """Warmup as a fraction of each run's steps (runs of one budget differ in steps)."""
    n_experts: int = 4
    """Experts of the MoE variants (top-1, each of the dense MLP's width)."""
    data: str = "shakespeare"
    """Corpus (bytes as tokens): "shakespeare", a text file or a folder."""
    evals: int = 4
    """Validation evaluations during each run (the training-curve plot's dashed lines)."""
    eval_batches: int = 8
    """Validation batches (of `batch_size` windows) per evaluation, during training and at the end."""
    decode_tokens: int = 32
    """Decode steps timed per round for the speed column; 0: no speed measurement."""
    decode_context: int = 128
    """Prompt tokens cached before the timed decode steps."""
    decode_rounds: int = 5
    """Alternated timing rounds (dense twin, variant, ...); the median is reported."""
    jobs: int = 1
    """Runs trained side by side (worker processes, `threads` threads each)."""
    threads: int = 0
    """Torch threads per worker; 0: the cores divided by `jobs`."""
    device: str = "cpu"
    """Where runs train and evaluate: auto, cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16."""
    cache_dir: str | None = None
    """Cache of corpora and token files (default: $MIXDEPTH_CACHE or ~/.cache/mixdepth)."""
    overwrite: bool = False
    """Replace run folders that hold other settings instead of stopping with an error."""
    progress: bool = True
    """A progress bar on a terminal (else one line per finished run)."""

    def __post_init__(self) -> None:
        from .config import is_device_name

        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        for name in ("variants", "ablations"):
            for v in getattr(self, name):
                parse_variant(v)  # raises on an unknown name
        check(bool(self.variants), "--variants must name at least one variant")
        check(bool(self.depths) and all(isinstance(d, int) and d >= 1 for d in self.depths),
              f"--depths must list integers >= 1, got {self.depths}")
        self.depths = sorted(set(self.depths))
        check(bool(self.seeds), "--seeds must name at least one seed")
        check(bool(self.budgets) and all(isinstance(b, (int, float)) and math.isfinite(b) and b > 0
                                         for b in self.budgets),
              f"--budgets must be positive FLOPs, got {self.budgets}")
        self.budgets = sorted(set(float(b) for b in self.budgets))
        bad = [b for b in self.ablation_budgets if b not in self.budgets]
        check(not bad, f"--ablation-budgets must be among --budgets {self.budgets}, got {bad[:1]}")
        for name in ("aspect", "head_dim", "seq_len", "batch_size", "evals", "eval_batches", "decode_rounds", "jobs",
                     "decode_context"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 1, f"--{name.replace('_', '-')} must be an integer >= 1, got {v}")
        for name in ("ablation_depth", "max_seq_len", "threads", "decode_tokens", "n_experts"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 0, f"--{name.replace('_', '-')} must be an integer >= 0, got {v}")
        check(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        check(0 <= self.warmup < 1, f"--warmup must be a fraction in [0, 1), got {self.warmup}")
        check(is_device_name(self.device), f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        check(self.dtype in ("auto", "fp32", "bf16"), f"--dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        if any(v in ("moe", "staged-mode", "integrated-mode") for v in self.variants + self.ablations):
            check(self.n_experts >= 1, "the MoE variants need --n-experts >= 1")

    @property
    def seq_cap(self) -> int:
        return self.max_seq_len or self.seq_len

    @property
    def the_ablation_depth(self) -> int:
        return self.ablation_depth or self.depths[(len(self.depths) - 1) // 2]


PRESETS: dict[str, dict[str, Any]] = {
    # 2 CPU cores, two workers of one thread. A narrow family (width 16 x depth, 16-wide heads: 33K, 83K,
    # 214K, 436K non-embedding parameters) at budgets whose isoFLOP minima fall inside it: at these
    # scales the best model takes 1,000-3,000 steps, and a wider family (64 x depth) had both minima at
    # its smallest member. 48 runs; the ablations live in the routing study (`mixdepth study`, depth 6).
    "cpu": dict(variants=["dense", MAIN_MOD], depths=[1, 2, 3, 4, 5], aspect=16, head_dim=16, budgets=[3e12, 4e12],
                seeds=[0, 1, 2], ablations=[], jobs=2, device="cpu"),
    # one GPU: d=512..1024 (nanochat-like aspect), 1k-token sequences, budgets of 1e16 and 3e16 FLOPs
    "gpu": dict(variants=["dense", MAIN_MOD, "random-12.5-e2", "mod-50-e2"], depths=[8, 10, 12, 16],
                budgets=[1e16, 3e16], seeds=[0, 1, 2], seq_len=1024, batch_size=32, lr=1e-3, eval_batches=16,
                ablations=["mod-12.5-e1", "mod-aux-12.5-e2", "token-choice-12.5-e2", "moe", "staged-mode",
                           "integrated-mode"], n_experts=8, jobs=1, device="auto", decode_context=512,
                decode_tokens=64),
}
"""Named sweeps: `mixdepth sweep --preset cpu` (the README's Results) and `--preset gpu`."""


def parse_variant(name: str) -> tuple[str, float | None, int | None]:
    """`mod-12.5-e2` -> ("mod", 0.125, 2); `dense` -> ("dense", None, None); a one-line error otherwise.

    Options after the base name (`+gate=sigmoid_st`) are checked here and read by `variant_options`.
    """
    base = name.split("+")[0]
    variant_options(name)
    if base in FIXED_VARIANTS:
        return base, None, None
    m = VARIANT_RE.match(base)
    if m:
        kind, pct, every = m.group(1), float(m.group(2)), int(m.group(3))
        if (0 < pct or kind == "mod") and pct <= 100 and every >= 1:
            return kind, pct / 100, every
    raise ValueError(f"unknown variant {name!r} (known: {VARIANT_HELP})")


def variant_options(name: str) -> dict[str, dict[str, Any]]:
    """The `+field=value` options of a variant name, by section: {"routing": {...}, "model": {...}}.

    A field of `RoutingConfig` goes to routing, else one of `ModelConfig` to the model; values are
    JSON (numbers, true/false) or plain words.
    """
    from .config import ModelConfig, RoutingConfig

    out: dict[str, dict[str, Any]] = {"routing": {}, "model": {}}
    routing_fields = {f.name for f in dataclasses.fields(RoutingConfig)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"routing", "moe"}
    for opt in name.split("+")[1:]:
        key, eq, text = opt.partition("=")
        if not eq or not key or not text:
            raise ValueError(f"variant {name!r}: option {opt!r} is not field=value")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        if key in routing_fields:
            out["routing"][key] = value
        elif key in model_fields:
            out["model"][key] = value
        else:
            raise ValueError(f"variant {name!r}: {key!r} is not a routing or model field")
    return out


def size_config(cfg: SweepConfig, depth: int):
    """The dense model of the size family at `depth`."""
    from .config import ModelConfig, RoutingConfig

    dim = depth * cfg.aspect
    if dim % cfg.head_dim:
        raise ValueError(f"depth {depth} x aspect {cfg.aspect} = width {dim} is not a multiple of --head-dim "
                         f"{cfg.head_dim}")
    return ModelConfig(vocab_size=256, dim=dim, n_layers=depth, n_heads=dim // cfg.head_dim, max_seq_len=cfg.seq_cap,
                       routing=RoutingConfig(router="none"))


def variant_config(name: str, base, n_experts: int = 4):
    """`base` (a dense size) made into the variant `name`."""
    from .bench import moe_variants

    kind, capacity, every = parse_variant(name)
    opts = variant_options(name)
    if opts["model"]:
        base = dataclasses.replace(base, **opts["model"])
    if kind == "dense":
        return base.with_routing(router="none", **opts["routing"])
    if kind in ("moe", "staged-mode", "integrated-mode"):
        mod = base.with_routing(router="expert_choice", capacity=0.125, route_every=2, **opts["routing"])
        return moe_variants(mod, n_experts)[kind]
    routing = dict(router=ROUTED_KINDS[kind], capacity=capacity, route_every=every)
    if kind == "mod-aux":
        routing.update(causal_method="aux_loss")
    return base.with_routing(**{**routing, **opts["routing"]})


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep."""

    variant: str
    depth: int
    budget: float
    seed: int

    @property
    def name(self) -> str:
        budget = re.sub(r"e\+?0*(\d)", r"e\1", f"{self.budget:.3g}")  # 6e9, 1.5e13
        return f"{self.variant}-d{self.depth}-b{budget}-s{self.seed}"


def routes_a_layer(cfg: SweepConfig, variant: str, depth: int) -> bool:
    """False for a routed variant at a depth where its pattern routes no layer (it would be the
    dense model: depth 1 with every other block routed); True otherwise."""
    if parse_variant(variant)[0] not in ROUTED_KINDS:
        return True
    try:
        return bool(variant_config(variant, size_config(cfg, depth), cfg.n_experts).routed_layer_ids)
    except ValueError:
        return True  # a bad size: `check_plan` says so


def plan(cfg: SweepConfig) -> list[RunSpec]:
    """Every run of the sweep, the smallest first (so the first results come early). A routed variant
    skips the depths at which it would route no layer (its curve starts at the first that does)."""
    specs = [RunSpec(v, d, b, s) for v in cfg.variants for d in cfg.depths if routes_a_layer(cfg, v, d)
             for b in cfg.budgets for s in cfg.seeds]
    abl_budgets = cfg.ablation_budgets or cfg.budgets
    specs += [RunSpec(v, cfg.the_ablation_depth, b, s) for v in cfg.ablations if v not in cfg.variants
              for b in abl_budgets for s in cfg.seeds]
    return sorted(specs, key=lambda r: (r.budget, r.depth, r.seed, r.variant))


def train_config(cfg: SweepConfig, spec: RunSpec):
    """The `TrainConfig` of one run."""
    from .train import TrainConfig

    model = variant_config(spec.variant, size_config(cfg, spec.depth), cfg.n_experts)
    tc = TrainConfig(model=model, data=cfg.data, seq_len=cfg.seq_len, batch_size=cfg.batch_size, lr=cfg.lr,
                     min_lr=cfg.lr / 10, warmup_steps=0, max_flops=float(spec.budget), eval_batches=cfg.eval_batches,
                     seed=spec.seed, device=cfg.device, dtype=cfg.dtype,
                     out_dir=str(Path(cfg.out_dir) / "runs" / spec.name), cache_dir=cfg.cache_dir, progress=False,
                     log_every=5, keep_last=1)
    total = tc.total_steps()
    tc.warmup_steps = math.ceil(cfg.warmup * total)
    tc.eval_every = tc.ckpt_every = max(1, math.ceil(total / cfg.evals))
    return tc


def check_plan(cfg: SweepConfig, specs: list[RunSpec]) -> dict[str, Any]:
    """Every run's TrainConfig, or one line naming what cannot run (before any training starts)."""
    from .flops import train_step_flops

    if cfg.seq_len > cfg.seq_cap:
        raise ValueError(f"--seq-len {cfg.seq_len} does not fit the size family's max_seq_len {cfg.seq_cap}")
    for v in cfg.variants:
        if not any(s.variant == v for s in specs):
            raise ValueError(f"{v} routes no layer at depth {', '.join(map(str, cfg.depths))}: raise --depths")
    tcs = {}
    for spec in specs:
        try:
            tc = train_config(cfg, spec)
        except ValueError as e:
            raise ValueError(f"{spec.name}: {e}") from None
        if parse_variant(spec.variant)[0] in ROUTED_KINDS and not tc.model.routed_layer_ids:
            every = tc.model.routing.route_every
            raise ValueError(f"{spec.variant} routes no layer at depth {spec.depth} (route_every {every}, the first "
                             f"routed layer is {every - 1}): raise --depths")
        step = train_step_flops(tc.model, tc.context, tc.batch_size * tc.grad_accum)
        if spec.budget < step:
            raise ValueError(f"budget {spec.budget:.3g} FLOPs is less than one optimizer step of {spec.variant} at "
                             f"depth {spec.depth} ({step:.3g} FLOPs for {tc.batch_size} x {tc.context} tokens): "
                             "raise --budgets or lower --depths / --batch-size")
        tcs[spec.name] = tc
    return tcs


# ---- one run: train, evaluate ---------------------------------------------------------------------
def result_path(cfg: SweepConfig, name: str) -> Path:
    """Where the evaluation of run `name` is kept once it is done."""
    return Path(cfg.out_dir) / "results" / f"{name}.json"


def cached_result(cfg: SweepConfig, spec: RunSpec, tc) -> dict[str, Any] | None:
    """The saved result of a finished run with these settings, or None."""
    from .runs import essential

    path = result_path(cfg, spec.name)
    if not path.exists():
        return None
    try:
        saved = read_json_file(path, "sweep result")
    except ValueError:
        return None
    if isinstance(saved, dict) and isinstance(saved.get("settings"), dict):
        from .train import normalised_settings

        saved["settings"] = normalised_settings(saved["settings"])
    return saved if isinstance(saved, dict) and saved.get("settings") == essential(tc.to_dict()) else None


def run_one(cfg: SweepConfig, spec: RunSpec, tc=None) -> dict[str, Any]:
    """Train (or reuse, or resume) one run and evaluate it; the result is written to results/<run>.json."""
    from . import flops
    from .evaluate import run_eval
    from .runs import essential
    from .train import train_or_reuse

    tc = tc or train_config(cfg, spec)
    saved = cached_result(cfg, spec, tc)
    if saved is not None:
        return saved
    path = result_path(cfg, spec.name)
    t0 = time.perf_counter()
    summary = train_or_reuse(tc, cfg.overwrite)
    train_s = time.perf_counter() - t0
    ev = run_eval(summary["checkpoint"], data=cfg.data, batches=cfg.eval_batches, seq_len=cfg.seq_len,
                  batch_size=cfg.batch_size, device=cfg.device, cache_dir=cfg.cache_dir)
    m = tc.model
    p = flops.param_counts(m)
    frac = statistics.fmean(ev["routed_frac_causal"]) if ev["routed_frac_causal"] else None
    result = {
        "run": spec.name, "variant": spec.variant, "depth": spec.depth, "budget": spec.budget, "seed": spec.seed,
        "params": p["total"], "active_params": p["active"], "non_embedding_params": p["non_embedding"],
        "steps": summary["steps"], "tokens": summary["tokens"], "train_flops": summary["flops"],
        "fwd_flops_per_token": flops.forward_flops(m, tc.context) / tc.context,
        "fwd_flops_causal_per_token": (flops.forward_flops(m, tc.context, mode="causal", routed_fraction=frac)
                                       / tc.context if frac is not None else None),
        "loss_topk": ev["loss_topk"], "loss_causal": ev["loss_causal"], "causal_gap": ev["causal_gap"],
        "causal_acc": statistics.fmean(ev["causal_acc"]) if ev["causal_acc"] else None,
        "routed_frac_causal": frac, "eval_tokens": ev["tokens"],
        "train_s": summary.get("time_s") if not summary.get("reused") else None, "wall_s": train_s,
        "run_dir": summary["run_dir"], "checkpoint": summary["checkpoint"],
        "settings": essential(tc.to_dict()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
    return result


def _worker(spec_file: str) -> int:
    """`python -m mixdepth.sweep SPEC.json`: one run in its own process (what `jobs` > 1 starts)."""
    import threading

    import torch

    parent = os.getppid()

    def orphaned() -> None:  # the sweep was killed: stop too (the run resumes from its checkpoint next time)
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=orphaned, daemon=True).start()
    job = read_json_file(spec_file, "sweep job")
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    cfg = SweepConfig(**job["sweep"])
    run_one(cfg, RunSpec(**job["spec"]))
    return 0


# ---- many runs ------------------------------------------------------------------------------------
class _Progress:
    """One view of a sweep's runs: a bar of training steps on a terminal, else a line per finished run."""

    def __init__(self, cfg: SweepConfig, tcs: dict[str, Any], say) -> None:
        self.tcs, self.say = tcs, say
        self.total_steps = {n: tc.total_steps() for n, tc in tcs.items()}
        self.done: set[str] = set()
        self.bar = None
        if cfg.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=sum(self.total_steps.values()), file=sys.stderr, dynamic_ncols=True, unit="step")
        self.t0 = time.perf_counter()

    def _steps(self, name: str) -> int:
        if name in self.done:
            return self.total_steps[name]
        try:
            with open(Path(self.tcs[name].out_dir) / "metrics.jsonl", "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4096))
                last = f.read().splitlines()[-1]
            return int(json.loads(last)["step"])
        except (OSError, IndexError, ValueError, KeyError):
            return 0

    def update(self, running: list[str]) -> None:
        if self.bar is not None:
            self.bar.n = sum(self._steps(n) for n in self.tcs)
            self.bar.set_postfix_str(f"{len(self.done)}/{len(self.tcs)} runs; " + ", ".join(running), refresh=False)
            self.bar.refresh()

    def finished(self, name: str, result: dict[str, Any]) -> None:
        self.done.add(name)
        line = (f"[{len(self.done)}/{len(self.tcs)}] {name}: {result['steps']} steps, loss {result['loss_topk']:.4f}"
                + (f" (causal {result['loss_causal']:.4f})" if result["loss_causal"] is not None else "")
                + f" [{time.perf_counter() - self.t0:.0f} s]")
        if self.bar is not None:
            self.bar.write(line)
            self.update([])
        else:
            self.say(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_all(cfg: SweepConfig, specs: list[RunSpec], tcs: dict[str, Any], say) -> list[dict[str, Any]]:
    """Every run, `cfg.jobs` at a time; results in `specs` order. A failed run stops the sweep with its error."""
    progress = _Progress(cfg, tcs, say)
    results: dict[str, dict[str, Any]] = {}
    level = log.level
    try:
        if cfg.jobs == 1:
            if not log.isEnabledFor(logging.DEBUG):  # the trainers' step lines would drown the progress view
                log.setLevel(logging.WARNING)
            for spec in specs:
                results[spec.name] = run_one(cfg, spec, tcs[spec.name])
                progress.finished(spec.name, results[spec.name])
        else:
            _run_workers(cfg, specs, results, progress)
    finally:
        log.setLevel(level)
        progress.close()
    return [results[s.name] for s in specs]


def _run_workers(cfg: SweepConfig, specs: list[RunSpec], results: dict, progress: _Progress) -> None:
    out = Path(cfg.out_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.jobs)
    sweep_fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    sweep_fields.update(jobs=1, progress=False)
    queue = []
    for spec in specs:  # finished runs are read here, not in a worker
        saved = cached_result(cfg, spec, progress.tcs[spec.name])
        if saved is not None:
            results[spec.name] = saved
            progress.finished(spec.name, saved)
        else:
            queue.append(spec)
    running: dict[str, tuple[subprocess.Popen, Any]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    try:
        while queue or running:
            while queue and len(running) < cfg.jobs:
                spec = queue.pop(0)
                job = out / "logs" / f"{spec.name}.job.json"
                write_json_atomic(job, {"sweep": sweep_fields, "spec": dataclasses.asdict(spec), "threads": threads})
                logf = open(out / "logs" / f"{spec.name}.log", "w")
                proc = subprocess.Popen([sys.executable, "-m", "mixdepth.sweep", str(job)], stdout=logf,
                                        stderr=subprocess.STDOUT, env=env)
                running[spec.name] = (proc, logf)
            time.sleep(0.5)
            for name, (proc, logf) in list(running.items()):
                if proc.poll() is None:
                    continue
                logf.close()
                del running[name]
                if proc.returncode != 0:
                    lines = (out / "logs" / f"{name}.log").read_text(errors="replace").strip().splitlines()
                    raise ValueError(f"run {name} failed: {lines[-1] if lines else f'exit {proc.returncode}'} "
                                     f"(log: {out / 'logs' / (name + '.log')})")
                results[name] = read_json_file(result_path(cfg, name), "sweep result")
                progress.finished(name, results[name])
            progress.update(list(running))
    finally:
        for proc, logf in running.values():  # a failure or Ctrl-C: stop the others; they resume next time
            proc.terminate()
            proc.wait()
            logf.close()


# ---- speed ----------------------------------------------------------------------------------------
def measure_speed(cfg: SweepConfig, results: list[dict[str, Any]], say) -> dict[str, dict[str, Any]]:
    """Decode speed of each variant and size against its dense twin (the variant's trained weights,
    seed of the first result at the largest budget; the twin shares them), batch 1, alternated rounds.

    Measured after all training, one at a time, so nothing else runs beside the timing. Kept in
    speed.json: a resumed sweep reuses what it measured.
    """
    import torch

    from . import bench
    from .checkpoint import load_model
    from .data import load_tokenizer, prepare_corpus
    from .flops import dense_twin
    from .model import MoDTransformer
    from .runtime import resolve_device

    path = Path(cfg.out_dir) / "speed.json"
    speed = read_json_file(path, "sweep speed file") if path.exists() else {}
    if not cfg.decode_tokens:
        return {}
    top = max(r["budget"] for r in results)
    picks: dict[str, dict[str, Any]] = {}
    for r in results:
        key = f"{r['variant']}-d{r['depth']}"
        if r["budget"] == top and (key not in picks or r["seed"] < picks[key]["seed"]):
            picks[key] = r
    device = resolve_device(cfg.device)
    for key, r in picks.items():
        if key in speed and speed[key].get("checkpoint") == r["checkpoint"]:
            continue
        model = load_model(r["checkpoint"], device)
        model.eval()
        mcfg = model.cfg
        if not mcfg.routed_layer_ids and not mcfg.moe.n_experts:
            speed[key] = {"ratio": 1.0, "note": "dense: its own twin", "checkpoint": r["checkpoint"]}
            continue
        if not model.can_decode_causally:
            speed[key] = {"ratio": None, "note": f"{mcfg.routing.router} routing has no causal rule",
                          "checkpoint": r["checkpoint"]}
            continue
        dense = MoDTransformer(dense_twin(mcfg)).to(device)
        dense.load_state_dict(model.state_dict(), strict=False)
        dense.eval()
        tokens = prepare_corpus(cfg.data, load_tokenizer(r["checkpoint"]), cfg.cache_dir)
        n = cfg.decode_context + cfg.decode_tokens
        if n > mcfg.max_seq_len:
            raise ValueError(f"--decode-context + --decode-tokens ({n}) exceeds the models' max_seq_len "
                             f"{mcfg.max_seq_len}")
        stream = torch.as_tensor(tokens.val[:n].astype("int64"))[None].to(device)
        rec = bench.bench_decode(mcfg, 1, cfg.decode_context, cfg.decode_tokens, device=device,
                                 dtype=next(model.parameters()).dtype, rounds=cfg.decode_rounds,
                                 pair=(dense, model), stream=stream)
        speed[key] = {"ratio": rec["ratio"], "ideal": rec["ideal_ratio"], "dense_tok_s": rec["dense_tok_s"],
                      "tok_s": rec["mod_tok_s"], "routed_frac_decode": rec["routed_frac_decode"],
                      "kv_bytes_ratio": rec.get("kv_bytes_ratio"), "checkpoint": r["checkpoint"],
                      "device": str(device), "threads": torch.get_num_threads(), "rounds": cfg.decode_rounds}
        say(f"decode speed {key}: {rec['ratio']:.2f}x its dense twin (ideal {rec['ideal_ratio']:.2f}x, "
            f"{rec['routed_frac_decode']:.1%} routed)")
        write_json_atomic(path, speed)
    write_json_atomic(path, speed)
    return speed


# ---- summary ---------------------------------------------------------------------------------------
RUN_COLUMNS = ("run", "variant", "depth", "budget", "seed", "params", "active_params", "steps", "tokens",
               "train_flops", "fwd_flops_per_token", "loss_topk", "loss_causal", "causal_gap", "causal_acc",
               "routed_frac_causal", "decode_ratio")
SUMMARY_STATS = ("loss_topk", "loss_causal", "causal_acc")


def summarise(results: list[dict[str, Any]], speed: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (variant, depth, budget): the mean and standard deviation over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["variant"], r["depth"], r["budget"]), []).append(r)
    rows = []
    for (variant, depth, budget), rs in groups.items():
        row: dict[str, Any] = {"variant": variant, "depth": depth, "budget": budget, "seeds": len(rs),
                               "params": rs[0]["params"], "active_params": rs[0]["active_params"],
                               "steps": rs[0]["steps"], "fwd_flops_per_token": rs[0]["fwd_flops_per_token"]}
        for key in SUMMARY_STATS:
            row[key], row[key + "_std"] = mean_std([r[key] for r in rs])
        row["decode_ratio"] = (speed.get(f"{variant}-d{depth}") or {}).get("ratio")
        rows.append(row)
    order = {v: i for i, v in enumerate(dict.fromkeys(r["variant"] for r in results))}
    return sorted(rows, key=lambda r: (r["budget"], order[r["variant"]], r["depth"]))


def _csv(rows: list[dict[str, Any]], columns) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()


def format_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table: mean ± standard deviation over seeds."""
    head = ["budget", "variant", "depth", "params", "steps", "FLOPs/token (fwd)", "loss (topk)", "loss (causal)",
            "causal acc", "decode vs dense", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        acc = "-" if r["causal_acc"] is None else f"{100 * r['causal_acc']:.1f}%"
        dec = "-" if r["decode_ratio"] is None else f"{r['decode_ratio']:.2f}x"
        lines.append("| " + " | ".join([f"{r['budget']:.3g}", r["variant"], str(r["depth"]),
                                         f"{r['params'] / 1e6:.2f}M", str(r["steps"]),
                                         f"{r['fwd_flops_per_token'] / 1e6:.2f}M",
                                         fmt_mean_std(r["loss_topk"], r["loss_topk_std"]),
                                         fmt_mean_std(r["loss_causal"], r["loss_causal_std"]), acc, dec,
                                         str(r["seeds"])])
                     + " |")
    return "\n".join(lines)


def _best(rows: list[dict[str, Any]], variant: str, budget: float) -> dict[str, Any] | None:
    cands = [r for r in rows if r["variant"] == variant and r["budget"] == budget and r["loss_topk"] is not None]
    return min(cands, key=lambda r: r["loss_topk"]) if cands else None


def _cmp(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float | None, str]:
    """a - b in loss, its standard error from the seeds' spread, and a verdict word."""
    diff = a["loss_topk"] - b["loss_topk"]
    sa, sb = a["loss_topk_std"], b["loss_topk_std"]
    if sa is None or sb is None:
        return diff, None, "one seed: no spread to judge by"
    se = math.sqrt(sa ** 2 / a["seeds"] + sb ** 2 / b["seeds"])
    if abs(diff) <= 2 * se:
        return diff, se, "within 2 standard errors: not resolved by these seeds"
    return diff, se, "lower" if diff < 0 else "higher"


def findings(rows: list[dict[str, Any]]) -> list[str]:
    """Where the sweep agrees with the paper's claims and where not, each with the seeds' spread."""
    out = []
    budgets = sorted({r["budget"] for r in rows})
    variants = {r["variant"] for r in rows}
    for b in budgets:
        d, m = _best(rows, "dense", b), _best(rows, MAIN_MOD, b)
        if d and m:
            diff, se, word = _cmp(m, d)
            se_s = f", standard error {se:.4f}" if se is not None else ""
            verdict = {"lower": "agrees with the paper (at or below dense)",
                       "higher": "disagrees with the paper (above dense)"}.get(word, word)
            out.append(f"Budget {b:.3g}: the best {MAIN_MOD} (depth {m['depth']}, {m['params'] / 1e6:.2f}M params) "
                       f"reaches {m['loss_topk']:.4f}, the best dense (depth {d['depth']}, {d['params'] / 1e6:.2f}M) "
                       f"{d['loss_topk']:.4f}: difference {diff:+.4f}{se_s}; {verdict}.")
            size = ("larger than" if m["depth"] > d["depth"] else
                    "the same size as" if m["depth"] == d["depth"] else "smaller than")
            out.append(f"Budget {b:.3g}: the best MoD (depth {m['depth']}) is {size} the best dense model (depth "
                       f"{d['depth']}; {'as in' if size == 'larger than' else 'unlike'} the paper).")
        if m and "random-12.5-e2" in variants:
            same = [r for r in rows if r["variant"] == "random-12.5-e2" and r["budget"] == b]
            for rnd in same:
                mod = next((r for r in rows if r["variant"] == MAIN_MOD and r["budget"] == b
                            and r["depth"] == rnd["depth"]), None)
                if mod:
                    diff, se, word = _cmp(rnd, mod)
                    se_s = f", standard error {se:.4f}" if se is not None else ""
                    verdict = {"higher": "agrees with the paper (random worse)",
                               "lower": "disagrees with the paper (random better)"}.get(word, word)
                    out.append(f"Budget {b:.3g}, depth {rnd['depth']}: random routing {rnd['loss_topk']:.4f} vs "
                               f"learned {mod['loss_topk']:.4f}: {diff:+.4f}{se_s}; {verdict}.")
    top = budgets[-1]
    d = _best(rows, "dense", top)
    if d:
        cheaper = [r for r in rows if r["variant"] == MAIN_MOD and r["budget"] == top
                   and r["loss_topk"] <= d["loss_topk"] and r["fwd_flops_per_token"] < d["fwd_flops_per_token"]]
        if cheaper:
            c = min(cheaper, key=lambda r: r["fwd_flops_per_token"])
            out.append(f"Budget {top:.3g}: {MAIN_MOD} at depth {c['depth']} matches the best dense loss "
                       f"({c['loss_topk']:.4f} vs {d['loss_topk']:.4f}) with {c['fwd_flops_per_token'] / 1e6:.2f}M "
                       f"FLOPs per token per forward pass against {d['fwd_flops_per_token'] / 1e6:.2f}M "
                       f"({c['fwd_flops_per_token'] / d['fwd_flops_per_token']:.2f}x), as in the paper.")
        else:
            out.append(f"Budget {top:.3g}: no {MAIN_MOD} size reaches the best dense loss ({d['loss_topk']:.4f}) "
                       "with fewer FLOPs per forward pass (unlike the paper).")
    return out


# ---- plots -----------------------------------------------------------------------------------------
def _colors(variants: list[str]) -> dict[str, Any]:
    from .plots import _pyplot

    plt = _pyplot()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(variants) > len(cycle):  # one distinct colour per variant
        cmap = plt.get_cmap("tab20")
        cycle = [cmap(i) for i in range(cmap.N)]
    return {v: cycle[i % len(cycle)] for i, v in enumerate(variants)}


def _log_x(ax) -> None:
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # the minor labels of a short log axis overlap


def _loss_panels(rows: list[dict[str, Any]], out_png: str | Path, x: str, xlabel: str, title: str,
                 mark_min: bool, suptitle: str | None = None) -> Path:
    """Loss (mean, seed std as bars) against `x`, a line per variant over its sizes, one panel per budget."""
    from .plots import _pyplot, _save

    plt = _pyplot()
    budgets = sorted({r["budget"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    colors = _colors(variants)
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.2 * len(budgets), 4.2), squeeze=False)
    for ax, b in zip(axes[0], budgets):
        for v in variants:
            pts = sorted((r for r in rows if r["variant"] == v and r["budget"] == b), key=lambda r: r[x])
            if not pts:
                continue
            ax.errorbar([r[x] for r in pts], [r["loss_topk"] for r in pts],
                        yerr=[r["loss_topk_std"] or 0.0 for r in pts], color=colors[v], marker="o", markersize=4,
                        capsize=2, linestyle="-" if len(pts) > 1 else "none", label=v)
            if mark_min and len(pts) > 1:
                best = min(pts, key=lambda r: r["loss_topk"])
                ax.plot([best[x]], [best["loss_topk"]], marker="*", markersize=14, color=colors[v],
                        markeredgecolor="black", linestyle="none")
        _log_x(ax)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token, topk)")
        ax.set_title(title.format(budget=b))
        ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return _save(fig, out_png)


def plot_isoflop(rows: list[dict[str, Any]], out_png: str | Path) -> Path:
    """Loss against parameters per variant, one panel per budget; error bars: seed std; stars: minima."""
    return _loss_panels(rows, out_png, "params", "parameters", "isoFLOP: {budget:.3g} training FLOPs", True,
                        "mean over seeds (bars: std); star: the minimum of each curve")


def plot_loss_vs_forward_flops(rows: list[dict[str, Any]], out_png: str | Path) -> Path:
    """Loss against FLOPs per token of a forward pass, each variant's sizes joined, one panel per budget."""
    return _loss_panels(rows, out_png, "fwd_flops_per_token", "FLOPs per token, one forward pass",
                        "{budget:.3g} training FLOPs", False)


def plot_training_curves(results: list[dict[str, Any]], rows: list[dict[str, Any]], out_png: str | Path) -> Path:
    """Training loss (solid, a moving mean over 10 logged steps) and validation loss (dashed, markers)
    against training FLOPs at the largest budget: each variant at its best size, first seed."""
    import numpy as np

    from .plots import _pyplot, _save
    from .runs import read_metrics

    plt = _pyplot()
    top = max(r["budget"] for r in rows)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    colors = _colors(variants)
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    tail: list[float] = []
    for v in variants:
        best = _best(rows, v, top)
        if best is None:
            continue
        pick = min((r for r in results if r["variant"] == v and r["budget"] == top and r["depth"] == best["depth"]),
                   key=lambda r: r["seed"])
        recs = read_metrics(pick["run_dir"])
        train = [(r["flops"], r["lm_loss"]) for r in recs if r.get("lm_loss") is not None]
        val = [(r["flops"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
        label = f"{v} (depth {best['depth']}, seed {pick['seed']})"
        if train:
            xs, ys = np.array(train).T
            ys = np.convolve(ys, np.ones(10) / 10, mode="valid") if len(ys) >= 10 else ys
            ax.plot(xs[len(xs) - len(ys):], ys, color=colors[v], linewidth=1.2, label=label)
            tail += list(ys[len(ys) // 3:])
        if val:
            xs, ys = np.array(val).T
            ax.plot(xs, ys, color=colors[v], linestyle="--", marker="o", markersize=3, linewidth=1)
    if tail:  # the later part of training, not the first steps' loss of ~5.5
        lo, hi = np.percentile(tail, [0, 100])
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.15 * (hi - lo))
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(f"training (solid, mean of 10 logs) and validation (dashed) loss, {top:.3g} FLOPs, best size each",
                 fontsize=9)
    return _save(fig, out_png)


def echo_report(say, table: str, notes: list[str]) -> None:
    """The table and the findings, as a sweep or a study prints them at the end."""
    say("")
    say(table)
    say("")
    for n in notes:
        say(f"- {n}")


# ---- the whole sweep ------------------------------------------------------------------------------
def run_sweep(cfg: SweepConfig, *, echo=None) -> dict[str, Any]:
    """Plan, check, train, evaluate, time and report a sweep (see the module docstring)."""
    from .data import ByteTokenizer, prepare_corpus

    say = echo or (lambda line: None)
    out = Path(cfg.out_dir)
    specs = plan(cfg)
    tcs = check_plan(cfg, specs)  # every error before any training
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tokens = prepare_corpus(cfg.data, ByteTokenizer(), cfg.cache_dir)
    say(f"sweep {out}: {len(specs)} runs ({len(cfg.variants)} variants x {len(cfg.depths)} sizes x "
        f"{len(cfg.budgets)} budgets x {len(cfg.seeds)} seeds" +
        (f", + {len([s for s in specs if s.variant in cfg.ablations and s.variant not in cfg.variants])} ablation runs "
         f"at depth {cfg.the_ablation_depth}" if cfg.ablations else "") +
        f"), corpus {cfg.data} ({len(tokens.train):,} train tokens), {cfg.jobs} at a time")
    write_json_atomic(out / "sweep.json", dataclasses.asdict(cfg))
    results = _run_all(cfg, specs, tcs, say)
    train_s = time.perf_counter() - t0
    speed = measure_speed(cfg, results, say)
    for r in results:
        r["decode_ratio"] = (speed.get(f"{r['variant']}-d{r['depth']}") or {}).get("ratio")
    rows = summarise(results, speed)
    table = format_table(rows)
    notes = findings(rows)
    write_text_atomic(out / "runs.csv", _csv(results, RUN_COLUMNS))
    cols = ["variant", "depth", "budget", "seeds", "params", "active_params", "steps", "fwd_flops_per_token",
            *[k + s for k in SUMMARY_STATS for s in ("", "_std")], "decode_ratio"]
    write_text_atomic(out / "summary.csv", _csv(rows, cols))
    write_text_atomic(out / "table.md", table + "\n")
    write_text_atomic(out / "findings.md", "\n".join(f"- {n}" for n in notes) + "\n")
    figures = {"isoflop": plot_isoflop(rows, out / "isoflop.png"),
               "loss_vs_forward_flops": plot_loss_vs_forward_flops(rows, out / "loss_vs_forward_flops.png"),
               "training_curves": plot_training_curves(results, rows, out / "training_curves.png")}
    total_s = time.perf_counter() - t0
    echo_report(say, table, notes)
    say(f"\ntrained and evaluated in {train_s:.0f} s, total {total_s:.0f} s; outputs in {out}")
    return {"out_dir": str(out), "results": results, "rows": rows, "table": table, "findings": notes,
            "figures": {k: str(v) for k, v in figures.items()}, "speed": speed, "time_s": total_s}


if __name__ == "__main__":  # a worker of `jobs` > 1
    try:
        sys.exit(_worker(sys.argv[1]))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
