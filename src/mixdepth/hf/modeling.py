"""MoD as a native transformers model: `MixdepthConfig` and `MixdepthForCausalLM` (issue 28).

`MixdepthForCausalLM` wraps one `MoDTransformer` (`self.model`; no second copy of the model code),
so its state dict is ours under `model.` (routers, predictors and calibration included) and every
tool that finds modules by name (PEFT's `q_proj`, `down_proj`, ...) finds Hugging Face's Llama names.

- `forward(input_ids, attention_mask, cache, labels, use_cache, logits_to_keep, ...)` returns
  `CausalLMOutputWithPast`. In training mode it routes as the config trains (`topk`) and with
  `labels` the loss is our training objective: LM loss plus the routers' weighted auxiliary losses
  (`MoDTransformer.forward(targets=...)`). In eval mode it routes causally, each token deciding
  alone, which is what `generate` and evaluation see.
- Padding: our model takes right-padded rows (`valid_lengths`); transformers pads on the left. Each
  call compacts every row's real tokens (`attention_mask` 1) to the front, runs, and puts the logits
  back in the columns transformers expects. Positions count real tokens only, as in `mixdepth.generate`.
- `generate` gets a `MixdepthCache` (`mixdepth.hf.cache`), in which a token that skips a routed layer
  stores nothing and costs only the router's dot product there; the routed fraction per call is
  `generate(..., mixdepth_fraction=0.25)` (or `mixdepth_fraction` in the generation config).

Dimensions: B batch, T tokens of this call, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..generate import fraction_thresholds
from ..model import MoDTransformer
from ..model.layers import Linear, RotaryEmbedding
from .cache import MixdepthCache
from .configuration import MODEL_TYPE, MixdepthConfig

__all__ = ["MODEL_TYPE", "MixdepthConfig", "MixdepthForCausalLM"]


class MixdepthForCausalLM(PreTrainedModel, GenerationMixin):
    """A Mixture-of-Depths LM in the transformers API; see the module docstring."""

    config_class = MixdepthConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    accepts_loss_kwargs = False  # the loss is a mean over the batch; Trainer scales it for accumulation
    _no_split_modules = ["Block", "MoDBlock"]
    _tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MixdepthConfig) -> None:
        super().__init__(config)
        self.model = MoDTransformer(config.model_config)
        self.post_init()

    @classmethod
    def from_model(cls, model: MoDTransformer, **config) -> MixdepthForCausalLM:
        """Wrap a `MoDTransformer` (shared, not copied); `config`: extra `MixdepthConfig` fields."""
        hf_config = MixdepthConfig(mixdepth=model.cfg.to_dict(), **config)
        with torch.device("meta"):
            out = cls(hf_config)
        out.model = model
        out.train(model.training)
        return out

    # ---- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' `from_pretrained`, refusing weights that do not match the config: a routed
        layer whose router or calibration tensor is missing, or routers where the config has none,
        is one `ValueError` (transformers itself would initialise the missing ones at random)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        tied = set(model.all_tied_weights_keys) if hasattr(model, "all_tied_weights_keys") else set()
        missing = sorted(set(info.get("missing_keys", ())) - tied)
        unexpected = sorted(info.get("unexpected_keys", ()))
        mismatched = [k for k, *_ in info.get("mismatched_keys", ())]
        if missing or unexpected or mismatched:
            what = (f"missing weight {missing[0]}" if missing else f"unexpected weight {unexpected[0]}" if unexpected
                    else f"weight {mismatched[0]} has another shape")
            raise ValueError(f"{Path(str(pretrained_model_name_or_path)) / 'model.safetensors'} does not match its "
                             f"config.json ({what}): routing settings and weights must agree")
        model._restore_buffers()
        return (model, info) if want_info else model

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM") -> None:
        """Nothing, as `MixdepthConfig.register_for_auto_class`: the config's `save_pretrained` writes
        the remote-code files (transformers would copy this package's modules, which it cannot)."""

    @torch.no_grad()
    def _restore_buffers(self) -> None:
        """Non-persistent buffers (RoPE tables, a rule router's tokens, MoE targets) are functions of
        the config that transformers leaves empty when it loads on the meta device: recompute them."""
        cfg = self.model.cfg
        for module in self.model.modules():
            if isinstance(module, RotaryEmbedding):
                fresh = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
                module.cos = fresh.cos.to(module.cos.device)
                module.sin = fresh.sin.to(module.sin.device)
            if hasattr(module, "rule_tokens"):
                module.rule_tokens = torch.tensor(module.rc.rule_tokens, dtype=torch.long,
                                                  device=module.rule_tokens.device)
            if hasattr(module, "targets") and hasattr(module, "mc"):
                m = module.mc
                share = (1 - m.noop_fraction) if m.noop else 1.0
                targets = [share / m.n_experts] * m.n_experts + ([m.noop_fraction] if m.noop else [])
                module.targets = torch.tensor(targets, device=module.targets.device)

    def _init_weights(self, module) -> None:
        # `MoDTransformer.__init__` initialises its own weights (trunk first, then routers, so routing
        # variants share a trunk); transformers' generic init would overwrite that. Buffers that
        # loading leaves empty are rebuilt by `_restore_buffers`.
        if isinstance(module, RotaryEmbedding) and not module.cos.is_meta:
            cfg = self.config.model_config
            fresh = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
            module.cos.copy_(fresh.cos)
            module.sin.copy_(fresh.sin)

    # ---- the embedding API PEFT and transformers use ----------------------------------------------
    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value) -> None:
        self.model.lm_head = value

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """transformers' resize, and our config follows (`vocab_size` of the model's `ModelConfig` and
        of `config.mixdepth`, which the standard names are read from), so the new ids are accepted
        and a saved folder loads. A head transformers rebuilt as `nn.Linear` becomes our `Linear`."""
        embeds = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        head = self.model.lm_head
        if type(head) is not Linear:
            with torch.device("meta"):
                ours = Linear(head.in_features, head.out_features, bias=head.bias is not None)
            ours.weight, ours.bias = head.weight, head.bias
            self.model.lm_head = head = ours
        head.out_features = head.weight.shape[0]  # a tied head took the new embedding's weight
        cfg = dataclasses.replace(self.model.cfg, vocab_size=embeds.weight.shape[0])
        self.model.cfg, self.config.mixdepth = cfg, cfg.to_dict()
        return embeds

    # ---- generation -------------------------------------------------------------------------------
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length, *args, **kwargs) -> None:
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(f"cache_implementation {generation_config.cache_implementation!r} is not supported by "
                             "MixdepthForCausalLM: it decodes with its own cache (MixdepthCache)")
        fraction = model_kwargs.pop("mixdepth_fraction", None)
        rule = model_kwargs.pop("mixdepth_fraction_rule", None)
        fraction = getattr(generation_config, "mixdepth_fraction", None) if fraction is None else fraction
        rule = getattr(generation_config, "mixdepth_fraction_rule", None) if rule is None else rule
        if generation_config.use_cache is False:  # each step a full forward, which takes the fraction itself
            asked = {"mixdepth_fraction": fraction, "mixdepth_fraction_rule": rule}
            model_kwargs.update({k: v for k, v in asked.items() if v is not None})
            return
        cache = model_kwargs.get("cache")
        if cache is not None and not isinstance(cache, MixdepthCache) and cache.get_seq_length() > 0:
            raise ValueError(f"MixdepthForCausalLM decodes with a MixdepthCache, got {type(cache).__name__}")
        if not isinstance(cache, MixdepthCache):  # none, or an empty cache of transformers' own
            model_kwargs["cache"] = MixdepthCache(self.model, max_cache_length, fraction=fraction, fraction_rule=rule)
        else:
            cache.use_fraction(fraction, rule)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None,
                                      inputs_embeds=None, is_first_iteration=False, **kwargs):
        if inputs_embeds is not None:
            raise ValueError("MixdepthForCausalLM routes token ids: pass input_ids, not inputs_embeds")
        if next_sequence_length is not None:
            input_ids = input_ids[:, -next_sequence_length:]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache}
        for key in ("use_cache", "logits_to_keep", "mixdepth_fraction", "mixdepth_fraction_rule"):
            if kwargs.get(key) is not None:
                inputs[key] = kwargs[key]
        return inputs

    # ---- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: MixdepthCache | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mixdepth_fraction: float | None = None,
        mixdepth_fraction_rule: str | None = None,
        past_key_values: MixdepthCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Run the model as transformers calls it.

        Args:
            input_ids: (B, T) token ids (this call's new tokens when a cache is given).
            attention_mask: (B, T) or (B, past + T), 1 for real tokens; padding may sit anywhere in
                a row (left padding from `generate`, right padding from collators): it is dropped.
            position_ids: optional: positions count each row's real tokens (as `mixdepth.generate`);
                given ones must agree at the real tokens (packed sequences, restarting, are refused).
            cache: a `MixdepthCache` to continue (`past_key_values` is the older name); eval mode only.
            labels: (B, T) token ids aligned with `input_ids` (-100: ignored); the model shifts them.
            use_cache: True: return a cache (made here when none is given); eval mode only.
            logits_to_keep: 0: logits at every column; n: the last n columns; a 1-D tensor: those columns.
            mixdepth_fraction, mixdepth_fraction_rule: routed fraction of this call (and of a cache
                made here), as `mixdepth.generate.generate`'s `fraction`/`fraction_rule`.
            return_dict: False: the output's fields that are set, as a tuple (loss, logits, cache).
        """
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("MixdepthForCausalLM routes token ids: pass input_ids, not inputs_embeds")
        if output_attentions or output_hidden_states:
            raise ValueError("MixdepthForCausalLM does not return attentions or hidden states")
        cache = cache if cache is not None else past_key_values
        mod = self.model
        B, T = input_ids.shape
        if self.training and cache is not None:
            raise ValueError("a cache is for eval mode (causal routing); training routes top-k over the sequence")
        if self.training:
            mode = "topk" if mod.cfg.routing.mode == "causal" else mod.cfg.routing.mode
        else:
            mode = "causal" if mod.can_decode_causally else mod.cfg.routing.mode
        if cache is not None and not isinstance(cache, MixdepthCache):
            if cache.get_seq_length() > 0:
                raise ValueError(f"MixdepthForCausalLM decodes with a MixdepthCache, got {type(cache).__name__}")
            cache, use_cache = None, True  # an empty cache of transformers' own (a DynamicCache): ours instead
        if cache is None and use_cache and not self.training and mode == "causal":
            cache = MixdepthCache(mod)
        if cache is not None:
            cache.use_fraction(mixdepth_fraction, mixdepth_fraction_rule)  # before it starts, or the same

        # left (or any) padding -> right padding: real tokens first, in order
        mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise ValueError(f"attention_mask must be (batch, columns >= {T}) of 0/1, got "
                                 f"{tuple(attention_mask.shape)}")
            mask = attention_mask[:, -T:].bool()  # this call's columns
            if bool(mask.all()):
                mask = None
        if position_ids is not None:
            started = cache is not None and cache.kv is not None
            real = mask if mask is not None else input_ids.new_ones(B, T, dtype=torch.bool)
            _check_positions(position_ids, real, cache.kv.seq_lengths if started else torch.zeros(B, dtype=torch.long))
        order = valid = None
        ids = input_ids
        if mask is not None:
            order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # (B, T)
            ids = input_ids.gather(1, order)
            valid = mask.sum(1).cpu()
            ids = ids.masked_fill(torch.arange(T, device=ids.device) >= valid.to(ids.device)[:, None], 0)

        kv = thresholds = dial = None
        if cache is not None:
            kv = cache.start(B)
            thresholds = cache.thresholds
        elif mode == "causal" and mixdepth_fraction is not None:
            thresholds, hold = fraction_thresholds(mod, mixdepth_fraction, mixdepth_fraction_rule)
            if hold:
                dial = mod.make_dial(B, mixdepth_fraction)
        targets = None
        if labels is not None:
            lab = labels if order is None else labels.gather(1, order)
            if valid is not None:
                lab = lab.masked_fill(torch.arange(T, device=lab.device) >= valid.to(lab.device)[:, None], -100)
            targets = torch.cat([lab[:, 1:], lab.new_full((B, 1), -100)], dim=1)  # next token at each column
        last_only = isinstance(logits_to_keep, int) and logits_to_keep == 1 and targets is None
        out = mod(ids, targets, mode=mode, cache=kv, thresholds=thresholds, valid_lengths=valid, last_only=last_only,
                  dial=dial)
        if cache is not None:
            cache.columns += T
        logits = out.logits  # (B, T, V), or (B, 1, V) at each row's last real token
        if order is not None and not last_only:
            logits = torch.empty_like(logits).scatter_(1, order[..., None].expand_as(logits), logits)
        if isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep.to(logits.device)]
        elif logits_to_keep and not last_only:
            logits = logits[:, -logits_to_keep:]
        output = CausalLMOutputWithPast(loss=out.loss, logits=logits, cache=cache)
        return output.to_tuple() if return_dict is False else output


def _check_positions(position_ids: torch.Tensor, real: torch.Tensor, held: torch.Tensor) -> None:
    """`position_ids` (B or 1, T) must be the positions the model counts at every real token (`real`,
    (B, T)): each row's real tokens in order, after the `held` (B,) it has in the cache. The model
    cannot follow others (packed rows, whose positions restart)."""
    counted = held.to(real.device)[:, None] + real.long().cumsum(1) - 1  # (B, T)
    agree = position_ids.shape[0] in (1, real.shape[0]) and position_ids.shape[-1] == real.shape[1]
    if not agree or not bool((position_ids.to(real.device).expand_as(counted) == counted)[real].all()):
        raise ValueError("position_ids disagree with the positions MixdepthForCausalLM counts (each row's real "
                         "tokens in order): packed sequences, whose positions restart, are not supported")
