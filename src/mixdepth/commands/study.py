"""`mixdepth study`: `mixdepth.study.run_study` from flags (the routing study: arms at equal FLOPs, paired seeds)."""

from __future__ import annotations

import argparse

from ..flags import add_device_args, add_field_flags, field_flag_values, seed_list
from ..study import ARMS, StudyConfig, run_study

SCALARS = {
    "--reference": ("reference", str), "--depth": ("depth", int), "--aspect": ("aspect", int),
    "--head-dim": ("head_dim", int), "--budget": ("budget", float), "--seq-len": ("seq_len", int),
    "--batch-size": ("batch_size", int), "--lr": ("lr", float), "--warmup": ("warmup", float),
    "--eval-batches": ("eval_batches", int), "--eval-windows": ("eval_windows", int), "--window": ("window", int),
    "--data": ("data", str), "--cache-dir": ("cache_dir", str),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="study folder (default: runs/study-routing)")
    arms = "; ".join(f"{name}: {about}" for name, (_, about) in ARMS.items())
    parser.add_argument("--arms", default=None,
                        help=f"comma-separated arms (default: {','.join(StudyConfig().arms)}); named arms: {arms}; "
                             "any sweep variant name is an arm too".replace("%", "%%"))
    parser.add_argument("--seeds", type=seed_list, default=None, help="number of seeds (3 = 0,1,2) or a list")
    add_field_flags(parser, StudyConfig, SCALARS)
    parser.add_argument("-j", "--jobs", type=int, default=None, help="runs trained side by side (default: 2)")
    add_device_args(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace run folders that hold other settings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (a line per finished run)")


def study_config(args: argparse.Namespace) -> StudyConfig:
    fields: dict = {"out_dir": args.out or "runs/study-routing"}
    if args.arms is not None:
        fields["arms"] = [a.strip() for a in args.arms.split(",") if a.strip()]
    if args.seeds is not None:
        fields["seeds"] = args.seeds
    fields.update(field_flag_values(args, SCALARS))
    if args.jobs is not None:
        fields["jobs"] = args.jobs
    fields["device"] = "cpu" if args.device == "auto" else args.device
    fields.update(overwrite=args.overwrite, progress=not args.no_progress)
    return StudyConfig(**fields)


def run(args: argparse.Namespace) -> int:
    run_study(study_config(args), echo=print)
    return 0
