"""`mixdepth export CKPT --out DIR`: a checkpoint -> a Hugging Face folder (`mixdepth.hf.export`)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder or run folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write (new or empty)")


def run(args: argparse.Namespace) -> int:
    from .. import hf

    out = hf.export(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {out} (AutoModelForCausalLM.from_pretrained loads its dense function; "
          f"routing in {hf.ROUTING_FILE} and {hf.ROUTING_CONFIG})")
    return 0
