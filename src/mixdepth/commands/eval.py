"""`mixdepth eval`: `mixdepth.evaluate.run_eval` on a checkpoint, printed as a table (and JSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..checkpoint import resolve_checkpoint
from ..evaluate import compare_fraction_rules, format_report, format_rule_comparison, run_eval
from ..flags import add_device_args, positive_int
from ..model.dial import DEFAULT_RULE, RULES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint folder or run folder")
    parser.add_argument("--data", default=None, help="corpus (default: the one the run trained on)")
    parser.add_argument("--batches", type=int, default=20, help="validation batches (default: 20)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per batch (default: 8)")
    parser.add_argument("--seq-len", type=positive_int, default=None, help="tokens per window (default: training's)")
    parser.add_argument("--fraction", type=float, default=None,
                        help="routed fraction of the causal mode (default: the calibrated threshold's)")
    parser.add_argument("--fraction-rule", choices=RULES, default=None,
                        help=f"how --fraction is reached: hold (each window held at it, on any text) or threshold "
                             f"(the calibration table's threshold for it); default {DEFAULT_RULE}")
    parser.add_argument("--compare-rules", default=None, metavar="F1,F2,...",
                        help="instead: causal loss and routed fractions at these asked fractions under both rules "
                             "(hold, threshold), paired by window, as a markdown table")
    add_device_args(parser, dtype=False)
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")


def run(args: argparse.Namespace) -> int:
    resolve_checkpoint(args.checkpoint)  # a missing path fails here, before any data work
    if args.compare_rules:
        fractions = [float(v) for v in args.compare_rules.split(",") if v.strip()]
        r = compare_fraction_rules(args.checkpoint, fractions, data=args.data, batches=args.batches,
                                   seq_len=args.seq_len, batch_size=args.batch_size, device=args.device)
        print(format_rule_comparison(r))
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
        return 0
    r = run_eval(args.checkpoint, data=args.data, batches=args.batches, seq_len=args.seq_len,
                 batch_size=args.batch_size, device=args.device, fraction=args.fraction,
                 fraction_rule=args.fraction_rule)
    print(format_report(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
    return 0
