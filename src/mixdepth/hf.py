"""Hugging Face models in and out: Llama, Mistral, Qwen2/2.5 and Qwen3, from a folder or a GGUF file.

A state-dict adapter plus a config mapper (torchtitan's `state_dict_adapter`): our module names
are Hugging Face's Llama names without the `model.` prefix, so the weights map one to one.
- `config_from_hf(hf_config, routing)`: the `ModelConfig` of a transformers config (old keys
  `rope_theta`/`rope_scaling` and transformers 5's `rope_parameters` both read, through
  transformers itself), with routers inserted as `routing` says.
- `load_hf(src, routing)`: the model (and tokenizer) of a local folder (`config.json`,
  `model.safetensors` or a sharded index, tokenizer files) or a GGUF file. The model is built on
  the meta device and the weights are assigned, shard by shard, so memory holds one copy.
- `from_hf(model_or_folder, routing)` / `to_hf(model, folder)`: the Python API. An exported folder
  loads with `AutoModelForCausalLM.from_pretrained` and computes the dense-mode model; routers,
  predictors and calibration go beside it (`mixdepth_routing.safetensors` + `mixdepth.json`), so
  `from_hf` of an exported folder gives back the same MoD model.
- `convert(src, out)` / `export(ckpt, out)`: the commands' work, written to a temporary folder
  and renamed into place, so a failure leaves nothing half-written.

The gate of a converted model defaults to `straight_through` (value 1, router gradient): in dense
mode, or at capacity 1, the converted model computes exactly what its source does. transformers
(`mixdepth[hf]`) is imported only here, and only when one of these functions runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import FAMILIES, ModelConfig, RoutingConfig
from .files import fsync_dir, fsync_file, read_json_file

log = logging.getLogger("mixdepth")

SUPPORTED = FAMILIES
HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM"}
CONVERT_ROUTING = {"gate": "straight_through"}
"""Routing defaults of a converted model, over `RoutingConfig`'s: a gate of value 1 keeps the
pretrained function (the block output is not halved by sigmoid(0))."""
ROUTING_FILE = "mixdepth_routing.safetensors"
ROUTING_CONFIG = "mixdepth.json"
_ROUTING_KEYS = ("router.", "predictor.", "causal_threshold", "threshold_table")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("Hugging Face conversion needs transformers: pip install 'mixdepth[hf]'") from None
    return transformers


# ---- config ---------------------------------------------------------------------------------------
def _rope(hf: Any) -> tuple[float, dict | None]:
    """(theta, scaling) from a transformers config: `rope_parameters` (v5) or `rope_theta` + `rope_scaling`."""
    params = getattr(hf, "rope_parameters", None)
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type parameters
        params = params["full_attention"]
    if not isinstance(params, dict) or "rope_theta" not in params:
        params = dict(getattr(hf, "rope_scaling", None) or {}, rope_theta=getattr(hf, "rope_theta", 10000.0))
    params = dict(params)
    kind = params.pop("rope_type", params.pop("type", "default"))
    theta = float(params.pop("rope_theta"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial rotary embeddings (partial_rotary_factor {params['partial_rotary_factor']}) "
                         "are not supported")
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, {"rope_type": "linear", "factor": float(params["factor"])}
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return theta, {"rope_type": "llama3", **{k: params[k] for k in keys}}
    raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def _sliding_window(hf: Any) -> int:
    """The attention window the source applies (0: none)."""
    window = getattr(hf, "sliding_window", None) or 0
    if not window:
        return 0
    if hf.model_type == "mistral":
        return int(window)
    layer_types = getattr(hf, "layer_types", None) or []
    if getattr(hf, "use_sliding_window", False) or "sliding_attention" in layer_types:
        return int(window)
    return 0


def config_from_hf(hf: Any, routing: RoutingConfig | dict | None = None, *, max_seq_len: int | None = None
                   ) -> ModelConfig:
    """The `ModelConfig` of a transformers config object (or a config.json dict), with `routing`.

    Args:
        hf: a `transformers.PretrainedConfig` or the dict of a `config.json`.
        routing: the routers to insert (default: `CONVERT_ROUTING` over `RoutingConfig`'s defaults).
        max_seq_len: cap on the context (default: the source's `max_position_embeddings`, and its
            sliding window when it has one).

    Raises a one-line `ValueError` for an unsupported `model_type` or feature.
    """
    if isinstance(hf, dict):
        kind = hf.get("model_type")
        if kind not in SUPPORTED:
            raise ValueError(f"model_type {kind!r} is not supported (supported: {', '.join(SUPPORTED)})")
        hf = _transformers().AutoConfig.for_model(**hf)
    kind = getattr(hf, "model_type", None)
    if kind not in SUPPORTED:
        raise ValueError(f"model_type {kind!r} is not supported (supported: {', '.join(SUPPORTED)})")
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (the MLP is SwiGLU: silu)")
    theta, scaling = _rope(hf)
    window = _sliding_window(hf)
    ctx = int(hf.max_position_embeddings)
    if window:
        ctx = min(ctx, window)
    if max_seq_len:
        ctx = min(ctx, int(max_seq_len))
    bias = bool(getattr(hf, "attention_bias", False))
    if routing is None or isinstance(routing, dict):
        routing = RoutingConfig(**{**CONVERT_ROUTING, **(routing or {})})
    return ModelConfig(
        vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=hf.num_hidden_layers, n_heads=hf.num_attention_heads,
        n_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        ffn_dim=hf.intermediate_size, max_seq_len=ctx, rope_theta=theta, rope_scaling=scaling,
        norm_eps=float(hf.rms_norm_eps), tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=True if kind == "qwen2" else bias, o_bias=bias and kind != "qwen2",
        mlp_bias=bool(getattr(hf, "mlp_bias", False)), qk_norm=kind == "qwen3", sliding_window=window,
        family=kind, routing=routing,
    )


def _check_family(cfg: ModelConfig) -> None:
    """Refuse an export whose architecture the family's HF class cannot hold."""
    fam = cfg.family
    problems = []
    if cfg.local_window:
        problems.append(f"a local attention window on the non-routed layers (model.local_window {cfg.local_window})")
    if cfg.qk_norm != (fam == "qwen3"):
        problems.append("q/k norm" if cfg.qk_norm else "no q/k norm")
    if fam == "qwen2" and not (cfg.qkv_bias and not cfg.o_bias):
        problems.append("q/k/v bias without o bias is required")
    if fam in ("llama", "qwen3") and cfg.qkv_bias != cfg.o_bias:
        problems.append("q/k/v and o biases differ")
    if fam in ("mistral",) and (cfg.qkv_bias or cfg.o_bias):
        problems.append("attention biases")
    if fam != "llama" and cfg.mlp_bias:
        problems.append("MLP biases")
    if fam != "mistral" and fam != "qwen2" and fam != "qwen3" and cfg.sliding_window:
        problems.append("a sliding window")
    if problems:
        raise ValueError(f"model.family {fam} cannot express this model ({problems[0]})")


def hf_config_dict(cfg: ModelConfig, tokens: dict[str, Any] | None = None) -> dict[str, Any]:
    """The transformers config (as a dict for `AutoConfig.for_model`) of a model's dense function."""
    _check_family(cfg)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    d: dict[str, Any] = dict(
        model_type=cfg.family, vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope, hidden_act="silu",
    )
    if cfg.family in ("llama", "qwen3"):
        d["attention_bias"] = cfg.qkv_bias
    if cfg.family == "llama":
        d["mlp_bias"] = cfg.mlp_bias
    if cfg.family == "mistral":
        d["sliding_window"] = cfg.sliding_window or None
    if cfg.family in ("qwen2", "qwen3"):
        d["use_sliding_window"] = bool(cfg.sliding_window)
        d["sliding_window"] = cfg.sliding_window or None
        if cfg.sliding_window:
            d["max_window_layers"] = 0
    d.update({k: v for k, v in (tokens or {}).items() if v is not None})
    return d


# ---- weights --------------------------------------------------------------------------------------
def state_dict_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face keys -> ours (drop `model.`, a tied `lm_head.weight` and stored RoPE tables)."""
    out = {}
    for key, value in sd.items():
        if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and cfg.tie_embeddings):
            continue
        out[key.removeprefix("model.")] = value
    return out


def _is_routing_key(key: str) -> bool:
    return any(part in key for part in _ROUTING_KEYS)


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Our state dict -> (Hugging Face's weights, the routing tensors kept beside them)."""
    hf, routing = {}, {}
    for key, value in sd.items():
        if _is_routing_key(key):
            routing[key] = value
        elif key == "lm_head.weight":
            if not cfg.tie_embeddings:
                hf[key] = value
        else:
            hf["model." + key] = value
    return hf, routing


def _assign(cfg: ModelConfig, tensors: dict[str, torch.Tensor], what: str, seed: int = 0):
    """A `MoDTransformer` holding `tensors` (assigned, not copied), its new parts initialised."""
    from .model import MoDTransformer

    with torch.device("meta"):
        model = MoDTransformer(cfg)
    expected = {k for k in model.state_dict() if not (k == "lm_head.weight" and cfg.tie_embeddings)}
    missing = sorted(k for k in expected - set(tensors) if not _is_routing_key(k))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        detail = f"missing weight {missing[0]}" if missing else f"unexpected weight {unexpected[0]}"
        raise ValueError(f"{what} does not match its config ({detail})")
    shapes = model.state_dict()
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(shapes[k].shape):
            raise ValueError(f"{what}: weight {k} has shape {tuple(v.shape)}, the config implies "
                             f"{tuple(shapes[k].shape)}")
    model.load_state_dict(tensors, strict=False, assign=True)
    torch.manual_seed(seed)
    model.materialize("cpu")
    return model.eval()


# ---- reading sources ------------------------------------------------------------------------------
@dataclass
class Source:
    """What a conversion read: the model and where its tokenizer files are."""

    model: Any
    tokenizer_dir: Path | None
    hf_config: Any
    kind: str  # "folder", "gguf" or "model"


def _read_shards(folder: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors (one file or a sharded index), read shard by shard."""
    from safetensors import SafetensorError, safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        wmap = read_json_file(index, "index file").get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise ValueError(f"{index} has no weight_map")
        shards = sorted(set(wmap.values()))
    elif (folder / "model.safetensors").exists():
        shards, wmap = ["model.safetensors"], None
    else:
        raise ValueError(f"{folder} has no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, torch.Tensor] = {}
    for name in shards:
        path = folder / name
        if not path.exists():
            raise ValueError(f"shard {path} is missing (named by {index.name})")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    tensors[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"shard {path} is truncated or corrupt ({msg})") from None
    if wmap is not None:
        absent = sorted(set(wmap) - set(tensors))
        if absent:
            raise ValueError(f"{index} names weight {absent[0]}, which is in none of its shards")
    return tensors


def _read_config(folder: Path):
    path = folder / "config.json"
    if not path.exists():
        raise ValueError(f"{folder} has no config.json (expected a Hugging Face model folder or a .gguf file)")
    d = read_json_file(path, "config file")
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object")
    kind = d.get("model_type")
    if kind not in SUPPORTED:
        raise ValueError(f"{path}: model_type {kind!r} is not supported (supported: {', '.join(SUPPORTED)})")
    try:
        return _transformers().AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path} is not a valid {kind} config ({str(e).splitlines()[0]})") from None


def _gguf_reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise ValueError("reading GGUF files needs the gguf package: pip install 'mixdepth[hf]'") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises many kinds on a bad file
        raise ValueError(f"{path} is not a readable GGUF file ({str(e).splitlines()[0] or type(e).__name__})"
                         ) from None
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else "?"
    supported = {"llama", "qwen2", "qwen3"}  # llama.cpp stores Mistral as llama
    if arch not in supported:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                         f"{', '.join(sorted(supported))})")
    bad = sorted({t.tensor_type.name for t in reader.tensors} - _dequantizable(gguf))
    if bad:
        raise ValueError(f"{path}: quantisation {bad[0]} is not supported (gguf cannot dequantize it)")
    return reader


def _dequantizable(gguf) -> set[str]:
    """Names of the GGML tensor types the gguf package can dequantize (as `gguf.dequantize` decides)."""
    from gguf import quants

    return {"F32", "F16"} | {q.name for q in quants._type_traits}


def _load_gguf(path: Path, routing, max_seq_len, tmp: Path, seed: int) -> Source:
    """A GGUF file through transformers' GGUF reader: config, dequantized fp32 weights, tokenizer."""
    tf = _transformers()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    _gguf_reader(path)
    folder, name = str(path.parent), path.name
    try:
        hf_cfg = tf.AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: cannot read its config ({str(e).splitlines()[0]})") from None
    cfg = config_from_hf(hf_cfg, routing, max_seq_len=max_seq_len)
    with torch.device("meta"):
        skeleton = tf.AutoModelForCausalLM.from_config(hf_cfg)
    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    except NotImplementedError as e:
        raise ValueError(f"{path}: {str(e).splitlines()[0]}") from None
    tensors = parsed["tensors"]
    del skeleton
    model = _assign(cfg, state_dict_from_hf(tensors, cfg), str(path), seed)
    del parsed, tensors
    tok_dir = tmp / "gguf-tokenizer"
    try:
        tok = tf.AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: cannot read its tokenizer ({str(e).splitlines()[0]})") from None
    tok.save_pretrained(str(tok_dir))
    return Source(model=model, tokenizer_dir=tok_dir, hf_config=hf_cfg, kind="gguf")


def _load_folder(folder: Path, routing, max_seq_len, dtype, seed: int) -> Source:
    hf_cfg = _read_config(folder)
    exported = folder / ROUTING_CONFIG
    if exported.exists():  # an exported mixdepth model: its routing comes back with it
        cfg = ModelConfig.from_dict(read_json_file(exported, "mixdepth config"))
        if routing is not None:
            raise ValueError(f"{folder} is an exported mixdepth model with its own routing ({exported.name}); "
                             "convert it without routing settings")
    else:
        try:
            cfg = config_from_hf(hf_cfg, routing, max_seq_len=max_seq_len)
        except ValueError as e:
            raise ValueError(f"{folder / 'config.json'}: {e}") from None
    tensors = state_dict_from_hf(_read_shards(folder, dtype), cfg)
    if exported.exists():
        from safetensors.torch import load_file

        rpath = folder / ROUTING_FILE
        if not rpath.exists():
            raise ValueError(f"{rpath} is missing (named by {exported.name})")
        tensors.update(load_file(str(rpath)))
    model = _assign(cfg, tensors, str(folder), seed)
    return Source(model=model, tokenizer_dir=folder, hf_config=hf_cfg, kind="folder")


def load_hf(src: str | Path, routing: RoutingConfig | dict | None = None, *, max_seq_len: int | None = None,
            dtype: str = "fp32", seed: int = 0, workdir: str | Path | None = None) -> Source:
    """Read a Hugging Face folder or GGUF file into a `MoDTransformer` (eval mode, on CPU).

    Args:
        src: a local folder (`config.json`, safetensors, tokenizer files) or a `.gguf` file.
        routing: the routers to insert (`config_from_hf`).
        max_seq_len: cap on the context.
        dtype: `fp32` (default), `bf16`, or `auto` (the folder's own dtype); GGUF is dequantized to fp32.
        seed: seed of the new routers' and predictors' initialisation.
        workdir: where the tokenizer of a GGUF file is written (default: a temporary folder).
    """
    src = Path(src)
    if not src.exists():
        raise ValueError(f"{src} does not exist (a local Hugging Face folder or .gguf file; the hub is never used)")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "auto": None}.get(dtype, "?")
    if torch_dtype == "?":
        raise ValueError(f"dtype must be fp32, bf16 or auto, got {dtype!r}")
    if src.is_file():
        if src.suffix != ".gguf":
            raise ValueError(f"{src} is a file but not a .gguf file")
        work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="mixdepth-gguf-"))
        try:
            source = _load_gguf(src, routing, max_seq_len, work, seed)
        except BaseException:
            if not workdir:  # ours: a failed read leaves no temporary folder
                shutil.rmtree(work, ignore_errors=True)
            raise
        if torch_dtype not in (None, torch.float32):
            source.model.to(torch_dtype)
        return source
    return _load_folder(src, routing, max_seq_len, torch_dtype, seed)


