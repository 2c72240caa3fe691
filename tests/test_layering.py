"""The import arrow points one way: the command layer imports the library, never the reverse.

Only `mixdepth/commands/`, `cli.py` and `__main__.py` may import `mixdepth.cli` or
`mixdepth.commands` (imports inside functions count too); `flags.py` is a leaf that imports the
standard library and `mixdepth.config` only.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import mixdepth
from mixdepth.cli import COMMANDS

SRC = Path(mixdepth.__file__).resolve().parent
CLI_LAYER = ("mixdepth.cli", "mixdepth.commands")


def _module_name(path: Path) -> str:
    parts = ["mixdepth", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file, relative imports made absolute.

    `from pkg import name` yields both `pkg` and `pkg.name` (the name may be a submodule).
    """
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (base, node.module) if p)
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(str(node.args[0].value))
    return found


def _is_cli_layer(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in CLI_LAYER)


def test_relative_imports_resolve():
    assert "mixdepth.config" in _imports(SRC / "model" / "layers.py")  # from ..config import
    assert "mixdepth.flags" in _imports(SRC / "commands" / "train.py")  # from ..flags import
    assert "mixdepth.model" in _imports(SRC / "__init__.py")  # from .model import
    assert "mixdepth.cli" in _imports(SRC / "__main__.py")  # from .cli import main


def test_the_library_never_imports_the_command_layer():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        module = _module_name(path)
        if _is_cli_layer(module) or module == "mixdepth.__main__":
            continue
        offenders += [f"{path.relative_to(SRC)} imports {name}" for name in sorted(_imports(path))
                      if _is_cli_layer(name)]
    assert not offenders, "library modules import the CLI layer:\n" + "\n".join(offenders)


@pytest.mark.parametrize("module, allowed_own", [("flags.py", ("mixdepth.config", "mixdepth.files")),
                                                  ("files.py", ())])
def test_leaf_modules_import_no_more_than_they_may(module, allowed_own):
    allowed = set(sys.stdlib_module_names) | {"__future__"}
    bad = sorted(name for name in _imports(SRC / module)
                 if name.split(".")[0] not in allowed and not name.startswith(allowed_own or ("-",)))
    assert not bad, f"{module} imports {bad}; it may import the standard library and {allowed_own} only"


def test_every_command_module_is_thin_and_listed():
    modules = {p.stem for p in (SRC / "commands").glob("*.py") if p.stem != "__init__"}
    assert {m.rsplit(".", 1)[1] for m, _ in COMMANDS.values()} == modules
    for name in sorted(modules):
        tree = ast.parse((SRC / "commands" / f"{name}.py").read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert {"add_arguments", "run"} <= defined, f"commands/{name}.py lacks {({'add_arguments', 'run'} - defined)}"
