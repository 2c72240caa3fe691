"""The README's examples work as written (x-transformers' test_readme pattern)."""

import re
import shlex
from pathlib import Path

import pytest

from mixdepth.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_python_quick_start_runs():
    blocks = _blocks("python")
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def _cli_lines() -> list[list[str]]:
    lines = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():  # continuation lines joined
            line = line.split("#")[0].strip()
            if line.startswith("mixdepth "):
                lines.append(shlex.split(line)[1:])
            elif line.startswith("torchrun ") and " -m mixdepth " in line:  # the same command under torchrun
                lines.append(shlex.split(line.split(" -m mixdepth ", 1)[1]))
    return lines


@pytest.mark.parametrize("argv", _cli_lines(), ids=lambda a: " ".join(a[:2]))
def test_cli_examples_parse(argv):
    """Every `mixdepth ...` line of the README names a real subcommand and only real flags."""
    from mixdepth.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(argv)  # SystemExit(2) on an unknown flag or subcommand
    assert args.command == argv[0]


def test_help_of_every_subcommand_in_readme():
    for argv in _cli_lines():
        with pytest.raises(SystemExit) as e:
            main([argv[0], "-h"])
        assert e.value.code == 0
