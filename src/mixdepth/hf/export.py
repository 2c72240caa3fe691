"""Writing mixdepth models as Hugging Face folders, in two formats (`FORMATS`).

- `transformers` (the default of `mixdepth export`): a `MixdepthForCausalLM` folder that routes and
  skips inside transformers: `config.json` (model_type "mixdepth", our `ModelConfig` under
  `mixdepth`, `auto_map`), `configuration_mixdepth.py` and `modeling_mixdepth.py` (two lines each:
  they import the installed mixdepth package, so no second copy of the model code exists), one
  `model.safetensors` with every weight, router and calibration tensor, the tokenizer (a byte-level
  `tokenizer.json` for our byte tokenizer) and `generation_config.json`.
  `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it, and so does
  `mixdepth generate/eval/train --init` (`mixdepth.checkpoint`).
- `llama`: the dense function as the family's own transformers class (`LlamaForCausalLM`, ...),
  with routers, predictors and calibration beside it (`mixdepth_routing.safetensors` +
  `mixdepth.json`), so `from_hf` of the folder gives back the same MoD model.

Both are written to a temporary folder and renamed into place: a failure leaves nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ModelConfig
from .convert import state_dict_to_hf
from .families import HF_CLASSES, ROUTING_CONFIG, ROUTING_FILE, _transformers, hf_config_dict
from .publish import write_folder

FORMATS = ("transformers", "llama")
"""`mixdepth export --format`: the routed model in transformers, or the dense function as its family's class."""


# ---- the dense function as the family's class (format llama) -------------------------------------
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


def to_hf(model, folder: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write `model` as a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads.

    The HF model computes the dense-mode function; routers, predictors and calibration go to
    `mixdepth_routing.safetensors` and the full config to `mixdepth.json`, beside it. The Hugging
    Face tokenizer in `tokenizer_dir` (a folder with `tokenizer.json`), if given, is written too.
    Written to a temporary folder, renamed at the end.
    """
    from ..data import HFTokenizer

    has_tokenizer = tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").exists()
    tokenizer = HFTokenizer.from_folder(tokenizer_dir) if has_tokenizer else None
    return write_folder(folder, lambda tmp: _write_hf_folder(model, tmp, tokenizer))


# ---- the routed model in transformers (format transformers) --------------------------------------
BYTE_END = 0
"""The exported byte tokenizer's end-of-text (and padding) token: byte 0, which text never holds."""


def byte_tokenizer_files(folder: Path) -> None:
    """A transformers tokenizer for our byte tokenizer: token id = byte value (GPT-2's byte-to-character
    map, no merges), so `AutoTokenizer` encodes text as `ByteTokenizer` does. Byte 0 (NUL, absent
    from text) is its bos, eos and pad token, which tools ask for (lm-eval's prefix and end-of-text
    tokens); nothing adds it to the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": chars[0], "bos_token": chars[0],
              "eos_token": chars[0], "model_max_length": 10**9, "clean_up_tokenization_spaces": False,
              "model_input_names": ["input_ids", "attention_mask"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer uses)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def _write_transformers_folder(model, folder: Path, tokenizer) -> None:
    from transformers import GenerationConfig

    from .modeling import MixdepthForCausalLM

    if tokenizer is None:  # the byte tokenizer: byte 0 ends text and pads
        tokens = {"eos_token_id": BYTE_END, "pad_token_id": BYTE_END}
    else:
        gen, stop = tokenizer.generation_config, tokenizer.stop_ids
        tokens = {k: gen[k] for k in ("bos_token_id", "pad_token_id") if gen.get(k) is not None}
        if stop:
            tokens["eos_token_id"] = stop[0] if len(stop) == 1 else stop
    wrapper = MixdepthForCausalLM.from_model(model, **tokens)
    wrapper.generation_config = GenerationConfig(**tokens)
    wrapper.save_pretrained(str(folder))  # with architectures and the remote-code files (`MixdepthConfig`)
    if tokenizer is None:
        byte_tokenizer_files(folder)
    else:
        tokenizer.save(folder)
        wrapper.generation_config.save_pretrained(str(folder))  # over a copy the tokenizer kept


def to_transformers(model, folder: str | Path, tokenizer=None) -> Path:
    """Write `model` as a `MixdepthForCausalLM` folder (the format `transformers`; module docstring).

    `tokenizer`: an `HFTokenizer` to write beside it; None writes the byte-level tokenizer (a
    model whose vocabulary is not 256 bytes then needs one).
    """
    _transformers()  # a one-line error without it, before any folder
    if tokenizer is None and model.cfg.vocab_size != 256:
        raise ValueError(f"a model of vocab_size {model.cfg.vocab_size} needs its Hugging Face tokenizer to export "
                         "(byte-level covers 256 tokens)")
    return write_folder(folder, lambda tmp: _write_transformers_folder(model, tmp, tokenizer))


def export(ckpt: str | Path, out: str | Path, format: str = "transformers") -> Path:
    """`mixdepth export`: a mixdepth checkpoint -> a Hugging Face folder in `format` (`FORMATS`)."""
    from ..checkpoint import load_checkpoint_tokenizer, load_model, resolve_checkpoint
    from ..data import HFTokenizer

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    path = resolve_checkpoint(ckpt)
    model = load_model(path)
    if format == "llama":
        tok = path if (path / "tokenizer.json").exists() else None
        return to_hf(model, out, tok)
    tokenizer = load_checkpoint_tokenizer(path)
    if not isinstance(tokenizer, HFTokenizer):
        if tokenizer.kind != "byte":
            raise ValueError(f"{path}: a {tokenizer.kind} tokenizer has no Hugging Face form to export; "
                             "the transformers format takes byte-level or Hugging Face tokenizers")
        tokenizer = None
    return to_transformers(model, out, tokenizer)
