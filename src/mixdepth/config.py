"""Configuration dataclasses: model, routing and training settings.

Every dataclass validates itself on construction and raises a one-line ``ValueError`` naming the
field and the bad value, so the CLI can show it as is. Configs round-trip through JSON with
``to_dict()``/``from_dict()``; unknown keys are an error, missing keys take their defaults.

Routing follows Mixture-of-Depths (Raposo et al. 2024, arXiv 2404.02258, sections 3.1-3.5).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import read_json_file

log = logging.getLogger("mixdepth")

ROUTERS = ["expert_choice", "token_choice", "random", "random_token", "frozen", "rule", "none"]
"""Router names; `mixdepth.model.routers.register_router` adds new ones."""
GATES = ("raw", "sigmoid", "straight_through", "sigmoid_st")
"""Scales of a routed block's output (`RoutingConfig.gate`)."""
VALUE_ONE_GATES = ("straight_through", "sigmoid_st")
"""Gates whose forward value is 1: the router gets a surrogate gradient, not the forward's."""
WHITESPACE_BYTES = [9, 10, 13, 32]
"""Tab, newline, carriage return, space: the byte-level tokens the `rule` router reads."""
UNITS = ("block", "attn", "mlp")
"""What a routed layer's router skips: the whole block (the paper), attention alone or the MLP alone."""
MODES = ("topk", "causal", "dense")
CAUSAL_METHODS = ("predictor", "aux_loss")
DTYPES = ("auto", "fp32", "bf16")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
"""Hugging Face model families (`model_type`) whose architecture a `ModelConfig` can express."""
ROPE_SCALINGS = {"linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
"""RoPE scaling types and their parameters, named as in Hugging Face configs."""
RUN_DERIVED = ("total_steps", "tokens_per_step", "flops_per_step")
"""Keys a trainer writes into a run's run.json beside its settings, derived from them."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def is_device_name(name: object) -> bool:
    """`auto`, `cpu`, `cuda` or `cuda:N`: the device words of every config and command."""
    return isinstance(name, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", name) is not None


class _Serializable:
    """JSON round trip for (nested) dataclasses: unknown keys fail, missing keys default."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, prefix: str = ""):
        if not isinstance(d, dict):
            raise ValueError(f"{prefix or cls.__name__} must be a JSON object, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"unknown config key {prefix}{unknown[0]!s} (known: {', '.join(fields)})")
        missing = sorted(set(fields) - set(d))
        if missing:
            log.info("config %s: keys %s missing, using defaults", prefix or cls.__name__, missing)
        kwargs = {}
        for name, value in d.items():
            sub = _NESTED.get((cls.__name__, name))
            kwargs[name] = sub.from_dict(value, prefix=f"{prefix}{name}.") if sub else value
        return cls(**kwargs)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path):
        return cls.from_dict(read_json_file(path))


@dataclass(kw_only=True)
class RoutingConfig(_Serializable):
    """Which layers are routed, how, and how the causal (sampling-time) decision is made."""

    router: str = "expert_choice"
    """Router type: `expert_choice` (MoD top-k), `token_choice`, `random` (ablation: k random tokens,
    no causal rule), `random_token` (each token enters with the routed fraction's probability, a
    causal rule: the random baseline of sampling), `frozen` (expert choice whose router keeps its
    random initialisation: selects by content, learns nothing), `rule` (the tokens right after a
    `rule_tokens` token, the first k in sequence order, filled up to k with the earliest others;
    causal by construction) or `none` (dense)."""
    unit: str = "block"
    """What the router skips: `block` (attention + MLP, the paper), `attn` (attention alone; every
    token runs the MLP) or `mlp` (the MLP alone; every token runs attention and is cached)."""
    capacity: float = 0.125
    """Fraction C of the sequence that enters a routed block; k = ceil(C*T), at least 1. Paper: 12.5%.
    0 drops the routed blocks (k = 0: the floor of a routing study)."""
    route_every: int = 2
    """Route every n-th layer, starting with layer n-1 (2: layers 1, 3, 5, ...; 1: every layer)."""
    routed_layers: list[int] | None = None
    """Explicit list of routed layer indices; overrides `route_every` when given."""
    gate: str = "sigmoid"
    """Scale of the block output: `raw` router logit (paper), `sigmoid` of it, `straight_through`
    (value 1, the raw logit's gradient; keeps a converted model's function) or `sigmoid_st` (value 1,
    the sigmoid's gradient: 1 + s - stopgrad(s), s = sigmoid(r); learned routing that differs from
    random routing only in which tokens it takes). Default `sigmoid`: with `raw` a router
    initialised near 0 scales the routed blocks' gradients near 0 at the start."""
    router_detach: bool | None = None
    """The router reads a detached copy of the residual stream, so its gradient trains the router
    alone, never the trunk. None: detached for the value-1 gates (`straight_through`, `sigmoid_st`),
    whose surrogate gradient is not the forward's: flowing into the trunk it pushes the residual
    stream along the router weight for no change of the loss, growing with the weight (from scratch,
    `straight_through` diverged at step ~115 of 439 with it); attached for `raw` and `sigmoid`."""
    router_norm: bool = False
    """RMS-normalise the router's input (no weight): the score reads the direction of the residual
    stream, not its scale, which grows with depth and training."""
    router_lr_scale: float = 1.0
    """Learning rate of the router weights relative to `train.lr` (the predictor's stays 1)."""
    rule_tokens: list[int] = field(default_factory=lambda: list(WHITESPACE_BYTES))
    """Token ids after which the `rule` router routes a token (default: whitespace bytes)."""
    mode: str = "topk"
    """Default forward mode: `topk` (training), `causal` (per-token decisions, sampling), `dense`."""
    causal_method: str = "predictor"
    """Sampling-time decision: `predictor` (aux MLP on stop-gradient inputs) or `aux_loss` (router
    logit thresholded; train with `aux_loss_weight` > 0)."""
    aux_loss_weight: float = 0.01
    """Weight of the BCE loss of router logits against top-k membership (paper section 3.5)."""
    predictor_hidden: int = 0
    """Hidden width of the predictor MLP; 0 means dim // 8 (the common choice)."""
    predictor_loss_weight: float = 1.0
    """Weight of the predictor's BCE loss; its inputs are detached, so it never touches the trunk."""
    balance_loss_weight: float = 0.01
    """Weight of the token-choice balancing loss (only for `router="token_choice"`)."""
    router_init_std: float = 0.02
    """Standard deviation of the router weight initialisation."""

    def __post_init__(self) -> None:
        _check(self.router in ROUTERS, f"routing.router must be one of {ROUTERS}, got {self.router!r}")
        _check(
            isinstance(self.capacity, (int, float)) and 0 <= self.capacity <= 1,
            f"routing.capacity must be in [0, 1], got {self.capacity}",
        )
        _check(
            isinstance(self.route_every, int) and self.route_every >= 1,
            f"routing.route_every must be an integer >= 1, got {self.route_every}",
        )
        if self.routed_layers is not None:
            _check(
                isinstance(self.routed_layers, (list, tuple))
                and all(isinstance(i, int) and i >= 0 for i in self.routed_layers),
                f"routing.routed_layers must be a list of layer indices >= 0, got {self.routed_layers}",
            )
            self.routed_layers = sorted(set(self.routed_layers))
        _check(self.unit in UNITS, f"routing.unit must be one of {UNITS}, got {self.unit!r}")
        _check(self.gate in GATES, f"routing.gate must be one of {GATES}, got {self.gate!r}")
        _check(self.router_detach in (None, True, False),
               f"routing.router_detach must be true, false or null, got {self.router_detach!r}")
        _check(isinstance(self.router_norm, bool),
               f"routing.router_norm must be true or false, got {self.router_norm!r}")
        _check(isinstance(self.router_lr_scale, (int, float)) and self.router_lr_scale > 0,
               f"routing.router_lr_scale must be > 0, got {self.router_lr_scale}")
        _check(isinstance(self.rule_tokens, (list, tuple))
               and all(isinstance(t, int) and t >= 0 for t in self.rule_tokens),
               f"routing.rule_tokens must be a list of token ids >= 0, got {self.rule_tokens}")
        self.rule_tokens = list(self.rule_tokens)
        _check(self.mode in MODES, f"routing.mode must be one of {MODES}, got {self.mode!r}")
        _check(
            self.causal_method in CAUSAL_METHODS,
            f"routing.causal_method must be one of {CAUSAL_METHODS}, got {self.causal_method!r}",
        )
        for name in ("aux_loss_weight", "predictor_loss_weight", "balance_loss_weight", "router_init_std"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and v >= 0, f"routing.{name} must be >= 0, got {v}")
        _check(
            isinstance(self.predictor_hidden, int) and self.predictor_hidden >= 0,
            f"routing.predictor_hidden must be an integer >= 0, got {self.predictor_hidden}",
        )

    def is_routed(self, layer: int, n_layers: int) -> bool:
        if self.router == "none":
            return False
        return self.in_pattern(layer)

    def in_pattern(self, layer: int) -> bool:
        """Whether `layer` is in the routed pattern (`routed_layers` or `route_every`), whatever the router:
        a dense model's layers in the pattern keep full attention under `model.local_window`."""
        if self.routed_layers is not None:
            return layer in self.routed_layers
        return layer % self.route_every == self.route_every - 1

    @property
    def detach_router_input(self) -> bool:
        """Whether the router reads a detached residual stream (`router_detach`, resolved)."""
        return self.gate in VALUE_ONE_GATES if self.router_detach is None else self.router_detach

    def k(self, seq_len: int) -> int:
        """Tokens per sequence that enter a routed block in `topk` mode: ceil(C*T), at least 1
        (0 at capacity 0: the routed blocks are dropped)."""
        if self.capacity == 0:
            return 0
        # round() first so that 0.125 * 1024 does not become 129 through float noise
        return max(1, min(seq_len, math.ceil(round(self.capacity * seq_len, 6))))


@dataclass(kw_only=True)
class MoEConfig(_Serializable):
    """Mixture-of-Experts MLPs, and the no-op expert of integrated MoDE (paper section 3.6).

    Variants: MoE (`n_experts` > 0, `routing.router none`); staged MoDE (MoE plus a MoD router:
    the router picks the tokens that enter the block, then the MoE router their experts);
    integrated MoDE (`noop`: one router over the experts and a no-op expert, attention for every
    token, `routing.router none`).
    """

    n_experts: int = 0
    """SwiGLU experts per MoE layer; 0 means a dense MLP (no MoE)."""
    top_k: int = 1
    """Experts per token (token choice), 1 or 2; the no-op expert counts as one."""
    ffn_dim: int = 0
    """Hidden width of one expert; 0 means model.ffn_dim (so top_k=1 has the dense MLP's active size)."""
    every: int = 1
    """MoE MLP on every n-th layer, starting with layer n-1 (1: every layer); the others stay dense."""
    capacity_factor: float = 1.25
    """Training: an expert takes at most ceil(factor * tokens * top_k / experts) tokens of a batch (times the
    non-no-op share for integrated MoDE); overflowing tokens keep their residual. Inference is dropless."""
    dropless: bool = False
    """Never drop tokens in training either (every expert takes all its tokens)."""
    balance_loss_weight: float = 0.01
    """Weight of the Switch balancing loss (1.0 at the target shares)."""
    bias_update_rate: float = 0.0
    """> 0: aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for selection
    only, moved by this much against each expert's excess load after every training forward."""
    noop: bool = False
    """Integrated MoDE: add a no-op expert (output zero: the token keeps its residual, no MLP compute)."""
    noop_fraction: float = 0.5
    """Integrated MoDE: the target share of token choices that go to the no-op expert."""
    impl: str = "auto"
    """Expert compute: `grouped` (`F.grouped_mm`, one call per projection), `loop` (one matmul per
    expert, the reference) or `auto` (grouped where its kernel runs: CPU fp32 with 16-byte-aligned widths)."""

    def __post_init__(self) -> None:
        _check(isinstance(self.n_experts, int) and self.n_experts >= 0,
               f"moe.n_experts must be an integer >= 0, got {self.n_experts}")
        _check(self.top_k in (1, 2), f"moe.top_k must be 1 or 2, got {self.top_k}")
        choices = self.n_experts + bool(self.noop)
        _check(not self.n_experts or self.top_k <= choices,
               f"moe.top_k ({self.top_k}) exceeds the experts to choose from ({choices})")
        for name in ("ffn_dim",):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 0, f"moe.{name} must be an integer >= 0, got {v}")
        _check(isinstance(self.every, int) and self.every >= 1, f"moe.every must be an integer >= 1, got {self.every}")
        _check(isinstance(self.capacity_factor, (int, float)) and self.capacity_factor > 0,
               f"moe.capacity_factor must be > 0, got {self.capacity_factor}")
        for name in ("balance_loss_weight", "bias_update_rate"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and v >= 0, f"moe.{name} must be >= 0, got {v}")
        _check(isinstance(self.noop_fraction, (int, float)) and 0 <= self.noop_fraction < 1,
               f"moe.noop_fraction must be in [0, 1), got {self.noop_fraction}")
        _check(not self.noop or self.n_experts >= 1, "moe.noop needs moe.n_experts >= 1")
        _check(self.impl in ("auto", "grouped", "loop"), f"moe.impl must be auto, grouped or loop, got {self.impl!r}")

    def is_moe(self, layer: int) -> bool:
        return self.n_experts > 0 and layer % self.every == self.every - 1


