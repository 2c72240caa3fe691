"""`mixdepth sweep`: `mixdepth.sweep.run_sweep` from a preset and flags (isoFLOP curves over sizes and seeds)."""

from __future__ import annotations

import argparse

from ..flags import add_device_args, add_field_flags, field_flag_values, number_list, seed_list
from ..sweep import PRESETS, VARIANT_HELP, SweepConfig, run_sweep


def _names(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


# flag -> (SweepConfig field, parser of the value, help)
LISTS = {
    "--variants": ("variants", _names, f"variants at every size, budget and seed: {VARIANT_HELP}"),
    "--ablations": ("ablations", _names, "variants at one size only (--ablation-depth); 'none' for none"),
    "--depths": ("depths", lambda s: number_list(s, int, "--depths"), "the size family: depths (layers; width = "
                 "depth x --aspect)"),
    "--budgets": ("budgets", lambda s: number_list(s, float, "--budgets"), "training FLOPs per run"),
    "--ablation-budgets": ("ablation_budgets", lambda s: number_list(s, float, "--ablation-budgets"),
                           "budgets of the ablation runs (default: all)"),
}
SCALARS = {
    "--aspect": ("aspect", int), "--head-dim": ("head_dim", int), "--ablation-depth": ("ablation_depth", int),
    "--seq-len": ("seq_len", int), "--max-seq-len": ("max_seq_len", int), "--batch-size": ("batch_size", int),
    "--lr": ("lr", float), "--warmup": ("warmup", float), "--n-experts": ("n_experts", int), "--data": ("data", str),
    "--evals": ("evals", int), "--eval-batches": ("eval_batches", int), "--decode-tokens": ("decode_tokens", int),
    "--decode-context": ("decode_context", int), "--decode-rounds": ("decode_rounds", int),
    "--threads": ("threads", int), "--cache-dir": ("cache_dir", str),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                        help="the sweep to start from (default: cpu, under 90 minutes on 2 CPU cores); flags override "
                             "its fields")
    parser.add_argument("--out", default=None, help="sweep folder (default: runs/sweep-<preset>)")
    parser.add_argument("--seeds", type=seed_list, default=None, help="number of seeds (3 = 0,1,2) or a list")
    for flag, (_, _, help_) in LISTS.items():
        parser.add_argument(flag, default=None, help=help_.replace("%", "%%"))  # argparse formats help with %
    add_field_flags(parser, SweepConfig, SCALARS)
    parser.add_argument("-j", "--jobs", type=int, default=None, help="runs trained side by side (worker processes)")
    add_device_args(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace run folders that hold other settings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (a line per finished run)")


def sweep_config(args: argparse.Namespace) -> SweepConfig:
    fields = dict(PRESETS[args.preset])
    fields["out_dir"] = args.out or f"runs/sweep-{args.preset}"
    if args.seeds is not None:
        fields["seeds"] = args.seeds
    for flag, (name, parse, _) in LISTS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            fields[name] = [] if name == "ablations" and value.strip() == "none" else parse(value)
    fields.update(field_flag_values(args, SCALARS))
    if args.jobs is not None:
        fields["jobs"] = args.jobs
    if args.device != "auto" or "device" not in fields:  # the preset's device unless one is named
        fields["device"] = args.device
    fields["dtype"] = args.dtype
    fields["overwrite"] = args.overwrite
    fields["progress"] = not args.no_progress
    if "ablation_budgets" in fields and "budgets" in fields:  # a preset's ablation budgets outside new --budgets
        fields["ablation_budgets"] = [b for b in fields["ablation_budgets"] if b in fields["budgets"]]
    return SweepConfig(**fields)


def run(args: argparse.Namespace) -> int:
    run_sweep(sweep_config(args), echo=print)
    return 0
