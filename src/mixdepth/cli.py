"""The `mixdepth` command: one argparse parser with a subcommand per entry of `COMMANDS`.

Each subcommand is a module of `mixdepth.commands` with `add_arguments(parser)` and
`run(args) -> int`; it is imported only when its subcommand is parsed, so `mixdepth -h` imports
none of them. Every user error (argparse's own, or a `ValueError` / `OSError` from the library) is
one line on stderr and exit status 2; no traceback. The flags themselves are `mixdepth.flags`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .flags import Parser

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("mixdepth.commands.train", "train a model (MoD or a baseline) on a corpus"),
    "eval": ("mixdepth.commands.eval", "validation loss in topk and causal modes, routing statistics"),
    "generate": ("mixdepth.commands.generate", "sample text from a checkpoint with the KV cache"),
    "bench": ("mixdepth.commands.bench", "speed and memory of MoD vs dense in one process"),
    "flops": ("mixdepth.commands.flops",
              "print FLOPs, parameters and KV bytes of a config against its dense twin"),
    "convert": ("mixdepth.commands.convert", "convert a Hugging Face folder or GGUF file to a MoD checkpoint"),
    "tune": ("mixdepth.commands.tune",
             "make a converted model MoD: sensitivity, routers tuned on a frozen trunk, quality/speed curve"),
    "export": ("mixdepth.commands.export", "write a checkpoint as a Hugging Face folder (routing beside it)"),
    "plot": ("mixdepth.commands.plot", "loss curves and routing maps as PNG files"),
    "demo": ("mixdepth.commands.demo", "train dense and MoD at equal FLOPs, evaluate, report"),
    "sweep": ("mixdepth.commands.sweep",
              "isoFLOP sweep: variants x sizes x budgets x seeds, resumable, -j N; table and the paper's plots"),
    "study": ("mixdepth.commands.study",
              "routing study: learned vs random, frozen and rule routing at equal FLOPs, paired seeds"),
    "serve": ("mixdepth.commands.serve",
              "serve a checkpoint behind the OpenAI API: continuous batching, streaming, metrics, a page"),
}


class _CommandParser(Parser):
    """A subcommand's parser: its module adds the flags the first time it parses or prints help."""

    module: str | None = None

    def _load(self) -> None:
        if self.module is not None:
            module, self.module = self.module, None
            importlib.import_module(module).add_arguments(self)

    def parse_known_args(self, args=None, namespace=None):
        self._load()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._load()
        return super().format_help()


def _build() -> tuple[Parser, dict[str, _CommandParser]]:
    parser = Parser(
        prog="mixdepth", description="Mixture-of-Depths transformer language models (arXiv 2404.02258).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)
    commands = {}
    for name, (module, help) in COMMANDS.items():
        commands[name] = p = sub.add_parser(name, help=help, description=help)
        p.module = module
    return parser, commands


def build_parser() -> argparse.ArgumentParser:
    """The `mixdepth` parser (each subcommand's flags are added when that subcommand is parsed)."""
    return _build()[0]


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser, commands = _build()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    setup_logging(args.verbose)
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except (ValueError, OSError) as e:  # OSError: an unwritable output path, a full disk, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):  # under torchrun: which rank failed
            msg = f"rank {os.environ.get('RANK', '?')}: {msg}"
        commands[args.command].error(msg)  # one line, exit status 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
