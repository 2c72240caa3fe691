"""Figures from saved artefacts: loss curves, routing maps and router statistics, as PNG files.

Every plot is a function of what a run leaves on disk (`metrics.jsonl`, a checkpoint, or a saved
array of routing decisions), never of a live training loop, so a figure can be redrawn at any
time. The routing map follows the paper's figure of routing decisions (Raposo et al. 2024,
section 5, "routing analysis"): tokens along x, routed layers along y, chosen vs skipped.

matplotlib is an optional dependency (`pip install mixdepth[plot]`): it is imported inside the
functions, with the headless `Agg` backend, so the core library never needs it.

Dimensions: R routed layers, T tokens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import runs
from .runs import read_metrics

log = logging.getLogger("mixdepth")

X_AXES = {"flops": "training FLOPs", "step": "step", "tokens": "training tokens"}
LOSS_KEYS = ("lm_loss", "val_loss", "loss")
# x tick labels are the token characters when the sequence is at most this long (else every n-th index)
MAX_LABELLED_TOKENS = 96


def _pyplot():
    """matplotlib.pyplot on the headless Agg backend, or a one-line error naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plots need matplotlib: pip install 'mixdepth[plot]'") from None
    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: str | Path) -> Path:
    out = Path(out_png)
    if out.suffix.lower() != ".png":
        raise ValueError(f"output file must end in .png, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)  # figures stay alive in pyplot's registry until closed
    log.info("wrote %s", out)
    return out


# ---- run folders ----------------------------------------------------------------------------------
def _run_model(run_dir: Path) -> dict[str, Any]:
    """The model settings saved in a run folder's run.json, or {} (an unreadable or foreign file)."""
    try:
        model = (runs.read_settings(run_dir) or {}).get("model")
    except ValueError:
        return {}
    return model if isinstance(model, dict) else {}


def _run_label(run_dir: Path) -> str:
    """A legend label: the folder name, plus the router and capacity from run.json when known."""
    label = run_dir.name if run_dir.is_dir() else run_dir.parent.name
    routing = _run_model(run_dir).get("routing") or {}
    router = routing.get("router")
    if router == "none":
        return f"{label} (dense)"
    if router:
        return f"{label} ({router}, C={routing.get('capacity')})"
    return label


def _curve(records: list[dict], x: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r[x], r[key]) for r in records if r.get(key) is not None and r.get(x) is not None]
    pts = [(a, b) for a, b in pts if math.isfinite(float(b))]
    if not pts:
        return np.zeros(0), np.zeros(0)
    xs, ys = zip(*pts)
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def plot_loss_curves(
    run_dirs: Sequence[str | Path],
    out_png: str | Path,
    x: str = "flops",
    key: str | Sequence[str] = ("lm_loss", "val_loss"),
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Loss of several runs against training FLOPs (or steps, or tokens), one PNG.

    Args:
        run_dirs: run folders (each with a `metrics.jsonl`) or metrics files.
        out_png: where to write the figure.
        x: `flops` (the isoFLOP view the paper uses), `step` or `tokens`.
        key: one metric or several: `lm_loss` (training), `val_loss` (periodic eval), `loss`, or
            any auxiliary loss logged by name (`predictor_loss`, `aux_loss`, `balance_loss`, ...).
            Training curves are solid lines, validation curves dashed with markers.
        labels: legend labels, one per run (default: folder name, router and capacity).
        title: figure title.

    Returns:
        The path written.
    """
    if x not in X_AXES:
        raise ValueError(f"x must be one of {tuple(X_AXES)}, got {x!r}")
    keys = [key] if isinstance(key, str) else list(key)
    # any loss a run logs by name (a router's aux losses too): metrics.jsonl keys ending in `loss`
    bad = [k for k in keys if not k.endswith("loss")]
    if bad or not keys:
        raise ValueError(f"key must name a logged loss ({', '.join(LOSS_KEYS)}, aux_loss, predictor_loss, ...), "
                         f"got {bad[0] if bad else keys!r}")
    if not run_dirs:
        raise ValueError("no run folders given")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"got {len(labels)} labels for {len(run_dirs)} runs")
    runs = [(Path(d), read_metrics(d)) for d in run_dirs]

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (d, records) in enumerate(runs):
        name = labels[i] if labels is not None else _run_label(d)
        color = colors[i % len(colors)]
        for k in keys:
            xs, ys = _curve(records, x, k)
            if not len(xs):
                continue
            val = k == "val_loss"
            ax.plot(xs, ys, color=color, linestyle="--" if val else "-", marker="o" if val else None,
                    markersize=3, linewidth=1.2, alpha=0.9, label=f"{name} {k}" if len(keys) > 1 else name)
            drawn += 1
    if not drawn:
        raise ValueError(f"no {' or '.join(keys)} values against {x} in {', '.join(str(d) for d, _ in runs)}")
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel("loss (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"loss vs {X_AXES[x]}")
    return _save(fig, out_png)


def plot_router_stats(run_dir: str | Path, out_png: str | Path, x: str = "step") -> Path:
    """Fraction of tokens routed and causal-decision (predictor) accuracy per routed layer over a run.

    Reads the `routed_frac` and `causal_acc` lists of `metrics.jsonl` (one entry per routed layer).
    """
    if x not in X_AXES:
        raise ValueError(f"x must be one of {tuple(X_AXES)}, got {x!r}")
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    panels = [(k, t) for k, t in (("routed_frac", "fraction of tokens routed"),
                                   ("causal_acc", "causal decision accuracy vs top-k"))
              if any(r.get(k) for r in records)]
    if not panels:
        raise ValueError(f"{run_dir}: metrics hold no routed_frac or causal_acc (a dense run has no routers)")
    layer_ids = _routed_layer_ids(run_dir)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (k, t) in zip(axes[0], panels):
        rows = [(r[x], r[k]) for r in records if r.get(k) and r.get(x) is not None]
        xs = np.asarray([a for a, _ in rows], dtype=float)
        vals = np.asarray([b for _, b in rows], dtype=float)  # (steps, R)
        for j in range(vals.shape[1]):
            name = f"layer {layer_ids[j]}" if layer_ids and j < len(layer_ids) else f"routed layer #{j}"
            ax.plot(xs, vals[:, j], linewidth=1.2, label=name)
        ax.set_xlabel(X_AXES[x])
        ax.set_title(t)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        if k == "causal_acc":
            ax.set_ylim(max(0.0, float(np.nanmin(vals)) - 0.02), 1.0)
    fig.suptitle(f"router statistics: {run_dir.name}")
    return _save(fig, out_png)


def _routed_layer_ids(run_dir: Path) -> list[int] | None:
    """Routed layer indices from the run's saved model config, if it has one."""
    from .config import ModelConfig

    model = _run_model(run_dir)
    if not model:
        return None
    try:
        return ModelConfig.from_dict(model).routed_layer_ids
    except (ValueError, TypeError):  # no or a foreign config: positional names
        return None


# ---- routing maps ---------------------------------------------------------------------------------
def _token_label(s: str) -> str:
    """A printable tick label for one token's text (whitespace made visible)."""
    return {" ": "␣", "\n": "↵", "\t": "⇥", "": "∅"}.get(s, s.replace("\n", "↵").replace("$", r"\$"))


def plot_routing_map(
    decisions: np.ndarray,
    tokens_text: Sequence[str] | None,
    out_png: str | Path,
    layer_ids: Sequence[int] | None = None,
    title: str | None = None,
) -> Path:
    """The routing map of one sequence: tokens along x, routed layers along y, chosen vs skipped.

    Args:
        decisions: (R, T) bool array, True where the token entered the layer's block.
        tokens_text: the text of each of the T tokens (tick labels when T is short), or None.
        out_png: where to write the figure.
        layer_ids: the model layer index of each of the R rows (default 0..R-1).
        title: figure title.

    Returns:
        The path written.
    """
    d = np.asarray(decisions)
    if d.ndim == 1:
        d = d[None]
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"decisions must be a non-empty (routed layers, tokens) array, got shape {d.shape}")
    R, T = d.shape
    d = d.astype(bool)
    if tokens_text is not None and len(tokens_text) != T:
        raise ValueError(f"got {len(tokens_text)} token strings for {T} decisions per layer")
    if layer_ids is not None and len(layer_ids) != R:
        raise ValueError(f"got {len(layer_ids)} layer ids for {R} routed layers")
    layer_ids = list(layer_ids) if layer_ids is not None else list(range(R))

    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    width = min(24.0, max(6.0, 0.16 * T + 2))
    fig, ax = plt.subplots(figsize=(width, 1.2 + 0.45 * R))
    cmap = ListedColormap(["#e8e8e8", "#1f5fa8"])  # skipped, chosen
    # row 0 at the bottom: deeper layers higher up, as in the paper's figure
    ax.imshow(d.astype(np.uint8), cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest", origin="lower")
    ax.set_yticks(range(R))
    ax.set_yticklabels([f"layer {i} ({100 * d[j].mean():.0f}%)" for j, i in enumerate(layer_ids)], fontsize=8)
    if tokens_text is not None and T <= MAX_LABELLED_TOKENS:
        ax.set_xticks(range(T))
        ax.set_xticklabels([_token_label(s) for s in tokens_text], fontsize=7, family="monospace")
        ax.tick_params(axis="x", length=0)
    else:
        step = max(1, math.ceil(T / 32))
        ax.set_xticks(range(0, T, step))
        ax.set_xlabel("token position")
    # thin separators between cells keep single tokens readable
    ax.set_xticks(np.arange(-0.5, T, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, R, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.5 if T <= MAX_LABELLED_TOKENS else 0)
    ax.tick_params(which="minor", length=0)
    ax.set_ylabel("routed layer")
    ax.legend(handles=[Patch(color="#1f5fa8", label="block (chosen)"), Patch(color="#e8e8e8", label="skipped")],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.set_title(title or f"routing decisions: {100 * d.mean():.1f}% of token-layer slots chosen")
    return _save(fig, out_png)


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text of each token alone, for tick labels and saved decisions.

    A token with no printable text of its own (a byte of a multi-byte character, a control
    character, an id the tokenizer cannot decode alone) shows as its id: `<e2>` in hex for a
    byte-level tokenizer, `<1234>` otherwise.
    """
    byte_level = getattr(tokenizer, "kind", None) == "byte"
    out = []
    for t in ids:
        try:
            s = tokenizer.decode([t])
        except Exception:  # a tokenizer that cannot decode a lone id: show the id
            s = "\ufffd"
        if "\ufffd" in s or any(not c.isprintable() and c not in " \n\t" for c in s):
            s = f"<{t:02x}>" if byte_level else f"<{t}>"
        out.append(s)
    return out


def routing_map_from_model(
    model, tokenizer, text: str, mode: str = "causal"
) -> tuple[np.ndarray, list[str], list[int]]:
    """Route `text` through `model` and return what each routed layer chose.

    Args:
        model: a `MoDTransformer` (put in eval mode here).
        tokenizer: anything with `encode(str) -> list[int]` and `decode(list[int]) -> str`.
        text: the text to route; cut to the model's `max_seq_len` tokens.
        mode: `causal` (the sampling-time, per-token decision) or `topk` (training-time top-k).

    Returns:
        (decisions (R, T) bool array, token strings (T), routed layer ids (R)).
    """
    import torch

    if mode not in ("causal", "topk"):
        raise ValueError(f"mode must be causal or topk, got {mode!r}")
    if not model.routed_layers:
        raise ValueError("the model has no routed layers (a dense model has no routing map)")
    ids = list(tokenizer.encode(text))
    if not ids:
        raise ValueError("text is empty: nothing to route")
    limit = model.cfg.max_seq_len
    if len(ids) > limit:
        log.warning("text has %d tokens; keeping the first %d (model.max_seq_len)", len(ids), limit)
        ids = ids[:limit]
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(torch.tensor([ids], device=device), mode=mode, return_routing=True)
    layer_ids = sorted(out.routing)
    decisions = np.stack([out.routing[i][0].cpu().numpy().astype(bool) for i in layer_ids])  # (R, T)
    return decisions, token_strings(tokenizer, ids), layer_ids


def save_decisions(path: str | Path, decisions: np.ndarray, tokens_text: Sequence[str] | None,
                   layer_ids: Sequence[int]) -> Path:
    """Save routing decisions as `.npz` (decisions, tokens, layer_ids) for `mixdepth plot routing --decisions`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, decisions=np.asarray(decisions, dtype=bool), layer_ids=np.asarray(layer_ids, dtype=np.int64),
             tokens=np.asarray(list(tokens_text) if tokens_text is not None else [], dtype=str))
    return path


def load_decisions(path: str | Path) -> tuple[np.ndarray, list[str] | None, list[int]]:
    """Read a `.npz` written by `save_decisions` (never unpickles: object arrays are refused)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            decisions = z["decisions"].astype(bool)
            tokens = [str(s) for s in z["tokens"]] if "tokens" in z and z["tokens"].size else None
            layer_ids = [int(i) for i in z["layer_ids"]] if "layer_ids" in z else list(range(len(decisions)))
    except FileNotFoundError:
        raise ValueError(f"decisions file not found: {path}") from None
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"{path} is not a routing decisions .npz ({str(e).splitlines()[0]})") from None
    return decisions, tokens, layer_ids


def routing_maps_from_generation(result, tokenizer, prompts: Sequence[Sequence[int]],
                                 out_png: str | Path) -> list[Path]:
    """The routing map of each row of a `generate` run, as PNG plus its decisions as `.npz` beside it.

    Args:
        result: the `GenerationResult` of `generate` / `generate_text` (its per-row `routing`).
        tokenizer: the tokenizer that encoded the prompts (for the tick labels).
        prompts: the prompts as token ids, one list per row, as fed to the model.
        out_png: the figure of a single row; with several rows, `NAME-{row}.png` beside it.

    Returns:
        The PNG paths written, one per row.
    """
    if not result.routed_layers:
        raise ValueError("the model has no routed layers (a dense model has no routing map)")
    out = Path(out_png)
    written = []
    for b, decisions in enumerate(result.routing):
        d = decisions.numpy()  # (R, T): the prompt's tokens, then each generated token fed back
        texts = token_strings(tokenizer, (list(prompts[b]) + list(result.tokens[b]))[: d.shape[1]])
        png = out if len(result.routing) == 1 else out.with_name(f"{out.stem}-{b}{out.suffix}")
        save_decisions(png.with_suffix(".npz"), d, texts, result.routed_layers)
        written.append(plot_routing_map(
            d, texts, png, layer_ids=result.routed_layers,
            title=f"causal routing while generating: prompt {b}, {d.shape[1]} tokens fed "
                  f"({100 * d.mean():.1f}% of token-layer slots chosen)"))
    return written
