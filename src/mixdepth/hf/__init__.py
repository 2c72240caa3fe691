"""Hugging Face in and out: conversion per family, export, and MoD as a native transformers model.

- `families`: config mapping for Llama, Mistral, Qwen2/2.5, Qwen3 (`config_from_hf`, `hf_config_dict`).
- `convert`: a local HF folder or GGUF file -> `MoDTransformer` (`load_hf`, `from_hf`, `convert`,
  `verify` against transformers).
- `export`: a mixdepth model -> a Hugging Face folder, as `MixdepthForCausalLM` (format
  `transformers`: routes and skips inside transformers) or as the family's dense class (`llama`).
- `configuration`, `modeling`, `cache`: `MixdepthConfig`, `MixdepthForCausalLM` (wrapping one
  `MoDTransformer`) and `MixdepthCache` (transformers' `Cache` over our KV cache) (issue 28).
- `register`: after `import mixdepth`, transformers' Auto classes know "mixdepth", without loading
  transformers until the program does.

transformers (`mixdepth[hf]`) is imported only when a function that needs it runs, or when the
transformers classes are asked for (`mixdepth.hf.MixdepthForCausalLM`, loaded on first access).
"""

from __future__ import annotations

from .convert import (
    ConvertReport,
    Source,
    convert,
    from_hf,
    load_hf,
    load_reference,
    peak_rss_bytes,
    state_dict_from_hf,
    state_dict_to_hf,
    verify,
)
from .export import FORMATS, byte_tokenizer_files, export, to_hf, to_transformers
from .families import (
    CONVERT_ROUTING,
    HF_CLASSES,
    ROUTING_CONFIG,
    ROUTING_FILE,
    SUPPORTED,
    config_from_hf,
    hf_config_dict,
)

_LAZY = {"MixdepthConfig": "configuration", "MixdepthForCausalLM": "modeling", "MixdepthCache": "cache"}

__all__ = ["CONVERT_ROUTING", "FORMATS", "HF_CLASSES", "ROUTING_CONFIG", "ROUTING_FILE", "SUPPORTED", "ConvertReport",
           "MixdepthCache", "MixdepthConfig", "MixdepthForCausalLM", "Source", "byte_tokenizer_files",
           "config_from_hf", "convert", "export", "from_hf", "hf_config_dict", "load_hf", "load_reference",
           "peak_rss_bytes", "state_dict_from_hf", "state_dict_to_hf", "to_hf", "to_transformers", "verify"]


def __getattr__(name: str):
    if name in _LAZY:  # these import transformers: only when asked for
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