@dataclass(kw_only=True)
class ModelConfig(_Serializable):
    """A decoder-only Llama-style transformer with Mixture-of-Depths routing."""

    vocab_size: int = 256
    """Vocabulary size (256 for the byte-level tokenizer)."""
    dim: int = 256
    """Model (residual stream) width."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention (query) heads."""
    n_kv_heads: int = 0
    """Key/value heads for grouped-query attention; 0 means `n_heads` (multi-head attention)."""
    head_dim: int = 0
    """Width of one head; 0 means dim // n_heads."""
    ffn_dim: int = 0
    """Hidden width of the SwiGLU MLP; 0 means the Llama rule (8/3 * dim rounded up to 64)."""
    max_seq_len: int = 256
    """Longest sequence the model is built for (RoPE table size, cache default)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the input embedding and the output projection."""
    qkv_bias: bool = False
    """Bias on the q, k and v projections (Qwen2; Llama's `attention_bias`)."""
    o_bias: bool = False
    """Bias on the attention output projection (Llama's `attention_bias`)."""
    mlp_bias: bool = False
    """Bias on the MLP projections (Llama's `mlp_bias`)."""
    qk_norm: bool = False
    """RMSNorm of each query and key head before RoPE (Qwen3)."""
    rope_scaling: dict | None = None
    """RoPE scaling, as in Hugging Face configs: {"rope_type": "linear", "factor": 8.0} or
    {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}; None for plain RoPE."""
    sliding_window: int = 0
    """Attention window of the source model (Mistral); 0 for none. Attention here always spans the
    whole prefix, so max_seq_len may not exceed the window: the model then computes what the source does."""
    local_window: int = 0
    """Attention window of the layers outside the routed pattern: a token attends to itself and the
    `local_window - 1` tokens before it (0: the whole prefix). The routed layers keep full attention, so
    they carry the long-range information (as SpaceByte's global blocks); a dense model (router none)
    keeps full attention on the layers of the pattern too, so it stays MoD's twin. FLOP counts still
    charge full attention."""
    family: str = "llama"
    """Hugging Face model family this architecture follows (llama, mistral, qwen2, qwen3): the
    `model_type` that `mixdepth export` writes."""
    init_std: float = 0.02
    """Standard deviation of the weight initialisation (output projections are scaled by depth)."""
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    """Mixture-of-Depths routing settings."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-Experts MLPs (MoE, staged and integrated MoDE)."""

    def __post_init__(self) -> None:
        if isinstance(self.routing, dict):
            self.routing = RoutingConfig.from_dict(self.routing, prefix="routing.")
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe, prefix="moe.")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, f"model.{name} must be an integer >= 1, got {v}")
        for name in ("n_kv_heads", "head_dim", "ffn_dim"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 0, f"model.{name} must be an integer >= 0, got {v}")
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        _check(
            self.n_heads % self.n_kv_heads == 0,
            f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads})",
        )
        if self.head_dim == 0:
            _check(
                self.dim % self.n_heads == 0,
                f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})",
            )
            self.head_dim = self.dim // self.n_heads
        _check(self.head_dim % 2 == 0, f"model.head_dim must be even for RoPE, got {self.head_dim}")
        if self.ffn_dim == 0:
            self.ffn_dim = 64 * math.ceil(8 * self.dim / 3 / 64)
        _check(self.rope_theta > 0, f"model.rope_theta must be > 0, got {self.rope_theta}")
        _check(self.norm_eps > 0, f"model.norm_eps must be > 0, got {self.norm_eps}")
        _check(self.init_std > 0, f"model.init_std must be > 0, got {self.init_std}")
        _check(self.family in FAMILIES, f"model.family must be one of {FAMILIES}, got {self.family!r}")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            kind = rs.get("rope_type") if isinstance(rs, dict) else None
            _check(kind in ROPE_SCALINGS, f"model.rope_scaling.rope_type must be one of {tuple(ROPE_SCALINGS)}, "
                                          f"got {kind!r}")
            for key in ROPE_SCALINGS[kind]:
                v = rs.get(key)
                _check(isinstance(v, (int, float)) and v > 0,
                       f"model.rope_scaling.{key} must be a number > 0 for {kind} scaling, got {v!r}")
            extra = sorted(set(rs) - {"rope_type", *ROPE_SCALINGS[kind]})
            _check(not extra, f"model.rope_scaling has unknown key {extra[:1]} for {kind} scaling")
        _check(isinstance(self.sliding_window, int) and self.sliding_window >= 0,
               f"model.sliding_window must be an integer >= 0, got {self.sliding_window}")
        _check(not self.sliding_window or self.max_seq_len <= self.sliding_window,
               f"model.max_seq_len ({self.max_seq_len}) exceeds model.sliding_window ({self.sliding_window}): "
               "attention spans the whole prefix here, so longer sequences would not match the source model")
        _check(isinstance(self.local_window, int) and self.local_window >= 0,
               f"model.local_window must be an integer >= 0, got {self.local_window}")
        _check(not self.moe.noop or self.routing.router == "none",
               "moe.noop (integrated MoDE) replaces the MoD router around the block: set routing.router none")
        if self.routing.routed_layers is not None:
            bad = [i for i in self.routing.routed_layers if i >= self.n_layers]
            _check(not bad, f"routing.routed_layers has index {bad[:1]} >= model.n_layers ({self.n_layers})")

    @property
    def routed_layer_ids(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.routing.is_routed(i, self.n_layers)]

    @property
    def kv_routed_layer_ids(self) -> list[int]:
        """Routed layers whose attention is routed, so cache only the tokens that enter (not `mlp`)."""
        return [] if self.routing.unit == "mlp" else self.routed_layer_ids

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """Build a named preset (see `PRESETS`), with field overrides (`routing` may be a dict)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
        d = {k: v for k, v in PRESETS[name].items()}
        routing = dict(d.pop("routing", {}))
        routing.update(overrides.pop("routing", {}) or {})
        moe = dict(d.pop("moe", {}))
        moe.update(overrides.pop("moe", {}) or {})
        d.update(overrides)
        return cls(**d, routing=RoutingConfig(**routing), moe=MoEConfig(**moe))

    def with_routing(self, **changes: Any) -> ModelConfig:
        """A copy with routing fields changed (e.g. `router="none"` for the dense twin)."""
        return dataclasses.replace(self, routing=dataclasses.replace(self.routing, **changes))


# Named model sizes. `debug` builds in well under a second on CPU; `bench` is the size of the
# speed benchmarks in the issues (d=512, 8 layers); `demo` is what `mixdepth demo` trains.
PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128),
    "demo": dict(dim=256, n_layers=6, n_heads=4, ffn_dim=768, max_seq_len=256),
    "bench": dict(dim=512, n_layers=8, n_heads=8, ffn_dim=1536, max_seq_len=1024),
    "small": dict(dim=768, n_layers=12, n_heads=12, ffn_dim=2048, max_seq_len=1024),
    "gpu-large": dict(dim=2048, n_layers=24, n_heads=16, ffn_dim=5632, max_seq_len=4096),
}


# (class name, field name) -> nested dataclass, for from_dict
_NESTED: dict[tuple[str, str], Any] = {("ModelConfig", "routing"): RoutingConfig, ("ModelConfig", "moe"): MoEConfig}


def register_nested(owner: str, name: str, cls: Any) -> None:
    """Let another module's config dataclass nest a config (e.g. TrainConfig.model)."""
    _NESTED[(owner, name)] = cls
