"""The model families Hugging Face ships and ours: config mapping both ways (Llama, Mistral, Qwen2/2.5, Qwen3).

- `config_from_hf(hf_config, routing)`: the `ModelConfig` of a transformers config (old keys
  `rope_theta`/`rope_scaling` and transformers 5's `rope_parameters` both read, through
  transformers itself), with routers inserted as `routing` says.
- `hf_config_dict(cfg)`: the transformers config of a model's dense function, refused
  (`_check_family`) where the family's class cannot express it.

transformers (`mixdepth[hf]`) is imported only when one of these functions runs.
"""

from __future__ import annotations

from typing import Any

from ..config import FAMILIES, ModelConfig, RoutingConfig

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
        raise ValueError("Hugging Face conversion and export need transformers: pip install 'mixdepth[hf]'") from None
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


def _is_routing_key(key: str) -> bool:
    return any(part in key for part in _ROUTING_KEYS)
