"""`mixdepth flops`: FLOPs, parameters and KV bytes of a config against its dense twin (`mixdepth.flops`)."""

from __future__ import annotations

import argparse
import json

from .. import flops
from ..flags import CLIError, add_model_args, model_config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, default_preset="bench")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: max_seq_len)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per training step")
    parser.add_argument("--context", type=int, default=None, help="cached tokens for the decode column")
    parser.add_argument("--budget", type=float, default=None, help="FLOP budget: print steps that fit")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")


def run(args: argparse.Namespace) -> int:
    cfg = model_config_from_args(args)
    T = cfg.max_seq_len if args.seq_len is None else args.seq_len
    if T < 1 or args.batch_size < 1:
        raise CLIError("--seq-len and --batch-size must be >= 1")
    for flag, n in (("--seq-len", T), ("--context", args.context)):
        if n is not None and n > cfg.max_seq_len:
            raise CLIError(f"{flag} {n} exceeds the model's max_seq_len {cfg.max_seq_len}: it cannot run that length "
                           "(raise --model.max_seq_len)")
    rows = flops.flops_table(cfg, T, args.batch_size, args.context)
    r = cfg.routing
    print(f"config: dim={cfg.dim} layers={cfg.n_layers} heads={cfg.n_heads}/{cfg.n_kv_heads} ffn={cfg.ffn_dim} "
          f"vocab={cfg.vocab_size} | router={r.router} capacity={r.capacity} routed layers={cfg.routed_layer_ids}")
    print(f"seq_len={T} batch={args.batch_size} (k={r.k(T)} tokens per routed block); attention counted as "
          f"the full T x T matrix; train step = 3 x forward")
    print(flops.format_table(rows))
    print(f"ideal speed-up vs dense: train {flops.ideal_speedup(cfg, T):.3f}x, "
          f"decode {flops.ideal_speedup(cfg, T, 'decode', args.context or T):.3f}x")
    if args.budget is not None:
        for row, c in zip(rows, (flops.dense_twin(cfg), cfg)):
            steps = flops.steps_for_budget(c, args.budget, T, args.batch_size)
            print(f"budget {args.budget:.3g} FLOPs: {row['model']} trains {steps} steps "
                  f"({steps * args.batch_size * T:,} tokens)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
