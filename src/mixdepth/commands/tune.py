"""`mixdepth tune`: make a converted pretrained model Mixture-of-Depths (`mixdepth.tune.tune`):
sensitivity, router tuning with the trunk frozen, the calibrated dial, and the quality/speed curve
against layer dropping and random routing."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoint import resolve_checkpoint
from ..flags import number_list, positive_int
from ..tune import TuneConfig, tune

_D = TuneConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="a checkpoint made by `mixdepth convert`")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder (mod-<unit>/ checkpoints, sensitivity, curve); running again resumes")
    parser.add_argument("--units", default=",".join(_D.units),
                        help=f"routed units to tune and compare, the first is the main model (default: "
                             f"{','.join(_D.units)})")
    parser.add_argument("--routed", type=int, default=_D.routed,
                        help="layers to route, the least sensitive (default: two thirds of the layers)")
    parser.add_argument("--steps", type=int, default=_D.steps,
                        help=f"router training steps per unit (default: {_D.steps})")
    parser.add_argument("--batch-size", type=positive_int, default=_D.batch_size, help="windows per step (default: 4)")
    parser.add_argument("--seq-len", type=positive_int, default=_D.seq_len, help="tokens per window (default: 256)")
    parser.add_argument("--lr", type=float, default=_D.lr, help=f"router learning rate (default: {_D.lr})")
    parser.add_argument("--train-fractions", default=",".join(map(str, _D.train_fractions)),
                        help="routed fractions of the training steps, in turn (default: 0.25,0.5,0.75)")
    parser.add_argument("--objective", default=_D.objective, choices=("relaxed", "topk"),
                        help="router training: relaxed (every token's straight-through gradient, default) or topk")
    parser.add_argument("--causal-method", default=_D.causal_method, choices=("aux_loss", "predictor"),
                        help="the sampling-time decision (default: aux_loss, the router's own score)")
    parser.add_argument("--dial", default=",".join(map(str, _D.dial)),
                        help="routed fractions of the curve (default: 1.0,0.9,0.75,0.5,0.25)")
    parser.add_argument("--data", default=_D.data, help="training text: shakespeare (default), a file or a folder; "
                                                        "its validation split is the held-out text")
    parser.add_argument("--eval-windows", type=positive_int, default=_D.eval_windows,
                        help="held-out windows of the curve (default: 16)")
    parser.add_argument("--batch-sizes", default="1,8", help="decode batch sizes timed (default: 1,8)")
    parser.add_argument("--new-tokens", type=positive_int, default=_D.new_tokens, help="tokens per timed decode")
    parser.add_argument("--rounds", type=positive_int, default=_D.rounds, help="timing rounds (medians; default 3)")
    parser.add_argument("--no-curve", action="store_true", help="tune and save the checkpoints only")
    parser.add_argument("--seed", type=int, default=_D.seed)


def run(args: argparse.Namespace) -> int:
    resolve_checkpoint(args.checkpoint)  # a missing path fails here, before any work
    tc = TuneConfig(
        units=[u.strip() for u in args.units.split(",") if u.strip()], routed=args.routed, steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        train_fractions=number_list(args.train_fractions, float, "--train-fractions"),
        objective=args.objective, causal_method=args.causal_method, dial=number_list(args.dial, float, "--dial"),
        data=args.data,
        eval_windows=args.eval_windows, new_tokens=args.new_tokens, rounds=args.rounds, seed=args.seed)
    batch_sizes = tuple(number_list(args.batch_sizes, int, "--batch-sizes"))
    r = tune(args.checkpoint, args.out, tc, curve=not args.no_curve, batch_sizes=batch_sizes)
    out = Path(args.out)
    print(f"tuned checkpoints: {', '.join(r['checkpoints'])}")
    if "rows" in r:
        print((out / "curve.md").read_text().rstrip())
        print(f"wrote {out / 'curve.png'}, {out / 'curve.json'}, {out / 'answers.md'} ({r['seconds'] / 60:.1f} min)")
    return 0
