"""Checkpoints: a folder of safetensors + JSON, written atomically; loading never unpickles.

A checkpoint folder (`<run>/checkpoints/step-000123/`) holds:
- `config.json`: the `ModelConfig` as a dict;
- `model.safetensors`: the state dict (the tied `lm_head.weight` is dropped and re-tied on load,
  since safetensors refuses tensors that share memory);
- `optimizer.safetensors` + `optimizer.json`: AdamW's per-parameter tensors, flattened to
  `state.<param index>.<name>`, and its param groups and parameter names;
- `trainer.json`: step, tokens, FLOPs, data cursor and RNG states (as lists);
- the tokenizer files (`tokenizer.json` for BPE, `tokenizer_config.json` for bytes);
- `manifest.json`, written last: every file's size, so a truncated file is named on load.

Everything is written to `step-000123.tmp/`, fsynced, and renamed into place with `os.replace`;
then `<run>/latest` (a one-line pointer file) is replaced the same way and old checkpoints beyond
`keep_last` are removed. A crash at any moment leaves the previous checkpoint and pointer intact.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .files import fsync_dir, fsync_file, read_json_file, write_text_atomic

log = logging.getLogger("mixdepth")

FORMAT = "mixdepth-checkpoint/1"
_STEP_RE = re.compile(r"^step-(\d+)$")


# ---- small file helpers ---------------------------------------------------------------------------
def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.exists():
        raise ValueError(f"checkpoint file missing: {path}")
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"checkpoint file {path} is truncated or corrupt ({msg})") from None
    return tensors, meta


# ---- paths ----------------------------------------------------------------------------------------
def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Finished checkpoint folders of a run, oldest first (temporary `.tmp` folders excluded)."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder or a run folder (its `latest` pointer).

    If the run's `latest` names a folder that no longer exists (deleted by hand), the newest
    finished checkpoint is used.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"checkpoint not found: {p}")
    if (p / "config.json").exists() or (p / "model.safetensors").exists():
        return p
    latest = p / "latest"
    if latest.is_file():
        target = p / latest.read_text().strip()
        if (target / "config.json").exists() or (target / "model.safetensors").exists():
            return target
    found = list_checkpoints(p)
    if found:
        return found[-1]
    raise ValueError(f"no checkpoint in {p} (expected a checkpoint folder with config.json, "
                     "or a run folder with a `latest` pointer)")


# ---- save -----------------------------------------------------------------------------------------
def _model_tensors(model: torch.nn.Module, sd: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    sd = dict(model.state_dict() if sd is None else sd)
    cfg = getattr(model, "cfg", None)
    if cfg is not None and cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # shares memory with embed_tokens.weight; re-tied on load
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def _optimizer_payload(model: torch.nn.Module, optimizer: torch.optim.Optimizer, by_name: dict[str, Any] | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer state flattened: tensors `state.<index>.<key>` (index: the parameter's position over
    the groups) and JSON (groups with their parameter names, scalar state). `by_name`: a full state dict
    keyed by parameter name instead (what FSDP gathers), written in the same form."""
    if by_name is None:
        sd = optimizer.state_dict()
        names = {id(p): n for n, p in model.named_parameters()}
        group_names = [[names.get(id(p), "?") for p in g["params"]] for g in optimizer.param_groups]
        state = sd["state"]
    else:
        sd = by_name
        group_names = [list(g["params"]) for g in sd["param_groups"]]
        index = {n: i for i, n in enumerate(n for g in group_names for n in g)}
        state = {index[n]: st for n, st in sd["state"].items()}
    tensors, scalars = {}, {}
    for idx, st in state.items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"state.{idx}.{key}"] = val.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{key}"] = val
    groups, first = [], 0
    for g_sd, names in zip(sd["param_groups"], group_names):  # params: indices over all groups, as torch's
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g_sd.items() if k != "params"}
                      | {"params": list(range(first, first + len(names))), "param_names": names})
        first += len(names)
    return tensors, {"type": type(optimizer).__name__, "param_groups": groups, "scalar_state": scalars}


