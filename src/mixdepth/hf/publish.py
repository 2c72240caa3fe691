"""Writing a folder atomically: checked to be new, written beside it, renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..files import fsync_dir, fsync_file


def _fresh_out(out: str | Path) -> tuple[Path, list[Path]]:
    """`out` checked to be new or empty, and the parent folders created for it (nearest first),
    which `_remove_new_parents` takes away again if the command fails."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not empty; choose a new folder")
    created = []
    for parent in out.parents:
        if parent.exists():
            break
        created.append(parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out, created


def _remove_new_parents(created: list[Path]) -> None:
    for parent in created:  # nearest first; a folder something else was written to stays
        try:
            parent.rmdir()
        except OSError:
            break


def _publish(tmp: Path, out: Path, *, synced: bool = False) -> None:
    """Rename a finished temporary folder into place (fsyncing its files first unless `synced`)."""
    if not synced:
        for p in tmp.rglob("*"):
            if p.is_file():
                fsync_file(p)
        fsync_dir(tmp)
    if out.exists():
        out.rmdir()  # empty (checked first)
    os.replace(tmp, out)
    fsync_dir(out.parent)


def write_folder(folder: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` into a temporary folder beside `folder` (new or empty), then rename it into
    place; on failure nothing is left (the temporary folder and the parents made for it go)."""
    out, created = _fresh_out(folder)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        write(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_new_parents(created)
        raise
    return out
