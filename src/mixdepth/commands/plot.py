"""`mixdepth plot loss|routing|stats`: the figures of `mixdepth.plots` from saved artefacts."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..files import read_text_file
from ..flags import Parser
from ..plots import (
    LOSS_KEYS,
    X_AXES,
    load_decisions,
    plot_loss_curves,
    plot_router_stats,
    plot_routing_map,
    routing_map_from_model,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="plot_kind", metavar="KIND", parser_class=Parser)
    sub.required = True
    p = sub.add_parser("loss", help="loss curves of runs against training FLOPs (or step, tokens)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training run folders (with metrics.jsonl)")
    p.add_argument("--out", default="loss_curves.png", help="output PNG (default: loss_curves.png)")
    p.add_argument("--x", default="flops", choices=sorted(X_AXES), help="x axis (default: flops)")
    p.add_argument("--key", default="lm_loss,val_loss",
                   help=f"comma-separated losses: {', '.join(LOSS_KEYS)} or any logged by name, e.g. "
                        "predictor_loss (default: lm_loss,val_loss)")
    p.add_argument("--labels", default=None, help="comma-separated legend labels, one per run")
    p.add_argument("--title", default=None)

    p = sub.add_parser("routing", help="routing map of a text: tokens x routed layers, chosen vs skipped")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint or run folder to route the text through")
    src.add_argument("--decisions", metavar="FILE.npz", help="saved decisions (from generate/eval) instead")
    p.add_argument("--text", default=None, help="text to route (with --checkpoint)")
    p.add_argument("--text-file", default=None, help="read the text from this file instead")
    p.add_argument("--mode", default="causal", choices=("causal", "topk"),
                   help="causal: per-token sampling decision; topk: training-time top-k (default: causal)")
    p.add_argument("--out", default="routing_map.png", help="output PNG (default: routing_map.png)")
    p.add_argument("--title", default=None)

    p = sub.add_parser("stats", help="fraction routed and causal accuracy per routed layer over a run")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", default="router_stats.png", help="output PNG (default: router_stats.png)")
    p.add_argument("--x", default="step", choices=sorted(X_AXES), help="x axis (default: step)")


def run(args: argparse.Namespace) -> int:
    if args.plot_kind == "loss":
        labels = args.labels.split(",") if args.labels else None
        keys = [k.strip() for k in args.key.split(",") if k.strip()]
        out = plot_loss_curves(args.run_dirs, args.out, x=args.x, key=keys, labels=labels, title=args.title)
    elif args.plot_kind == "stats":
        out = plot_router_stats(args.run_dir, args.out, x=args.x)
    else:
        out = _routing(args)
    print(f"wrote {out}")
    return 0


def _routing(args: argparse.Namespace) -> Path:
    if args.decisions:
        decisions, tokens, layer_ids = load_decisions(args.decisions)
        return plot_routing_map(decisions, tokens, args.out, layer_ids=layer_ids, title=args.title)
    if args.text_file:
        text = read_text_file(args.text_file, "text file")
    elif args.text is not None:
        text = args.text
    else:
        raise ValueError("give the text to route with --text or --text-file")
    from ..checkpoint import load_checkpoint_tokenizer, load_model

    model = load_model(args.checkpoint)
    tokenizer = load_checkpoint_tokenizer(args.checkpoint)
    decisions, tokens, layer_ids = routing_map_from_model(model, tokenizer, text, mode=args.mode)
    title = args.title or (f"{args.mode} routing of {len(tokens)} tokens: "
                           f"{100 * decisions.mean():.1f}% of token-layer slots chosen")
    return plot_routing_map(decisions, tokens, args.out, layer_ids=layer_ids, title=title)
