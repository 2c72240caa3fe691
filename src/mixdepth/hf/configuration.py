"""`MixdepthConfig`: our `ModelConfig` as a transformers `PretrainedConfig` (model_type "mixdepth").

Its own module, light to import (transformers' config classes only): registering it with
`AutoConfig` must not load the modeling code (`mixdepth.hf.register`).

Every `save_pretrained` (of the config, so of the model, a Trainer checkpoint or a merged PEFT model
too) writes the two remote-code files `auto_map` names, which import the installed package.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PretrainedConfig

from ..config import ModelConfig

MODEL_TYPE = "mixdepth"
_REMOTE = '"""mixdepth\'s {what} for transformers\' remote code: the installed package holds it."""\n\n{code}'
REMOTE_CODE = {
    "configuration_mixdepth.py": _REMOTE.format(what="config", code="from mixdepth.hf.configuration import "
                                                "MixdepthConfig\n\n__all__ = [\"MixdepthConfig\"]\n"),
    "modeling_mixdepth.py": _REMOTE.format(what="model", code="from mixdepth.hf.modeling import MixdepthConfig, "
                                           "MixdepthForCausalLM\n\n__all__ = [\"MixdepthConfig\", "
                                           "\"MixdepthForCausalLM\"]\n"),
}
"""The two files `auto_map` names: they import the installed package (no second copy of the model code)."""
AUTO_MAP = {"AutoConfig": "configuration_mixdepth.MixdepthConfig",
            "AutoModelForCausalLM": "modeling_mixdepth.MixdepthForCausalLM"}


class MixdepthConfig(PretrainedConfig):
    """A `PretrainedConfig` holding our `ModelConfig` (as the dict `mixdepth`) and, read from it, the
    standard names tools look up (`hidden_size`, `num_hidden_layers`, `max_position_embeddings`, ...).

    `mixdepth` is the one source of truth: the standard names are rewritten from it on construction.
    Default: the `debug` preset (transformers builds default configs).
    """

    model_type = MODEL_TYPE

    mixdepth: dict | None = None
    """`ModelConfig.to_dict()` of the model."""
    mixdepth_version: str | None = None
    """The mixdepth version that wrote `mixdepth`, named when the installed one (which the remote code
    runs) cannot read it; once read, the installed version, which a save writes."""
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
        from .. import __version__

        if self.mixdepth is None:
            self.mixdepth = ModelConfig.from_name("debug").to_dict()
        try:
            cfg = ModelConfig.from_dict(self.mixdepth)
        except (ValueError, TypeError) as e:
            written = self.mixdepth_version
            versions = (f"written by mixdepth {written}, read by the installed {__version__}"
                        if written and written != __version__ else f"read by mixdepth {__version__}")
            raise ValueError(f"config.json's mixdepth settings are not a valid model config ({versions}): "
                             f"{str(e).splitlines()[0]}") from None
        self.mixdepth, self.mixdepth_version = cfg.to_dict(), __version__
        self.vocab_size, self.hidden_size, self.intermediate_size = cfg.vocab_size, cfg.dim, cfg.ffn_dim
        self.num_hidden_layers, self.num_attention_heads = cfg.n_layers, cfg.n_heads
        self.num_key_value_heads, self.head_dim = cfg.n_kv_heads, cfg.head_dim
        self.max_position_embeddings, self.rms_norm_eps = cfg.max_seq_len, cfg.norm_eps
        self.tie_word_embeddings = cfg.tie_embeddings
        super().__post_init__(**kwargs)
        self.auto_map = dict(AUTO_MAP)  # the files save_pretrained writes

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """transformers' `save_pretrained`, and beside config.json the remote-code files (`REMOTE_CODE`)."""
        out = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        for name, text in REMOTE_CODE.items():
            (Path(save_directory) / name).write_text(text)
        return out

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig") -> None:
        """Nothing: transformers calls this after loading remote code so that `save_pretrained` copies
        the class's source file, whose relative imports break outside the package; `save_pretrained`
        writes the remote-code files itself."""

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.mixdepth)