def from_hf(model_or_folder: Any, routing: RoutingConfig | dict | None = None, *, max_seq_len: int | None = None,
            dtype: str = "fp32", seed: int = 0):
    """A `MoDTransformer` from a transformers model object, a local HF folder or a GGUF file.

    The routers given by `routing` are inserted with a gate that keeps the pretrained function
    (`straight_through` unless `routing` says otherwise), so in dense mode (or at capacity 1) the
    result computes its source's logits. A transformers model object is copied, not shared.
    """
    if isinstance(model_or_folder, (str, Path)):
        with tempfile.TemporaryDirectory(prefix="mixdepth-gguf-") as work:  # a GGUF's tokenizer, not kept
            return load_hf(model_or_folder, routing, max_seq_len=max_seq_len, dtype=dtype, seed=seed,
                           workdir=work).model
    hf_cfg = getattr(model_or_folder, "config", None)
    if hf_cfg is None or not hasattr(model_or_folder, "state_dict"):
        raise ValueError("from_hf takes a transformers model, a folder or a .gguf path")
    cfg = config_from_hf(hf_cfg, routing, max_seq_len=max_seq_len)
    sd = {k: v.detach().to("cpu", torch.float32 if dtype == "fp32" else v.dtype).clone()
          for k, v in model_or_folder.state_dict().items()}
    return _assign(cfg, state_dict_from_hf(sd, cfg), type(model_or_folder).__name__, seed)


