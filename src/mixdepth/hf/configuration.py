"""`MixdepthConfig`: our `ModelConfig` as a transformers `PretrainedConfig` (model_type "mixdepth").

Its own module, light to import (transformers' config classes only): registering it with
`AutoConfig` must not load the modeling code (`mixdepth.hf.register`).
"""

from __future__ import annotations

from transformers import PretrainedConfig

from ..config import ModelConfig

MODEL_TYPE = "mixdepth"


class MixdepthConfig(PretrainedConfig):
    """A `PretrainedConfig` holding our `ModelConfig` (as the dict `mixdepth`) and, read from it, the
    standard names tools look up (`hidden_size`, `num_hidden_layers`, `max_position_embeddings`, ...).

    `mixdepth` is the one source of truth: the standard names are rewritten from it on construction.
    Default: the `debug` preset (transformers builds default configs).
    """

    model_type = MODEL_TYPE

    mixdepth: dict | None = None
    """`ModelConfig.to_dict()` of the model."""
    vocab_size: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int | None = None
    rms_norm_eps: float | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.mixdepth is None:
            self.mixdepth = ModelConfig.from_name("debug").to_dict()
        try:
            cfg = ModelConfig.from_dict(self.mixdepth)
        except (ValueError, TypeError) as e:
            raise ValueError(f"config.json's mixdepth settings are not a valid model config ({e})") from None
        self.mixdepth = cfg.to_dict()
        self.vocab_size, self.hidden_size, self.intermediate_size = cfg.vocab_size, cfg.dim, cfg.ffn_dim
        self.num_hidden_layers, self.num_attention_heads = cfg.n_layers, cfg.n_heads
        self.num_key_value_heads, self.head_dim = cfg.n_kv_heads, cfg.head_dim
        self.max_position_embeddings, self.rms_norm_eps = cfg.max_seq_len, cfg.norm_eps
        self.tie_word_embeddings = cfg.tie_embeddings
        super().__post_init__(**kwargs)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.mixdepth)
