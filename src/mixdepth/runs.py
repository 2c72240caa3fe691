"""Run folders: where a training run lives, its record, and when a run may be reused or resumed.

A run folder holds:
- `run.json`: every setting of the run (a `TrainConfig`), plus what the trainer derived from them
  (`DERIVED`: total steps, tokens and FLOPs per step);
- `metrics.jsonl`: one JSON object per log step, the record of the run; reports and plots read
  only this (`read_metrics`);
- `checkpoints/step-NNNNNN/` and the `latest` pointer (`mixdepth.checkpoint`).

Two runs with the same settings, but for the `INCIDENTAL` ones that do not change what is computed
(where the folder is, whether a bar is shown, ...), are the same run: the trainer resumes it, and
the demo and the sweep reuse it when finished (`inspect_run`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import resolve_checkpoint
from .config import RUN_DERIVED
from .files import read_json_file, write_json_atomic, write_text_atomic

log = logging.getLogger("mixdepth")

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
DERIVED = RUN_DERIVED
"""Keys of run.json that the trainer derives from the settings (not settings themselves)."""
INCIDENTAL = ("resume", "progress", "cache_dir", "out_dir", "log_to", "dist", "activation_checkpointing", "compile")
"""Settings that do not change what a run computes (how it is spread over ranks included: a run
saved at one world size resumes at any other)."""


# ---- metrics.jsonl --------------------------------------------------------------------------------
def metrics_path(run_dir: str | Path) -> Path:
    """The metrics file of a run folder (a path to the file itself is returned as is)."""
    p = Path(run_dir)
    return p / METRICS_FILE if p.is_dir() or not p.suffix else p


def read_metrics(run_dir: str | Path, *, up_to_step: int | None = None, required: bool = True) -> list[dict[str, Any]]:
    """The records of a run's `metrics.jsonl` (one JSON object per log step), in file order.

    A half-written last line (a run killed mid-write) is skipped with a warning; any other bad
    line is an error naming the file and line.

    Args:
        run_dir: a run folder or its metrics file.
        up_to_step: keep the records of steps <= this only.
        required: a missing or empty file is an error (else: no records).
    """
    path = metrics_path(run_dir)
    if not path.is_file():
        if not required:
            return []
        raise ValueError(f"no metrics file: {path} (is {run_dir} a training run folder?)")
    lines = path.read_text().splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                log.warning("%s: skipping the incomplete last line %d", path, n)
                continue
            raise ValueError(f"{path} line {n} is not valid JSON") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path} line {n} is not a JSON object")
        if up_to_step is None or rec.get("step", 0) <= up_to_step:
            records.append(rec)
    if required and not records:
        raise ValueError(f"metrics file {path} is empty: the run logged no steps")
    return records


def rewrite_metrics(run_dir: str | Path, records: list[dict[str, Any]]) -> None:
    """Replace a run's metrics file atomically (a resume drops the steps logged after its checkpoint)."""
    write_text_atomic(metrics_path(run_dir), "".join(json.dumps(r) + "\n" for r in records))


def last_value(records: list[dict[str, Any]], key: str) -> Any:
    """The last logged value of `key`, or None."""
    return next((r[key] for r in reversed(records) if r.get(key) is not None), None)


def final_train_loss(run_dir: str | Path, last: int = 5) -> float | None:
    """Mean training LM loss of the last `last` logged steps (one step's batch alone is noisy)."""
    xs = [r["lm_loss"] for r in read_metrics(run_dir) if r.get("lm_loss") is not None][-last:]
    return sum(xs) / len(xs) if xs else None


# ---- run.json -------------------------------------------------------------------------------------
def read_settings(run_dir: str | Path) -> dict[str, Any] | None:
    """The settings of a run (run.json without the derived keys), or None if it has none."""
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        return None
    data = read_json_file(path, "run file")
    if not isinstance(data, dict):
        raise ValueError(f"run file {path} does not hold a JSON object")
    return {k: v for k, v in data.items() if k not in DERIVED}


def write_settings(run_dir: str | Path, settings: dict[str, Any], **derived: Any) -> None:
    """Write run.json atomically: the settings and the derived figures."""
    write_json_atomic(Path(run_dir) / RUN_FILE, {**settings, **derived})


def essential(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide what a run computes (`INCIDENTAL` and `DERIVED` dropped)."""
    return {k: v for k, v in settings.items() if k not in INCIDENTAL and k not in DERIVED}


def changed_settings(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`name old -> new` for each essential setting that differs (nested dicts compared whole)."""
    a, b = essential(before), essential(now)
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's latest finished checkpoint folder, or None."""
    try:
        return resolve_checkpoint(run_dir)
    except ValueError:
        return None


# ---- reuse and resume -----------------------------------------------------------------------------
@dataclass
class RunState:
    """What a run folder holds with respect to the settings of a run about to start there."""

    kind: str
    """`empty` (nothing to keep), `finished` (same settings, every step done), `resumable` (same
    settings, a checkpoint short of the end), `stale` (same settings, no checkpoint: start over) or
    `different` (other settings)."""
    checkpoint: Path | None = None
    step: int = 0


def inspect_run(run_dir: str | Path, settings: dict[str, Any], total_steps: int, normalise=None) -> RunState:
    """Compare a run folder with the settings of a run of `total_steps` steps about to use it.

    `normalise` maps the saved settings to what this version would write for them (e.g. settings
    added since take their defaults), so a run saved before a new setting existed still matches."""
    out = Path(run_dir)
    if not out.exists() or not any(out.iterdir()):
        return RunState("empty")
    try:
        saved = read_settings(out)
    except ValueError:
        saved = None
    if saved is not None and normalise is not None:
        saved = normalise(saved)
    if saved is None or changed_settings(saved, settings):
        return RunState("different")
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return RunState("stale")
    try:
        step = int(read_json_file(ckpt / "trainer.json", "checkpoint file")["step"])
    except (ValueError, KeyError, TypeError):
        return RunState("stale")
    return RunState("finished" if step >= total_steps else "resumable", ckpt, step)
