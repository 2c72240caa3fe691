"""`mixdepth train`: a `TrainConfig` from flags, then `mixdepth.train.run_train`."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from ..checkpoint import load_config
from ..config import RUN_DERIVED, ModelConfig
from ..files import read_json_file
from ..flags import (
    CLIError,
    add_dataclass_args,
    add_device_args,
    add_model_args,
    load_config_file,
    model_config_from_args,
    overrides_from_args,
)
from ..train import TrainConfig, run_train

BUDGETS = ("max_steps", "max_tokens", "max_flops")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, default_preset=None)
    add_dataclass_args(parser, TrainConfig, "train", skip=("out_dir", "resume", "progress", "device", "dtype", "init"))
    parser.add_argument("--init", "--train.init", dest="train.init", default=None, metavar="CKPT",
                        help="start from this checkpoint's weights, tokenizer and architecture (e.g. one made by "
                             "`mixdepth convert`), with a fresh optimizer; --train.trainable routing trains only "
                             "routers and predictors")
    add_device_args(parser, prefix="train")
    parser.add_argument("--out", dest="train.out_dir", default=None, metavar="DIR",
                        help=f"run folder (default: {TrainConfig.__dataclass_fields__['out_dir'].default})")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from flags: defaults < --preset < --config FILE < flags; a resume starts from run.json.

    On `--resume`, the run's saved `run.json` is the base, and its model is kept unless a preset,
    a model or routing section of the file, or a model or routing flag gives one. With
    `--train.init CKPT` (and no preset or model settings) the model is the checkpoint's, with any
    routing settings applied. A budget flag replaces the base's budget (one budget at most).
    """
    train = overrides_from_args(args, "train")
    out = train.get("out_dir", TrainConfig.__dataclass_fields__["out_dir"].default)
    file = load_config_file(args)
    # a --config file with only training settings keeps the resumed run's model
    model_given = (args.preset is not None or "model" in file or "routing" in file or "moe" in file
                   or overrides_from_args(args, "model") or overrides_from_args(args, "routing")
                   or overrides_from_args(args, "moe"))
    base: dict[str, Any] = {}
    if args.resume and (Path(out) / "run.json").exists():
        base = read_json_file(Path(out) / "run.json")
        for k in RUN_DERIVED:
            base.pop(k, None)
    base.update(file.get("train", {}))
    if args.resume and base and not model_given:
        model = ModelConfig.from_dict(base["model"], prefix="model.")
    elif train.get("init") and args.preset is None and "model" not in file and not overrides_from_args(args, "model"):
        # start from a checkpoint: its architecture, with the routing the flags or file give
        model = load_config(train["init"])
        routing = {**file.get("routing", {}), **overrides_from_args(args, "routing")}
        if routing:
            model = model.with_routing(**routing)
    else:
        if args.preset is None:
            args.preset = "debug"
        model = model_config_from_args(args)
    base.update(train)
    if any(k in train for k in BUDGETS):  # a flag's budget replaces the file's
        for k in BUDGETS:
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
    from .. import distributed

    try:
        summary = run_train(config_from_args(args))
    finally:
        distributed.shutdown()
    if int(os.environ.get("RANK", "0")):  # under torchrun: rank 0 reports
        return 0

    def f4(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    print(f"run {summary['run_dir']}: {summary['steps']} steps, {summary['tokens']:,} tokens, "
          f"{summary['flops']:.3g} FLOPs; train lm_loss {f4(summary['train_lm_loss'])}, "
          f"val_loss {f4(summary['val_loss'])}; checkpoint {summary['checkpoint']}")
    return 0