def _write_folder(tmp: Path, model, optimizer, trainer_state, tokenizer, model_state=None,
                  optimizer_state=None) -> None:
    tmp.mkdir(parents=True)
    written = []
    cfg: ModelConfig = model.cfg
    (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    written.append("config.json")
    save_file(_model_tensors(model, model_state), tmp / "model.safetensors", metadata={"format": FORMAT})
    written.append("model.safetensors")
    if optimizer is not None:
        tensors, info = _optimizer_payload(model, optimizer, optimizer_state)
        save_file(tensors, tmp / "optimizer.safetensors", metadata={"format": FORMAT})
        (tmp / "optimizer.json").write_text(json.dumps(info, indent=1) + "\n")
        written += ["optimizer.safetensors", "optimizer.json"]
    if trainer_state is not None:
        (tmp / "trainer.json").write_text(json.dumps(trainer_state) + "\n")
        written.append("trainer.json")
    if tokenizer is not None:
        tokenizer.save(tmp)
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    for name in files:
        fsync_file(tmp / name)
    manifest = {"format": FORMAT, "files": {name: (tmp / name).stat().st_size for name in files}}
    with open(tmp / "manifest.json", "w") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    trainer_state: dict[str, Any] | None = None, tokenizer: Any = None, *,
                    keep_last: int | None = None, model_state: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically, point `<run>/latest` at it, and prune old ones.

    Args:
        path: the checkpoint folder, e.g. `<run>/checkpoints/step-000123`. When its parent is
            named `checkpoints`, the run folder's `latest` pointer is updated and pruning applies.
        model: a `MoDTransformer` (its `cfg` is saved as `config.json`).
        optimizer: saved flattened (safetensors + JSON) when given.
        trainer_state: JSON-able dict (step, tokens, RNG states, ...) saved as `trainer.json`.
        tokenizer: anything with `save(folder)`.
        keep_last: keep this many newest checkpoints of the run (None or 0: keep all).
        model_state, optimizer_state: full state dicts to write instead of the model's and optimizer's
            own (a sharded model's, gathered by `distributed.full_state`; optimizer state keyed by name).

    Returns:
        The checkpoint folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crash mid-write: never a valid checkpoint
    try:
        _write_folder(tmp, model, optimizer, trainer_state, tokenizer, model_state, optimizer_state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_dir(path.parent)
    if path.parent.name == "checkpoints":
        run_dir = path.parent.parent
        write_text_atomic(run_dir / "latest", f"checkpoints/{path.name}\n")
        if keep_last:
            for old in list_checkpoints(run_dir)[:-keep_last]:
                if old != path:
                    shutil.rmtree(old, ignore_errors=True)
    return path


# ---- load -----------------------------------------------------------------------------------------
def verify_checkpoint(path: str | Path) -> Path:
    """Resolve `path` and check the files against `manifest.json` (sizes); returns the folder."""
    ckpt = resolve_checkpoint(path)
    mpath = ckpt / "manifest.json"
    if mpath.exists():
        manifest = read_json_file(mpath, "checkpoint file")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"{mpath} is not a mixdepth checkpoint manifest (format {FORMAT} expected)")
        for name, size in manifest.get("files", {}).items():
            f = ckpt / name
            if not f.exists():
                raise ValueError(f"checkpoint file missing: {f}")
            actual = f.stat().st_size
            if actual != size:
                raise ValueError(f"checkpoint file {f} is truncated or corrupt ({actual} bytes, {size} expected)")
    return ckpt


TRANSFORMERS_MODEL_TYPE = "mixdepth"
"""config.json's `model_type` in a folder exported for transformers (`mixdepth export`, `mixdepth.hf`):
our config is its `mixdepth` entry and the weights are ours under `model.`."""


def _config_data(cpath: Path) -> tuple[dict, dict | None]:
    """config.json's model config, and the whole transformers config if the folder is an export."""
    data = read_json_file(cpath, "checkpoint file")
    if isinstance(data, dict) and data.get("model_type") == TRANSFORMERS_MODEL_TYPE:
        if not isinstance(data.get("mixdepth"), dict):
            raise ValueError(f"{cpath} has model_type {TRANSFORMERS_MODEL_TYPE!r} but no `mixdepth` model config")
        return data["mixdepth"], data
    return data, None


def load_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of a checkpoint (folder or run folder, or a folder exported for transformers)."""
    from . import __version__

    ckpt = resolve_checkpoint(path)
    cpath = ckpt / "config.json"
    data, exported = _config_data(cpath)
    try:
        return ModelConfig.from_dict(data)
    except (ValueError, TypeError) as e:
        written = (exported or {}).get("mixdepth_version")
        versions = f"written by mixdepth {written}, read by the installed {__version__}: " \
            if written and written != __version__ else ""
        raise ValueError(f"{cpath} is not a mixdepth model config ({versions}{str(e).splitlines()[0]})") from None


def _load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    fpath = ckpt / "model.safetensors"
    tensors, _ = _load_safetensors(fpath)
    if (ckpt / "config.json").exists() and _config_data(ckpt / "config.json")[1] is not None:  # the export's names
        tensors = {k.removeprefix("model."): v for k, v in tensors.items()}
    cfg = model.cfg
    expected = set(model.state_dict())
    if cfg.tie_embeddings:
        expected.discard("lm_head.weight")
        tensors.pop("lm_head.weight", None)
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        what = f"missing key {missing[0]}" if missing else f"unexpected key {unexpected[0]}"
        raise ValueError(f"{fpath} does not match {ckpt / 'config.json'} ({what}); not a mixdepth checkpoint "
                         "of this config")
    sd = model.state_dict()
    for k, v in tensors.items():
        if sd[k].shape != v.shape:
            raise ValueError(f"{fpath}: tensor {k} has shape {tuple(v.shape)}, config expects {tuple(sd[k].shape)}")
    model.load_state_dict(tensors, strict=False)
    if cfg.tie_embeddings:  # load_state_dict copies into the shared tensor, so the tie holds
        assert model.lm_head.weight is model.embed_tokens.weight


def is_routing_parameter(name: str) -> bool:
    """True for the parameters of routers and predictors (`layers.{i}.router.*`, `layers.{i}.predictor.*`)."""
    return ".router." in name or ".predictor." in name


def load_weights(model: torch.nn.Module, path: str | Path) -> Path:
    """Load a checkpoint's weights into `model`, whose config may differ in routing settings only
    where the weights' names and shapes allow (e.g. capacity or gate). Returns the checkpoint folder."""
    ckpt = verify_checkpoint(path)
    saved = load_config(ckpt)
    if saved.tie_embeddings != model.cfg.tie_embeddings:
        raise ValueError(f"{ckpt / 'config.json'} has tie_embeddings {saved.tie_embeddings}, the model "
                         f"{model.cfg.tie_embeddings}")
    _load_weights(model, ckpt)
    return ckpt


def load_model(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build a `MoDTransformer` (in eval mode) from a checkpoint folder or a run folder (its `latest`).

    Raises a one-line `ValueError` naming the file for a missing, truncated or foreign file.
    """
    from .model import MoDTransformer

    ckpt = verify_checkpoint(path)
    cfg = load_config(ckpt)
    model = MoDTransformer(cfg)
    _load_weights(model, ckpt)
    return model.to(device).eval()


def load_checkpoint_tokenizer(path: str | Path):
    """The tokenizer saved with a checkpoint (its folder, or the run folder above), else bytes.

    `path` may be a checkpoint folder or a run folder; a run folder is resolved to its latest
    checkpoint first, since the tokenizer is saved inside each checkpoint folder.
    """
    from .data import ByteTokenizer, load_tokenizer

    ckpt = resolve_checkpoint(path).resolve()
    for d in (ckpt, *ckpt.parents[:2]):
        if (d / "tokenizer.json").exists() or (d / "tokenizer_config.json").exists():
            return load_tokenizer(d)
    return ByteTokenizer()


def load_training_state(path: str | Path, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load weights (and optimizer state) of a checkpoint into existing objects; returns trainer.json."""
    ckpt = verify_checkpoint(path)
    saved = load_config(ckpt)
    if saved.to_dict() != model.cfg.to_dict():
        diff = _first_difference(saved.to_dict(), model.cfg.to_dict())
        raise ValueError(f"checkpoint {ckpt} was trained with a different model config ({diff}); "
                         "resume with the same settings or use a new --out")
    _load_weights(model, ckpt)
    if optimizer is not None:
        _load_optimizer(model, optimizer, ckpt)
    tpath = ckpt / "trainer.json"
    return read_json_file(tpath, "checkpoint file") if tpath.exists() else {}


def _first_difference(a: dict, b: dict, prefix: str = "") -> str:
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            d = _first_difference(va, vb, f"{prefix}{k}.")
            if d:
                return d
        elif va != vb:
            return f"{prefix}{k}: checkpoint {va!r}, now {vb!r}"
    return ""


def load_optimizer_state(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a checkpoint's optimizer state into `optimizer` (over `model`'s parameters)."""
    _load_optimizer(model, optimizer, verify_checkpoint(path))


def _saved_optimizer_state(ckpt: Path) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """The saved optimizer state by parameter index, and the saved param groups (with `param_names`)."""
    info = read_json_file(ckpt / "optimizer.json", "checkpoint file")
    tensors, _ = _load_safetensors(ckpt / "optimizer.safetensors")
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = val
    for key, val in info.get("scalar_state", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = val
    return state, info.get("param_groups", [])


def optimizer_state_by_name(path: str | Path) -> dict[str, Any]:
    """A checkpoint's optimizer state as a full state dict keyed by parameter name (what
    `torch.distributed.checkpoint.state_dict.set_optimizer_state_dict` takes to shard it)."""
    ckpt = verify_checkpoint(path)
    state, groups = _saved_optimizer_state(ckpt)
    names = [n for g in groups for n in g.get("param_names", [])]
    out_groups = []
    for g in groups:
        g = {k: v for k, v in g.items() if k != "param_names"} | {"params": list(g.get("param_names", []))}
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        out_groups.append(g)
    return {"state": {names[i]: st for i, st in state.items()}, "param_groups": out_groups}


def _load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path) -> None:
    state, groups = _saved_optimizer_state(ckpt)
    names = {id(p): n for n, p in model.named_parameters()}
    now = [[names.get(id(p), "?") for p in g["params"]] for g in optimizer.param_groups]
    if [g.get("param_names") for g in groups] != now:
        raise ValueError(f"{ckpt / 'optimizer.json'} does not match the model's parameters (different config?)")
    param_groups = []
    for g in groups:
        g = {k: v for k, v in g.items() if k != "param_names"}
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        param_groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
