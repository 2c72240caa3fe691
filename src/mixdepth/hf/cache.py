"""transformers' `Cache` interface over our KV cache, so Hugging Face `generate` skips routed blocks.

`MixdepthCache` holds a `mixdepth.kvcache.KVCache` (made by `model.make_cache` at the first call,
when the batch size is known): routed layers store only the tokens that entered their block,
dense layers every real token, each row at its own positions (right padding, `valid_lengths`).
transformers sees one number, `get_seq_length()`: the columns of its (left-padded) `input_ids`
fed so far, which is what its `generate` slices by. Padding columns are never stored, so a row's
positions count its real tokens only, as `mixdepth.generate` counts them.

The routed fraction of a generation is generation state too: `fraction` (with `fraction_rule`)
is set on the cache before it starts (`use_fraction`), never on the model, and reached as
`mixdepth.generate` reaches it (`fraction_thresholds`).

Beam search reorders whole rows (`reorder_cache`), which carry their own fill lengths. What
transformers' layer-list caches offer and this cache does not: cropping (assisted decoding: a
routed layer's rows hold different numbers of tokens), offloading, static shapes for
`torch.compile`; those raise a one-line `ValueError`.
"""

from __future__ import annotations

import torch
from transformers import Cache

from ..generate import fraction_thresholds
from ..kvcache import KVCache


class MixdepthCache(Cache):
    """A `transformers.Cache` backed by `KVCache`; see the module docstring.

    Args:
        model: the `MoDTransformer` it caches for (its `make_cache` builds the buffers), or the
            `MixdepthForCausalLM` around it.
        max_seq_len: tokens per row at most (default: the model's context).
        fraction, fraction_rule: the routed fraction of the generation this cache serves
            (`mixdepth.generate.generate`'s `fraction`/`fraction_rule`); None: the calibrated
            thresholds.
    """

    def __init__(self, model, max_seq_len: int | None = None, *, fraction: float | None = None,
                 fraction_rule: str | None = None) -> None:
        super().__init__(layers=[])
        model = getattr(model, "model", model)  # a MixdepthForCausalLM: the MoDTransformer inside
        self._model = model
        ctx = model.cfg.max_seq_len
        self.max_seq_len = min(int(max_seq_len), ctx) if max_seq_len else ctx
        self.fraction, self.fraction_rule = fraction, fraction_rule
        self.kv: KVCache | None = None
        self.thresholds: dict[int, torch.Tensor] | None = None
        self.columns = 0
        """Columns of transformers' `input_ids` fed so far (padding included): `get_seq_length()`."""
        fraction_thresholds(model, fraction, fraction_rule)  # a bad fraction fails here, before any step

    def start(self, batch_size: int) -> KVCache:
        """The KV cache, made at the first call for `batch_size` rows; later calls must match it."""
        if self.kv is None:
            model = self._model
            self.thresholds, hold = fraction_thresholds(model, self.fraction, self.fraction_rule)
            self.kv = model.make_cache(batch_size, self.max_seq_len, routed_fraction=self.fraction)
            if hold:
                self.kv.set_fraction(None, self.fraction, "hold")
        elif self.kv.batch_size != batch_size:
            raise ValueError(f"the mixdepth cache holds {self.kv.batch_size} rows, the input {batch_size}")
        return self.kv

    def use_fraction(self, fraction: float | None, rule: str | None = None) -> None:
        """Route at `fraction` (by `rule`): set on a cache not yet started; a started cache keeps the
        fraction it started with, and asking it for another is a `ValueError` (nothing changes)."""
        if fraction is None:
            return
        if self.kv is None:
            fraction_thresholds(self._model, fraction, rule)  # a bad fraction fails here
            self.fraction, self.fraction_rule = fraction, rule
        elif fraction != self.fraction or rule not in (None, self.fraction_rule):
            raise ValueError(f"mixdepth_fraction is fixed for a cache when it starts (this one routes at "
                             f"{self.fraction}); start a new cache for {fraction}")

    # ---- what transformers asks of a cache ------------------------------------------------------
    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.columns

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_seq_len

    def __len__(self) -> int:
        return self._model.cfg.n_layers

    @property
    def batch_size(self) -> int:
        return self.kv.batch_size if self.kv is not None else -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.kv is not None

    def reset(self) -> None:
        if self.kv is not None:
            self.kv.reset()  # a held fraction stays held
        self.columns = 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        raise ValueError("MixdepthCache is filled by MixdepthForCausalLM's forward, not by Cache.update")

    # ---- rows: beam search reorders them ----------------------------------------------------------
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i continues what row `beam_idx[i]` held (keys, values, fill lengths, dial)."""
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.kv is not None:
            self._select_rows(torch.arange(self.kv.batch_size).repeat_interleave(repeats))

    def _select_rows(self, idx: torch.Tensor) -> None:
        if self.kv is not None:  # a cache not started has no rows yet
            self.kv.select_rows(idx)  # whole rows, with their fill lengths and dial state

    def crop(self, max_length: int) -> None:
        raise ValueError("cropping the cache (assisted or speculative decoding) is not supported by the mixdepth "
                         "cache: a routed layer's rows hold different numbers of tokens; use greedy, sampling or beams")

    # ---- statistics ------------------------------------------------------------------------------
    def routed_counts(self) -> dict[int, torch.Tensor]:
        """Tokens cached per row for each routed layer (what entered its block)."""
        return self.kv.routed_counts() if self.kv is not None else {}

    def __repr__(self) -> str:
        held = self.kv.seq_lengths.tolist() if self.kv is not None else []
        return f"MixdepthCache(columns={self.columns}, tokens per row={held}, fraction={self.fraction})"
