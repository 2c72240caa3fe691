"""`mixdepth export CKPT --out DIR [--format transformers|llama]`: a checkpoint -> a Hugging Face folder
(`mixdepth.hf.export`)."""

from __future__ import annotations

import argparse

from ..hf import FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder or run folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write (new or empty)")
    parser.add_argument("--format", choices=FORMATS, default=FORMATS[0],
                        help="transformers (default): MixdepthForCausalLM, which routes and skips inside transformers "
                             "(AutoModelForCausalLM with trust_remote_code=True, or after `import mixdepth`); llama: "
                             "the dense function as the family's own class, the routing in files beside it")


def run(args: argparse.Namespace) -> int:
    from .. import hf

    out = hf.export(args.checkpoint, args.out, format=args.format)
    if args.format == "transformers":
        print(f"exported {args.checkpoint} -> {out} (MixdepthForCausalLM: AutoModelForCausalLM.from_pretrained(DIR, "
              "trust_remote_code=True) routes and skips as mixdepth does)")
    else:
        print(f"exported {args.checkpoint} -> {out} (AutoModelForCausalLM.from_pretrained loads its dense function; "
              f"routing in {hf.ROUTING_FILE} and {hf.ROUTING_CONFIG})")
    return 0
