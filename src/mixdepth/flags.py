"""Command-line flags generated from the config dataclasses, and the flags every command shares.

A leaf module (the standard library, `mixdepth.config` and `mixdepth.files` only), so the commands
and any other front end can build on it without loading the model. Flags for a dataclass are
generated from its fields (`--model.dim`, `--routing.capacity`, `--train.lr`), with help text from
the fields' attribute docstrings. Precedence of values: dataclass defaults < `--preset` <
`--config FILE.json` < flags. A config file holds the sections `model`, `routing` and `train` (any
other top-level key is refused), or is a training run's `run.json` (its top-level settings become
`train`). Every user error is one line on stderr and exit status 2 (argparse's convention).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from typing import Any

from .config import DTYPES, PRESETS, RUN_DERIVED, ModelConfig, MoEConfig, RoutingConfig, is_device_name
from .files import read_json_file

# top-level sections of a --config file; `train` is read by `mixdepth train` and ignored by the
# commands that take no training settings, so one file serves every command
CONFIG_SECTIONS = ("model", "routing", "moe", "train")


class CLIError(ValueError):
    """A user error, shown as one line with exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `mixdepth train: error: ...` and exit status 2, no usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


# ---- value types ----------------------------------------------------------------------------------
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


def positive_int(s: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def seed_list(s: str) -> list[int]:
    """An argparse type: `3` means seeds 0, 1, 2; `0,5,7` lists them."""
    try:
        if "," in s:
            return [int(v) for v in s.split(",") if v.strip()]
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or comma-separated seeds, got {s!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected at least one seed, got {s!r}")
    return list(range(n))


def number_list(text: str, kind: type, flag: str) -> list:
    """Positive numbers from a comma-separated flag value (`1,8,32`); a one-line error naming `flag`."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated {kind.__name__}s, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{flag} must list positive numbers, got {text!r}")
    return values


def _device_name(s: str) -> str:
    if not is_device_name(s):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {s!r}")
    return s


def add_device_args(parser: argparse.ArgumentParser, *, dtype: bool = True, prefix: str | None = None) -> None:
    """`--device auto|cpu|cuda|cuda:N` and (with `dtype`) `--dtype auto|fp32|bf16`, the same on every command.

    Both default to `auto`: the first CUDA device if there is one, and bf16 on CUDA, fp32 on CPU.
    With `prefix` (`train`), the flags also answer to `--train.device` / `--train.dtype`, store into
    those settings and default to unset, so a config file or a resumed run's values still apply.
    """

    def names(flag: str) -> list[str]:
        return [f"--{flag}"] + ([f"--{prefix}.{flag}"] if prefix else [])

    dest = f"{prefix}." if prefix else ""
    default = None if prefix else "auto"
    parser.add_argument(*names("device"), dest=f"{dest}device", type=_device_name, default=default,
                        metavar="DEVICE", help="auto, cpu, cuda or cuda:N (default: auto, cuda if available)")
    if dtype:
        parser.add_argument(*names("dtype"), dest=f"{dest}dtype", choices=DTYPES, default=default,
                            help="auto, fp32 or bf16 (default: auto, bf16 on CUDA and fp32 on CPU)")


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


def add_field_flags(parser: argparse.ArgumentParser, cls: type, flags: dict[str, tuple[str, type]]) -> None:
    """`--flag` for each `flag -> (field of cls, type)`, unset by default, with the field's docstring
    and default as its help (a workflow's settings dataclass: `SweepConfig`, `StudyConfig`)."""
    docs, defaults = field_docs(cls), {f.name: f.default for f in dataclasses.fields(cls)}
    for flag, (name, kind) in flags.items():
        parser.add_argument(flag, type=kind, default=None,
                            help=f"{docs.get(name, '')} (default: {defaults[name]})".replace("%", "%%"))


def field_flag_values(args: argparse.Namespace, flags: dict[str, tuple[str, type]]) -> dict[str, Any]:
    """The fields of the `add_field_flags` flags that were given."""
    values = {name: getattr(args, flag[2:].replace("-", "_")) for flag, (name, _) in flags.items()}
    return {name: v for name, v in values.items() if v is not None}


def overrides_from_args(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    """The `--{prefix}.*` flags that were given, by field name."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in vars(args).items() if k.startswith(p) and v is not None}


def add_model_args(parser: argparse.ArgumentParser, default_preset: str | None = "debug") -> None:
    """`--preset`, `--config FILE.json` and the generated `--model.*`, `--routing.*` and `--moe.*` flags."""
    parser.add_argument("--preset", default=default_preset, choices=sorted(PRESETS),
                        help=f"named model size (default: {default_preset})")
    parser.add_argument("--config", default=None, metavar="FILE.json",
                        help="JSON file of settings ({'model': {...}, 'routing': {...}, 'moe': {...}, "
                             "'train': {...}}), over the preset")
    add_dataclass_args(parser, ModelConfig, "model")
    add_dataclass_args(parser, RoutingConfig, "routing")
    add_dataclass_args(parser, MoEConfig, "moe")


def load_config_file(args: argparse.Namespace) -> dict[str, Any]:
    """The `--config` file's sections (empty without one); an unknown section is a one-line error.

    A training run's `run.json` is read too: its top-level settings become the `train` section.
    """
    if not getattr(args, "config", None):
        return {}
    data = read_json_file(args.config)
    if not isinstance(data, dict):
        raise CLIError(f"config file {args.config} must hold a JSON object")
    if isinstance(data.get("model"), dict) and "train" not in data and "routing" not in data \
            and set(data) - set(CONFIG_SECTIONS):
        # a run folder's run.json: training settings at the top level, the model nested
        data = {"model": data["model"], "train": {k: v for k, v in data.items() if k not in ("model", *RUN_DERIVED)}}
    unknown = sorted(set(data) - set(CONFIG_SECTIONS))
    if unknown:
        raise CLIError(f"config file {args.config}: unknown section {unknown[0]!r} (known: "
                       f"{', '.join(CONFIG_SECTIONS)}; only `mixdepth train` reads train)")
    return data


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    """defaults < --preset < --config file < --model.* / --routing.* flags."""
    base: dict[str, Any] = dict(PRESETS[args.preset]) if args.preset else {}
    routing: dict[str, Any] = dict(base.pop("routing", {}))
    moe: dict[str, Any] = dict(base.pop("moe", {}))
    file = load_config_file(args)
    fm = dict(file.get("model", {}))
    routing.update(fm.pop("routing", {}))
    routing.update(file.get("routing", {}))
    moe.update(fm.pop("moe", {}))
    moe.update(file.get("moe", {}))
    base.update(fm)
    base.update(overrides_from_args(args, "model"))
    routing.update(overrides_from_args(args, "routing"))
    moe.update(overrides_from_args(args, "moe"))
    unknown = set(base) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise CLIError(f"unknown model setting {sorted(unknown)[0]!r}")
    base["routing"] = RoutingConfig.from_dict({**RoutingConfig().to_dict(), **routing}, prefix="routing.")
    base["moe"] = MoEConfig.from_dict({**MoEConfig().to_dict(), **moe}, prefix="moe.")
    return ModelConfig(**base)
