"""A pretrained model made Mixture-of-Depths: measured layer sensitivity, routers tuned by
self-distillation with the trunk frozen, a calibrated compute dial, and the quality/speed curve
against static layer dropping and random routing on the same model.

The recipe (`tune`), for a converted checkpoint (`mixdepth convert`):
1. Sensitivity: for every layer and unit (block, attention, MLP), the KL divergence from the source
   and the rise of the held-in next-token loss when that unit is skipped for every token
   (`layer_sensitivity`). The least sensitive layers are the ones routed.
2. Tuning: routers (and predictors) train with every trunk weight frozen, on the KL divergence from
   the dense source's own next-token distribution on the same text (self-distillation: no labels),
   in `topk` mode at routed fractions drawn from the dial, with the straight-through gate (value 1,
   so at fraction 1 the model is the source exactly, and the router still gets the gate's gradient).
3. Calibration: one pass per dial fraction (`MoDTransformer.calibrate_causal(dial=...)`), so the
   fraction asked of `generate --fraction` / `eval --fraction` is the fraction routed.
4. The curve (`curve`): held-out perplexity and KL from the source against decode tokens/s at
   batch 1 and 8 and FLOPs per token, for tuned MoD, layer dropping and random-token routing at
   each fraction, beside the source, all measured in one process.

Layer dropping (`drop_layers`) builds a real smaller model (the kept blocks, sharing the weights),
so its speed is that of a model without those layers, not of a mask. Every model here shares the
source's trunk tensors: nothing is copied.

Dimensions: B batch, T tokens, D width, V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoint import is_routing_parameter, load_checkpoint_tokenizer, load_model, save_checkpoint
from .config import UNITS, ModelConfig, _Serializable
from .data import prepare_corpus
from .files import read_json_file, write_json_atomic, write_text_atomic
from .flops import decode_flops_per_token
from .model import MoDTransformer

log = logging.getLogger("mixdepth")

OBJECTIVES = ("relaxed", "topk")
DIAL = (1.0, 0.9, 0.75, 0.5, 0.25)
"""The routed fractions of the curve."""
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Write a haiku about the sea.",
    "Explain what a prime number is in one sentence.",
    "What should I pack for a weekend camping trip?",
)


@dataclass(kw_only=True)
class TuneConfig(_Serializable):
    """Settings of `mixdepth tune`."""

    units: list[str] = field(default_factory=lambda: ["mlp", "block", "attn"])
    """Routed units to tune and compare: `block`, `attn`, `mlp`; the first is the main model."""
    routed: int = 0
    """Layers to route (the least sensitive); 0 means two thirds of the layers."""
    steps: int = 100
    """Router training steps per unit."""
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 3e-3
    train_fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    """Routed fractions of the `topk` training steps, in turn."""
    objective: str = "relaxed"
    """Router training: `relaxed` (every token's gradient) or `topk` (the paper's; see `tune_routers`)."""
    causal_method: str = "aux_loss"
    """The causal rule at sampling: `aux_loss` (the router's own score against a threshold: no
    second network at decode time) or `predictor`."""
    aux_loss_weight: float = 0.0
    """Weight of the BCE pulling router logits toward their own choices (`aux_loss`); the relaxed
    objective already trains the score it thresholds, so 0 by default."""
    sensitivity_windows: int = 4
    """Windows (of `seq_len`, from the training split) on which sensitivity is measured."""
    calibration_windows: int = 8
    """Windows (training split) on which the dial is calibrated."""
    eval_windows: int = 16
    """Held-out windows (validation split, never trained or calibrated on) of the curve."""
    dial: list[float] = field(default_factory=lambda: list(DIAL))
    """Routed fractions of the curve (1.0 is the source's compute)."""
    prompt_len: int = 64
    new_tokens: int = 32
    rounds: int = 3
    """Timing rounds (the models alternate within each round; medians are reported)."""
    data: str = "shakespeare"
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [u for u in self.units if u not in UNITS]
        if not self.units or bad:
            raise ValueError(f"tune units must be some of {UNITS}, got {self.units}")
        if len(set(self.units)) != len(self.units):
            raise ValueError(f"tune units must not repeat, got {self.units}")
        for name in ("steps", "batch_size", "seq_len", "sensitivity_windows", "calibration_windows",
                     "eval_windows", "prompt_len", "new_tokens", "rounds"):
            v = getattr(self, name)
            low = 0 if name == "steps" else 1
            if not isinstance(v, int) or v < low:
                raise ValueError(f"tune {name} must be an integer >= {low}, got {v}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0 or math.isinf(self.lr):
            raise ValueError(f"tune lr must be a number > 0, got {self.lr}")
        if not isinstance(self.routed, int) or self.routed < 0:
            raise ValueError(f"tune routed must be an integer >= 0, got {self.routed}")
        for name in ("train_fractions", "dial"):
            fs = getattr(self, name)
            if not fs or any(not 0 < f <= 1 for f in fs):
                raise ValueError(f"tune {name} must be fractions in (0, 1], got {fs}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"tune objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.causal_method not in ("aux_loss", "predictor"):
            raise ValueError(f"tune causal_method must be aux_loss or predictor, got {self.causal_method!r}")


# ---- models that share the source's trunk ---------------------------------------------------------
def _is_routing_state(key: str) -> bool:
    """A router's, predictor's or calibration buffer's state-dict key (not a pretrained weight)."""
    return is_routing_parameter(key) or key.endswith(("causal_threshold", "threshold_table"))


def trunk_tensors(model: MoDTransformer) -> dict[str, torch.Tensor]:
    """The pretrained weights of a model (no routers, predictors or calibration buffers)."""
    return {k: v for k, v in model.state_dict().items() if not _is_routing_state(k)}


def with_config(source: MoDTransformer, cfg: ModelConfig, seed: int = 0) -> MoDTransformer:
    """A model of `cfg` (the source's architecture, other routing) holding the source's trunk
    tensors themselves (no copy), with fresh routers from `seed`."""
    return _holding(cfg, trunk_tensors(source), source.embed_tokens.weight.device, seed)


def _holding(cfg: ModelConfig, tensors: dict[str, torch.Tensor], device, seed: int = 0) -> MoDTransformer:
    """A model of `cfg` whose weights are `tensors` themselves (assigned on the meta device, as
    `hf` builds converted models), its other parts fresh from `seed`."""
    with torch.device("meta"):
        model = MoDTransformer(cfg)
    model.load_state_dict(tensors, strict=False, assign=True)
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(seed)
        model.materialize(device)
    return model.eval()


def load_routing(model: MoDTransformer, ckpt: str | Path) -> None:
    """Load only the routers, predictors and calibration of a tuned checkpoint into `model`, whose
    trunk tensors (shared with the source) are left untouched."""
    from safetensors.torch import load_file

    from .checkpoint import verify_checkpoint

    path = verify_checkpoint(ckpt) / "model.safetensors"
    mine = {k for k in model.state_dict() if _is_routing_state(k)}
    saved = {k: v for k, v in load_file(path).items() if k in mine}
    if set(saved) != mine:
        missing = sorted(mine - set(saved))
        raise ValueError(f"{path} lacks {missing[0]}: not a checkpoint tuned with these settings")
    model.load_state_dict(saved, strict=False)


def dense_source(model: MoDTransformer) -> MoDTransformer:
    """The converted model without routing: the pretrained network itself (frozen)."""
    source = with_config(model, model.cfg.with_routing(router="none", routed_layers=None))
    source.requires_grad_(False)
    return source


def drop_layers(source: MoDTransformer, drop: list[int]) -> MoDTransformer:
    """The source without the blocks `drop` (static layer dropping): a smaller dense model whose
    blocks are the kept ones, sharing their weights."""
    cfg = source.cfg
    keep = [i for i in range(cfg.n_layers) if i not in set(drop)]
    if not keep:
        raise ValueError("cannot drop every layer")
    small = dataclasses.replace(cfg.with_routing(router="none", routed_layers=None), n_layers=len(keep))
    tensors = {}
    for k, v in trunk_tensors(source).items():
        if k.startswith("layers."):
            i, rest = k[len("layers."):].split(".", 1)
            if int(i) not in keep:
                continue
            k = f"layers.{keep.index(int(i))}.{rest}"
        tensors[k] = v
    return _holding(small, tensors, source.embed_tokens.weight.device)


# ---- sensitivity --------------------------------------------------------------------------------
def _skip(layer, unit: str, h: torch.Tensor, cos, sin) -> torch.Tensor:
    """The residual stream after `layer` with `unit` skipped for every token."""
    if unit == "block":
        return h
    if unit == "attn":
        return h + layer.mlp(layer.post_attention_layernorm(h))
    return h + layer.self_attn(layer.input_layernorm(h), cos, sin)


def kl_from(ref_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(source || model), in nats, from the source's log-probabilities (..., V)."""
    logp = logits.float().log_softmax(-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()


@torch.no_grad()
def layer_sensitivity(source: MoDTransformer, x: torch.Tensor, y: torch.Tensor,
                      units: list[str] | tuple[str, ...] = UNITS) -> dict[str, dict[str, list[float]]]:
    """For each unit and layer: the KL from the source (nats per token) and the next-token loss
    rise when that layer's unit is skipped for every token of `x` (B, T); `y` (B, T) next tokens.

    The source runs once; each skip reuses the residual stream up to its layer.
    Returns {unit: {"kl": [L], "loss_rise": [L]}}.
    """
    model = source
    T = x.shape[1]
    cos, sin = model.rope(torch.arange(T, device=x.device))

    def head(h):
        return model.lm_head(model.norm(h)).float()

    h = model.embed_tokens(x)
    states = [h]
    for layer in model.layers:
        h = h + layer.delta(h, cos, sin)
        states.append(h)
    ref_logits = head(h)
    ref_logp = ref_logits.log_softmax(-1)
    ref_loss = F.cross_entropy(ref_logits.transpose(1, 2), y)
    out = {}
    for unit in units:
        kls, rises = [], []
        for i, layer in enumerate(model.layers):
            h = _skip(layer, unit, states[i], cos, sin)
            for later in model.layers[i + 1:]:
                h = h + later.delta(h, cos, sin)
            logits = head(h)
            kls.append(float(kl_from(ref_logp, logits)))
            rises.append(float(F.cross_entropy(logits.transpose(1, 2), y) - ref_loss))
        out[unit] = {"kl": kls, "loss_rise": rises}
    return out


def least_sensitive(kl: list[float], n: int) -> list[int]:
    """The `n` layers whose skipping costs the least KL, in layer order."""
    return sorted(sorted(range(len(kl)), key=lambda i: (kl[i], i))[:n])


def format_sensitivity(sens: dict[str, dict[str, list[float]]]) -> str:
    units = list(sens)
    lines = ["KL from the source (nats/token) when a layer's unit is skipped for every token:",
             "layer " + "".join(f"{u:>10}" for u in units)]
    for i in range(len(sens[units[0]]["kl"])):
        lines.append(f"{i:>5} " + "".join(f"{sens[u]['kl'][i]:>10.4f}" for u in units))
    return "\n".join(lines)


# ---- router tuning ------------------------------------------------------------------------------
def freeze_trunk(model: MoDTransformer) -> list[torch.nn.Parameter]:
    """Freeze every parameter but the routers' and predictors'; returns those."""
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(is_routing_parameter(name))
        if p.requires_grad:
            trainable.append(p)
    return trainable


def tune_routers(model: MoDTransformer, source: MoDTransformer, batches: Callable[[int], torch.Tensor],
                 steps: int, fractions: list[float], lr: float, objective: str = "relaxed",
                 on_step: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Train `model`'s routers (trunk frozen) on KL(source || model) plus the routers' own
    auxiliary losses; step s runs at routed fraction `fractions[s % len]` on `batches(s)` (B, T).

    `objective`: `relaxed` (every token runs each routed unit, kept by a hard gate with a
    straight-through gradient: chosen and skipped tokens alike tell the router whether the unit
    helps them; `MoDTransformer.forward(relax=...)`) or `topk` (the paper's training: only the
    chosen tokens run, and only they send the router a gradient, through the gate).
    Returns the log, one dict per step."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if not fractions:
        raise ValueError("tune_routers needs at least one routed fraction")
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    params = freeze_trunk(model)
    if not params:
        raise ValueError("the model has no router parameters to tune")
    opt = torch.optim.Adam(params, lr=lr)
    rc = model.cfg.routing
    capacity = rc.capacity
    history = []
    model.train()
    try:
        for step in range(steps):
            x = batches(step)
            with torch.no_grad():
                ref_logp = source(x).logits.float().log_softmax(-1)
            f = fractions[step % len(fractions)]
            if objective == "relaxed":
                out = model(x, mode="dense", relax=f)
            else:
                rc.capacity = f  # the routed layers read their config's capacity
                out = model(x, mode="topk")
            kl = kl_from(ref_logp, out.logits)
            loss = kl + sum(out.loss_weights[k] * v for k, v in out.losses.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rec = {"step": step + 1, "fraction": f, "kl": float(kl.detach()),
                   **{k: float(v.detach()) for k, v in out.losses.items()}}
            history.append(rec)
            if on_step:
                on_step(step, rec)
    finally:
        rc.capacity = capacity
        model.eval()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    return history


# ---- the curve ----------------------------------------------------------------------------------
@torch.no_grad()
def heldout_quality(model: MoDTransformer, ref_logp: list[torch.Tensor], windows: list,
                    fraction: float | None = None) -> dict[str, float]:
    """Held-out perplexity, KL from the source and the routed fraction, in causal mode (the
    sampling-time decision) at `fraction` of the dial."""
    th = model.causal_thresholds(fraction) if fraction is not None and model.routed_layers else None
    nll = kl = 0.0
    n = 0
    routed = []
    for (x, y), ref in zip(windows, ref_logp):
        out = model(x, mode="causal", thresholds=th)
        logits = out.logits.float()
        nll += float(F.cross_entropy(logits.transpose(1, 2), y, reduction="sum"))
        kl += float(kl_from(ref, logits)) * y.numel()
        n += y.numel()
        if out.routed_frac is not None:
            routed.append(float(out.routed_frac.mean()))
    return {"ppl": math.exp(nll / n), "kl": kl / n, "routed": statistics.mean(routed) if routed else 1.0}


def decode_speed(model: MoDTransformer, prompts: list[list[int]], new_tokens: int, fraction: float | None) -> float:
    """Decode tokens/s of one greedy generation (all rows)."""
    from .generate import generate

    res = generate(model, prompts, max_new_tokens=new_tokens, fraction=fraction, fraction_rule="threshold").run()
    return res.decode_tokens_per_s


@dataclass
class Point:
    """One model at one operating point of the curve."""

    name: str
    variant: str
    fraction: float
    model: MoDTransformer
    gen_fraction: float | None
    extra: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def measure_curve(points: list[Point], source: MoDTransformer, windows, prompts: list[list[int]],
                  batch_sizes: tuple[int, ...], new_tokens: int, rounds: int, context: int) -> list[dict[str, Any]]:
    """Quality, FLOPs and decode speed of every point; timings alternate between the points within
    each round (so drift hits all alike), medians over `rounds`, ratios against the source."""
    ref = [source(x).logits.float().log_softmax(-1) for x, _ in windows]
    rows = []
    for p in points:
        q = heldout_quality(p.model, ref, windows, p.gen_fraction)
        f = q["routed"]
        rows.append({"name": p.name, "variant": p.variant, "fraction": p.fraction, **p.extra,
                     "ppl": q["ppl"], "kl": q["kl"], "routed_measured": f,
                     "flops_per_token": decode_flops_per_token(p.model.cfg, context, routed_fraction=f)})
        log.info("quality %-22s ppl %.3f  KL %.4f  routed %.3f", p.name, q["ppl"], q["kl"], f)
    times: dict[tuple[int, int], list[float]] = {}
    for b in batch_sizes:
        rows_prompts = (prompts * b)[:b]
        for p in points:  # warm-up: first-call allocations and kernel choices
            decode_speed(p.model, rows_prompts, 4, p.gen_fraction)
        for r in range(rounds):
            for j, p in enumerate(points):
                times.setdefault((b, j), []).append(decode_speed(p.model, rows_prompts, new_tokens, p.gen_fraction))
            log.info("decode batch %d round %d/%d done", b, r + 1, rounds)
    base = next(i for i, p in enumerate(points) if p.variant == "source")
    for b in batch_sizes:
        ref_tps = statistics.median(times[(b, base)])
        for j, row in enumerate(rows):
            tps = statistics.median(times[(b, j)])
            row[f"tok_s_b{b}"] = tps
            row[f"speedup_b{b}"] = tps / ref_tps
    src = rows[base]
    for row in rows:
        row["ppl_ratio"] = row["ppl"] / src["ppl"]
        row["flops_ratio"] = row["flops_per_token"] / src["flops_per_token"]
    return rows


def format_curve(rows: list[dict[str, Any]], batch_sizes: tuple[int, ...]) -> str:
    """A markdown table of the curve."""
    head = ["model", "fraction", "routed", "ppl", "ppl vs source", "KL", "FLOPs/token"]
    head += [f"tok/s b{b}" for b in batch_sizes] + [f"speed b{b}" for b in batch_sizes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], f"{r['fraction']:.2f}", f"{r['routed_measured']:.3f}", f"{r['ppl']:.3f}",
                 f"{100 * (r['ppl_ratio'] - 1):+.1f}%", f"{r['kl']:.4f}", f"{r['flops_per_token'] / 1e6:.1f}M"]
        cells += [f"{r[f'tok_s_b{b}']:.1f}" for b in batch_sizes]
        cells += [f"{r[f'speedup_b{b}']:.2f}x" for b in batch_sizes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curve(rows: list[dict[str, Any]], batch_sizes: tuple[int, ...], out_png: str | Path, title: str) -> Path:
    """Perplexity against decode speed (one panel per batch size) and against FLOPs per token."""
    from .plots import _pyplot, _save

    plt = _pyplot()
    panels = [(f"speedup_b{b}", f"decode speed vs source, batch {b}") for b in batch_sizes]
    panels.append(("flops_ratio", "FLOPs per token vs source"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), sharey=True)
    styles = {"mod": ("o-", None), "layer_drop": ("s--", "tab:red"), "random": ("^:", "tab:gray")}
    src = next(r for r in rows if r["variant"] == "source")
    for ax, (key, label) in zip(axes, panels):
        groups: dict[str, list[dict]] = {}
        for r in rows:
            if r["variant"] != "source":
                groups.setdefault(r["name"].rsplit("@", 1)[0], []).append(r)
        for name, rs in groups.items():
            style, color = styles.get(rs[0]["variant"], ("o-", None))
            rs = sorted(rs, key=lambda r: r[key])
            ax.plot([r[key] for r in rs], [r["ppl"] for r in rs], style, color=color, label=name)
        ax.plot([src[key]], [src["ppl"]], "k*", markersize=14, label="source (dense)")
        ax.axhline(src["ppl"] * 1.03, color="k", lw=0.6, ls=":")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out perplexity (dotted: source +3%)")
    axes[0].set_yscale("log")
    axes[-1].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, out_png)


# ---- the whole recipe ---------------------------------------------------------------------------
def _checkpoint_ready(path: Path) -> bool:
    return (path / "manifest.json").exists()


def tune(ckpt: str | Path, out: str | Path, tc: TuneConfig, *, curve: bool = True,
         batch_sizes: tuple[int, ...] = (1, 8), cache_dir: str | None = None) -> dict[str, Any]:
    """Run the recipe on a converted checkpoint; writes into `out`:
    `sensitivity.json`, `mod-<unit>/` (a checkpoint per unit: trained routers, calibrated dial, the
    sensitivity and the tuning log in trainer.json), and with `curve`: `curve.json`, `curve.md`,
    `curve.png`, `answers.md`. A finished stage is not redone when the command runs again (resume)."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = out / "tune.json"
    mine = {"source": str(Path(ckpt).resolve()), **tc.to_dict()}
    if settings.exists() and read_json_file(settings) != mine:
        raise ValueError(f"{settings} holds another source or other settings: use a new --out, or the same "
                         "source and settings to resume")
    write_json_atomic(settings, mine)
    torch.manual_seed(tc.seed)
    loaded = load_model(ckpt, "cpu")
    tokenizer = load_checkpoint_tokenizer(ckpt)
    source = dense_source(loaded)
    del loaded
    cfg = source.cfg
    T = min(tc.seq_len, cfg.max_seq_len)
    tokens = prepare_corpus(tc.data, tokenizer, cache_dir)
    tokens.check_fits(T, cfg.vocab_size)

    def train_windows(n: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = tokens.eval_offsets(T, n + offset, split="train")[offset:]
        return tokens.batch_at("train", starts, T)

    # 1. sensitivity (train split: the held-out text stays unseen)
    spath = out / "sensitivity.json"
    units = list(dict.fromkeys(["block", *tc.units]))  # layer dropping ranks whole blocks
    if spath.exists():
        sens = read_json_file(spath)
    else:
        x, y = train_windows(tc.sensitivity_windows, 0)
        ts = time.perf_counter()
        sens = layer_sensitivity(source, x, y, units)
        log.info("sensitivity measured in %.0f s", time.perf_counter() - ts)
        write_json_atomic(spath, sens)
    log.info("%s", format_sensitivity(sens))
    n_routed = tc.routed or round(2 * cfg.n_layers / 3)
    n_routed = min(n_routed, cfg.n_layers)

    # 2-3. tune and calibrate, one checkpoint per unit
    calib_x, _ = train_windows(tc.calibration_windows, tc.sensitivity_windows)
    gen = torch.Generator().manual_seed(tc.seed)
    models: dict[str, MoDTransformer] = {}
    for unit in tc.units:
        path = out / f"mod-{unit}"
        layers = least_sensitive(sens[unit]["kl"], n_routed)
        routing = dataclasses.replace(
            cfg.routing, router="expert_choice", routed_layers=layers, unit=unit, gate="straight_through",
            # the trunk is frozen: the router gradient through the residual reaches only earlier routers
            router_detach=False, causal_method=tc.causal_method, aux_loss_weight=tc.aux_loss_weight, capacity=0.5,
            mode="causal")
        mcfg = dataclasses.replace(cfg, routing=routing)
        if _checkpoint_ready(path):
            model = with_config(source, mcfg)
            load_routing(model, path)
            models[unit] = model.eval()
            for _ in range(tc.steps):  # the batches this unit drew, so the next unit draws what a fresh run does
                tokens.get_batch("train", tc.batch_size, T, gen)
            log.info("mod-%s: tuned checkpoint found, not redone", unit)
            continue
        model = with_config(source, mcfg, seed=tc.seed)
        log.info("mod-%s: routing layers %s; tuning routers for %d steps", unit, layers, tc.steps)
        ts = time.perf_counter()

        def on_step(step, rec, unit=unit, ts=ts):
            if (step + 1) % 10 == 0 or step == 0:
                log.info("mod-%s step %d/%d  fraction %.2f  KL %.4f  (%.1f s/step)", unit, step + 1, tc.steps,
                         rec["fraction"], rec["kl"], (time.perf_counter() - ts) / (step + 1))

        history = tune_routers(model, source, lambda s: tokens.get_batch("train", tc.batch_size, T, gen)[0],
                               tc.steps, tc.train_fractions, tc.lr, tc.objective, on_step)
        tune_s = time.perf_counter() - ts
        with torch.no_grad():
            model.calibrate_causal(calib_x, fraction=0.5, dial=[i / 20 for i in range(1, 20)])
        state = {"data": tc.data, "seq_len": T, "tune": tc.to_dict(), "unit": unit, "routed_layers": layers,
                 "sensitivity": sens, "history": history, "tune_seconds": tune_s, "source": str(ckpt)}
        save_checkpoint(path, model, trainer_state=state, tokenizer=tokenizer)
        log.info("mod-%s: tuned in %.0f s, saved %s", unit, tune_s, path)
        models[unit] = model
    result: dict[str, Any] = {"sensitivity": sens, "routed": n_routed,
                              "checkpoints": [str(out / f"mod-{u}") for u in tc.units]}
    if not curve:
        return result

    # 4. the curve
    points = [Point("source", "source", 1.0, source, None)]
    block_kl = sens["block"]["kl"]
    for f in tc.dial:
        for unit, model in models.items():
            points.append(Point(f"mod-{unit}@{f:g}", "mod", f, model, f))
        n_drop = round(n_routed * (1 - f))
        if n_drop:
            dropped = least_sensitive(block_kl, n_drop)
            points.append(Point(f"layer_drop@{f:g}", "layer_drop", f, drop_layers(source, dropped), None,
                                {"dropped": dropped}))
        main = models[tc.units[0]]
        rnd = with_config(source, dataclasses.replace(main.cfg, routing=dataclasses.replace(
            main.cfg.routing, router="random_token")))
        with torch.no_grad():
            rnd.calibrate_causal(calib_x, fraction=f, dial=[f])
        points.append(Point(f"random-{tc.units[0]}@{f:g}", "random", f, rnd, f))
    val = tokens.eval_offsets(T, tc.eval_windows)
    windows = [tokens.batch_at("val", val[i:i + tc.batch_size], T) for i in range(0, len(val), tc.batch_size)]
    pstarts = tokens.eval_offsets(tc.prompt_len, 8, split="val")
    prompts = [tokens.val[s:s + tc.prompt_len].astype("int64").tolist() for s in pstarts]
    context = tc.prompt_len + tc.new_tokens // 2
    rows = measure_curve(points, source, windows, prompts, batch_sizes, tc.new_tokens, tc.rounds, context)
    answers = chat_answers(source, models[tc.units[0]], tokenizer, answer_fraction(rows, tc.units[0]))
    elapsed = time.perf_counter() - t0
    result.update(rows=rows, answers=answers, seconds=elapsed, batch_sizes=list(batch_sizes),
                  device=f"cpu, {torch.get_num_threads()} threads", model=str(ckpt))
    write_json_atomic(out / "curve.json", result)
    table = format_curve(rows, batch_sizes)
    write_text_atomic(out / "curve.md", table + "\n")
    write_text_atomic(out / "answers.md", format_answers(answers) + "\n")
    plot_curve(rows, batch_sizes, out / "curve.png", f"{Path(str(ckpt)).name}: held-out perplexity vs compute "
                                                      f"({n_routed} of {cfg.n_layers} layers routed)")
    log.info("%s", table)
    log.info("recipe done in %.1f min", elapsed / 60)
    return result


def answer_fraction(rows: list[dict[str, Any]], unit: str) -> float:
    """The lowest dial fraction of the main model whose perplexity is within 3% of the source's
    (the operating point of the chat answers), else the highest below 1."""
    mod = sorted((r for r in rows if r["name"].startswith(f"mod-{unit}@") and r["fraction"] < 1),
                 key=lambda r: r["fraction"])
    ok = [r for r in mod if r["ppl_ratio"] <= 1.03]
    return (ok[0] if ok else mod[-1])["fraction"] if mod else 1.0


@torch.no_grad()
def chat_answers(source: MoDTransformer, model: MoDTransformer, tokenizer, fraction: float,
                 prompts: tuple[str, ...] = CHAT_PROMPTS, new_tokens: int = 48) -> list[dict[str, Any]]:
    """Greedy answers of the source and of the tuned model (at `fraction`) to chat prompts, with
    tokens/s and the routed fraction of each."""
    from .generate import encode_prompts, generate

    chat = getattr(tokenizer, "chat_template", None) is not None
    ids = encode_prompts(tokenizer, list(prompts), source.cfg.vocab_size, chat=chat)
    stop = [int(t) for t in getattr(tokenizer, "stop_ids", ())]
    rows = []
    for prompt, p in zip(prompts, ids):
        row = {"prompt": prompt}
        for name, m, f in (("source", source, None), ("tuned", model, fraction)):
            res = generate(m, [p], max_new_tokens=new_tokens, fraction=f, fraction_rule="threshold",
                           stop=stop or None).run()
            toks = [t for t in res.tokens[0] if t not in stop]
            fr = res.decode_routed_fraction
            row[name] = {"text": tokenizer.decode(toks).strip(), "tok_s": res.tokens_per_s,
                         "routed": statistics.mean(fr.values()) if fr else 1.0, "fraction": f}
        rows.append(row)
    return rows


def format_answers(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    f = rows[0]["tuned"]["fraction"]
    lines = [f"| prompt | source (dense) | tuned MoD at --fraction {f:g} |", "|---|---|---|"]
    for r in rows:
        def cell(a):
            text = a["text"].replace("|", "\\|").replace("\n", " ")
            return f"{text} *({a['tok_s']:.1f} tok/s, routed {100 * a['routed']:.0f}%)*"

        lines.append(f"| {r['prompt']} | {cell(r['source'])} | {cell(r['tuned'])} |")
    return "\n".join(lines)