# ---- writing --------------------------------------------------------------------------------------
def _write_hf_folder(model, folder: Path, tokenizer) -> None:
    """The HF folder's files; `tokenizer` (an `HFTokenizer` or None) writes its own files and gives
    the config its bos/eos/pad token ids from generation_config.json."""
    from safetensors.torch import save_file

    cfg: ModelConfig = model.cfg
    tf = _transformers()
    gen = tokenizer.generation_config if tokenizer is not None else {}
    tokens = {k: gen.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    hf_cfg = tf.AutoConfig.for_model(**hf_config_dict(cfg, tokens))
    hf_cfg.architectures = [HF_CLASSES[cfg.family]]
    hf_cfg.save_pretrained(str(folder))
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    weights, routing = state_dict_to_hf(sd, cfg)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    save_file(routing, str(folder / ROUTING_FILE), metadata={"format": "pt"})
    (folder / ROUTING_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    if tokenizer is not None:
        tokenizer.save(folder)


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


def to_hf(model, folder: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write `model` as a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads.

    The HF model computes the dense-mode function; routers, predictors and calibration go to
    `mixdepth_routing.safetensors` and the full config to `mixdepth.json`, beside it. The Hugging
    Face tokenizer in `tokenizer_dir` (a folder with `tokenizer.json`), if given, is written too.
    Written to a temporary folder, renamed at the end.
    """
    from .data import HFTokenizer

    out, created = _fresh_out(folder)
    has_tokenizer = tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").exists()
    tokenizer = HFTokenizer.from_folder(tokenizer_dir) if has_tokenizer else None
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        _write_hf_folder(model, tmp, tokenizer)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_new_parents(created)
        raise
    return out


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class ConvertReport:
    out: Path
    cfg: ModelConfig
    kind: str
    seconds: float
    peak_rss: int
    params: int


def convert(src: str | Path, out: str | Path, routing: RoutingConfig | dict | None = None, *,
            max_seq_len: int | None = None, dtype: str = "fp32", seed: int = 0) -> ConvertReport:
    """`mixdepth convert`: a HF folder or GGUF file -> a mixdepth checkpoint folder at `out`
    (config.json, model.safetensors, manifest.json and the source's tokenizer files).

    Nothing is left in `out` on failure: the checkpoint is written to a temporary folder beside it
    and renamed at the end. Tokenizer files are required (`tokenizer.json`): generation, training
    and evaluation of the converted model use them.
    """
    from .checkpoint import save_checkpoint
    from .data import HFTokenizer

    out, created = _fresh_out(out)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.work"))
    try:
        source = load_hf(src, routing, max_seq_len=max_seq_len, dtype=dtype, seed=seed, workdir=work)
        tokenizer = HFTokenizer.from_folder(source.tokenizer_dir)
        if tokenizer.vocab_size > source.model.cfg.vocab_size:
            raise ValueError(f"the tokenizer in {source.tokenizer_dir} has {tokenizer.vocab_size} tokens, more than "
                             f"the model's vocab_size {source.model.cfg.vocab_size}")
        tmp = work / "checkpoint"
        save_checkpoint(tmp, source.model, tokenizer=tokenizer)
        seconds = time.perf_counter() - t0
        _publish(tmp, out, synced=True)  # save_checkpoint fsynced it
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        _remove_new_parents(created)
        raise
    shutil.rmtree(work, ignore_errors=True)
    model = source.model
    return ConvertReport(out=out, cfg=model.cfg, kind=source.kind, seconds=seconds, peak_rss=peak_rss_bytes(),
                         params=model.num_params())


def export(ckpt: str | Path, out: str | Path) -> Path:
    """`mixdepth export`: a mixdepth checkpoint -> a Hugging Face folder (see `to_hf`)."""
    from .checkpoint import load_model, resolve_checkpoint

    path = resolve_checkpoint(ckpt)
    model = load_model(path)
    tok = path if (path / "tokenizer.json").exists() else None
    return to_hf(model, out, tok)


# ---- checking a conversion against transformers ---------------------------------------------------
def load_reference(src: str | Path):
    """The source model as transformers itself loads it (fp32, eval), for parity checks."""
    tf = _transformers()
    src = Path(src)
    try:
        if src.is_file():  # transformers' GGUF loading needs accelerate
            ref = tf.AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32,
                                                          local_files_only=True)
        else:
            ref = tf.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, ImportError) as e:
        raise ValueError(f"transformers cannot load {src} ({str(e).splitlines()[0]})") from None
    return ref.eval()


@torch.no_grad()
def verify(model, reference, prompt_ids: list[int], new_tokens: int = 32, repeats: int = 3) -> dict[str, Any]:
    """Compare a converted model (dense mode) with its transformers source in one process.

    Returns the largest absolute logit difference over the prompt, whether greedy generation of
    `new_tokens` gives the same tokens, and the generation speed of each (tokens/s including the
    prompt's prefill, the median of `repeats` timed runs after a warm-up, the two alternated).
    """
    from .generate import generate

    ids = torch.tensor([prompt_ids])
    diff = float((model(ids, mode="dense").logits - reference(ids).logits).abs().max())
    n = len(prompt_ids)

    def ours():
        stream = generate(model, [prompt_ids], max_new_tokens=new_tokens, fraction=1.0, stop=None)
        for _ in stream:
            pass
        return stream.result.tokens[0]

    def theirs():
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, n:].tolist()

    runs = {"mixdepth": ours, "transformers": theirs}
    tokens = {name: fn() for name, fn in runs.items()}  # also the warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):  # alternated, so a slow spell of the machine hits both
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    rate = {name: new_tokens / sorted(ts)[len(ts) // 2] for name, ts in times.items()}  # median run
    return {"max_logit_diff": diff, "same_greedy_tokens": tokens["mixdepth"] == tokens["transformers"],
            "tokens_per_s": rate, "speed_ratio": rate["mixdepth"] / rate["transformers"],
            "new_tokens": new_tokens, "repeats": repeats}
