"""Reading and writing small files, one way everywhere: JSON and text readers whose errors are one
line naming the file, and an atomic writer (temporary file, fsync, `os.replace`) so a crash never
leaves a half-written file behind. A leaf module: it imports nothing of the package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json_file(path: str | Path, what: str = "file") -> Any:
    """Parse a JSON file (settings, run, checkpoint or trainer state); a missing or malformed file is
    a one-line `ValueError` naming it (`what` says what kind of file it is)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        detail = f"{e.msg}, line {e.lineno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
        raise ValueError(f"{what} {path} is not valid JSON ({detail}): truncated or corrupt?") from None


def read_text_file(path: str | Path, what: str = "corpus file") -> str:
    """Read one UTF-8 text file (BOM stripped, CRLF -> LF); binary files give a one-line error.

    `what` names the file in the errors ("corpus file", "prompts file", ...).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a directory") from None
    if b"\x00" in raw:
        raise ValueError(f"{what} {path} looks binary (it contains NUL bytes); pass a UTF-8 text file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{what} {path} is not UTF-8 text (invalid byte at offset {e.start}); pass a UTF-8 text file"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a fsynced temporary file and `os.replace` (never a half-written file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to `path` atomically (`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")
