"""The `mixdepth` command: one argparse parser with subcommands.

Flags for config dataclasses are generated from their fields (`--model.dim`, `--routing.capacity`,
`--train.lr`), with help text from the fields' attribute docstrings. Precedence of values:
dataclass defaults < `--preset` < `--config FILE.json` < flags. Every user error is one line
on stderr and exit status 2 (argparse's convention); no traceback.

Each subcommand lives in a module that exposes `add_arguments(parser)` and `run(args) -> int`;
modules are imported only when their subcommand runs, so `mixdepth -h` stays fast.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import json
import logging
import sys
import textwrap
import types
import typing
from typing import Any

from .config import PRESETS, ModelConfig, RoutingConfig, read_json_file

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "flops": ("mixdepth.cli", "print FLOPs, parameters and KV bytes of a config against its dense twin"),
}


def register(name: str, module: str, help: str) -> None:
    COMMANDS[name] = (module, help)


class CLIError(ValueError):
    """A user error, shown as one line with exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `mixdepth train: error: ...` and exit status 2, no usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


# ---- dataclass -> flags ---------------------------------------------------------------------------
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _parse_bool(s: str) -> bool:
    v = s.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _parse_int_list(s: str) -> list[int] | None:
    if s.lower() in ("", "none"):
        return None
    try:
        return [int(v) for v in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _flag_type(tp: Any):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp, origin = args[0], typing.get_origin(args[0])
    if origin is list:
        return _parse_int_list
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    return None


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str, skip=()) -> None:
    """Add `--{prefix}.{field}` for each scalar field of `cls` (defaults are left unset: None)."""
    group = parser.add_argument_group(f"{prefix} settings ({cls.__name__})")
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        ftype = _flag_type(hints[f.name])
        if ftype is None or f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        group.add_argument(
            f"--{prefix}.{f.name}", dest=f"{prefix}.{f.name}", type=ftype, default=None,
            metavar=f.name.upper(), help=f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%"),
        )


def overrides_from_args(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in vars(args).items() if k.startswith(p) and v is not None}


def add_model_args(parser: argparse.ArgumentParser, default_preset: str | None = "debug") -> None:
    parser.add_argument("--preset", default=default_preset, choices=sorted(PRESETS),
                        help=f"named model size (default: {default_preset})")
    parser.add_argument("--config", default=None, metavar="FILE.json",
                        help="JSON file of settings ({'model': {...}, 'routing': {...}, ...}), over the preset")
    add_dataclass_args(parser, ModelConfig, "model")
    add_dataclass_args(parser, RoutingConfig, "routing")


def load_config_file(args: argparse.Namespace) -> dict[str, Any]:
    if not getattr(args, "config", None):
        return {}
    data = read_json_file(args.config)
    if not isinstance(data, dict):
        raise CLIError(f"config file {args.config} must hold a JSON object")
    return data


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    """defaults < --preset < --config file < --model.* / --routing.* flags."""
    base: dict[str, Any] = dict(PRESETS[args.preset]) if args.preset else {}
    routing: dict[str, Any] = dict(base.pop("routing", {}))
    file = load_config_file(args)
    fm = dict(file.get("model", {}))
    routing.update(fm.pop("routing", {}))
    routing.update(file.get("routing", {}))
    base.update(fm)
    base.update(overrides_from_args(args, "model"))
    routing.update(overrides_from_args(args, "routing"))
    unknown = set(base) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise CLIError(f"unknown model setting {sorted(unknown)[0]!r}")
    base["routing"] = RoutingConfig.from_dict({**RoutingConfig().to_dict(), **routing}, prefix="routing.")
    return ModelConfig(**base)


# ---- flops subcommand -----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, default_preset="bench")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: max_seq_len)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per training step")
    parser.add_argument("--context", type=int, default=None, help="cached tokens for the decode column")
    parser.add_argument("--budget", type=float, default=None, help="FLOP budget: print steps that fit")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")


def run(args: argparse.Namespace) -> int:
    from . import flops

    cfg = model_config_from_args(args)
    T = cfg.max_seq_len if args.seq_len is None else args.seq_len
    if T < 1 or args.batch_size < 1:
        raise CLIError("--seq-len and --batch-size must be >= 1")
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


# ---- entry point ----------------------------------------------------------------------------------
def _discover() -> None:
    """Register the subcommands of the modules that exist (the rest of the CLI stays usable)."""
    for name, module, help in (
        ("train", "mixdepth.train", "train a model (MoD or a baseline) on a corpus"),
        ("eval", "mixdepth.evaluate", "validation loss in topk and causal modes, routing statistics"),
        ("generate", "mixdepth.generate_cli", "sample text from a checkpoint with the KV cache"),
        ("bench", "mixdepth.bench", "speed and memory of MoD vs dense in one process"),
        ("plot", "mixdepth.plots", "loss curves and routing maps as PNG files"),
        ("demo", "mixdepth.demo", "train dense and MoD at equal FLOPs, evaluate, report"),
    ):
        if importlib.util.find_spec(module) is not None:
            register(name, module, help)


def build_parser() -> argparse.ArgumentParser:
    _discover()
    parser = Parser(
        prog="mixdepth", description="Mixture-of-Depths transformer language models (arXiv 2404.02258).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (module, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    setup_logging(args.verbose)
    sp = next(a for a in parser._subparsers._group_actions[0].choices.values()  # type: ignore[union-attr]
              if a.get_default("_module") == args._module and a.prog.endswith(args.command))
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, OSError) as e:  # OSError: an unwritable output path, a full disk, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        sp.error(msg)  # one line, exit status 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
