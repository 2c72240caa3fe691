"""Reading Hugging Face models into mixdepth: a local folder or a GGUF file -> a `MoDTransformer`.

A state-dict adapter plus a config mapper (torchtitan's `state_dict_adapter`): our module names
are Hugging Face's Llama names without the `model.` prefix, so the weights map one to one.
- `load_hf(src, routing)`: the model (and tokenizer) of a local folder (`config.json`,
  `model.safetensors` or a sharded index, tokenizer files) or a GGUF file. The model is built on
  the meta device and the weights are assigned, shard by shard, so memory holds one copy.
- `from_hf(model_or_folder, routing)`: the Python API.
- `convert(src, out)`: the command's work, written to a temporary folder and renamed into place,
  so a failure leaves nothing half-written.
- `load_reference` / `verify`: the source as transformers loads it, and a parity check against it.

The gate of a converted model defaults to `straight_through` (value 1, router gradient): in dense
mode, or at capacity 1, the converted model computes exactly what its source does.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig, RoutingConfig
from ..files import read_json_file
from .families import (
    ROUTING_CONFIG,
    ROUTING_FILE,
    SUPPORTED,
    _is_routing_key,
    _transformers,
    config_from_hf,
)
from .publish import _fresh_out, _publish, _remove_new_parents

log = logging.getLogger("mixdepth")


# ---- weights --------------------------------------------------------------------------------------
def state_dict_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face keys -> ours (drop `model.`, a tied `lm_head.weight` and stored RoPE tables)."""
    out = {}
    for key, value in sd.items():
        if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and cfg.tie_embeddings):
            continue
        out[key.removeprefix("model.")] = value
    return out


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
    from ..model import MoDTransformer

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
    from ..checkpoint import save_checkpoint
    from ..data import HFTokenizer

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
    from ..generate import generate

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
