"""KV cache in which a token that skips a routed layer stores nothing there.

Preallocated buffers written by index (as gpt-fast), with a fill length per batch row per layer
(as nanochat's `cache_seqlens`):
- a dense layer caches every token: slot s of row b holds position s;
- a routed layer caches only the tokens that entered its block, packed in arrival order, with
  their original position ids in `positions` (RoPE is applied before storing, so attention never
  needs them; they are kept for statistics and routing maps). Its buffers start at the expected
  routed fraction of the context and grow when a row needs more.

The cache stores and the attention module attends: `CacheSlot.update` writes a call's keys and
values and returns views of the buffers up to the longest row with the mask each query needs
(`KVRead`); the one attention call lives in `mixdepth.model.layers.Attention`. A batch row that
did not route a token is never copied or gathered.

A cache is generation state: it is made per call (`MoDTransformer.make_cache`) and passed into
`forward`, never kept on the model, so one model can serve several generations at once.

Fill lengths live on the host: the number of tokens that chose a block is known there anyway
(the block's shape depends on it), so no extra device sync is needed.

`StaticCache` is the same cache for static-shape decode steps (`mixdepth.static`): its buffers
have room for a padded batch and one spare slot per row, its fill lengths live on the device, and
a row that does not write (it skipped the block, or it is finished or padding) writes to the spare
slot, which no query reads but its own. So one step has the same shapes and the same kernels
whatever the routing, and needs no host sync: a CUDA graph can replay it.

Dimensions: B batch, N rows that write, G key/value heads, H query heads, S slots, T new tokens,
L slots read, E head width.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .model.dial import DEFAULT_RULE


class LayerKV:
    """One layer's buffers: keys/values (B, G, S, E), fill lengths (B,) on the host."""

    def __init__(self, B: int, G: int, E: int, S: int, dtype, device, routed: bool, max_len: int):
        self.routed, self.max_len = routed, max_len
        self.k = torch.zeros(B, G, S, E, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.positions = torch.full((B, S), -1, dtype=torch.long, device=device) if routed else None
        self.lengths = torch.zeros(B, dtype=torch.long)  # host

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def ensure(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        if not self.routed or needed > self.max_len:
            raise ValueError(f"sequence of {needed} tokens exceeds the cache's max_seq_len ({self.max_len})")
        # grow by a little: one row that routes more than expected should not double every row's buffer
        new = min(self.max_len, math.ceil(needed * 1.125) + 16)
        pad = new - self.capacity
        self.k = F.pad(self.k, (0, 0, 0, pad))
        self.v = F.pad(self.v, (0, 0, 0, pad))
        self.positions = F.pad(self.positions, (0, pad), value=-1)

    def reset(self) -> None:
        self.lengths.zero_()
        if self.positions is not None:
            self.positions.fill_(-1)


class KVRead(NamedTuple):
    """What the attention of one cached call reads: keys and values (B, G, L, E) in place, and
    either `mask` (B, 1, T, L) bool, or `is_causal`, or neither (attend to every slot).

    `rows` (N,) is set when only N of the B batch rows have queries (the block ran for them only):
    attention then runs on all B rows of the cache views, with zero queries for the other rows
    whose results are discarded (copying the cache rows would cost more than that).
    """

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor | None
    is_causal: bool
    rows: torch.Tensor | None


class CacheSlot:
    """One layer's cache as seen by one forward call: where the new keys go and what they see.

    `rows` (N,) are the batch rows whose tokens run the block (None: all rows, in order); the
    attention input then has N rows. `counts` (host, (N,)) is how many of the T new tokens of
    each row are real; the rest are padding, written past the fill length and never attended by
    a real token (they come after every real token of their row).
    """

    def __init__(self, layer: LayerKV, counts: torch.Tensor, rows: torch.Tensor | None, positions,
                 rows_host: torch.Tensor | None = None):
        self.layer, self.counts, self.rows, self.positions = layer, counts, rows, positions
        self.rows_host = rows_host  # the same rows on the host, where the fill lengths live

    def update(self, k: torch.Tensor, v: torch.Tensor) -> KVRead:
        """Store the new keys and values (N, G, T, E) of this call and return what the queries read."""
        layer = self.layer
        N, G, T, E = k.shape
        B = layer.k.shape[0]
        dev = k.device
        rows, rows_host = self.rows, self.rows_host
        subset = rows is not None and N != B
        # (N,) host: the fill lengths before this write
        offsets = layer.lengths.clone() if rows_host is None else layer.lengths[rows_host]
        L = int(offsets.max()) + T
        layer.ensure(L)
        o = int(offsets[0])
        uniform = rows_host is None and bool((offsets == o).all())
        if uniform:  # every row writes at the same slots: plain slice copies
            layer.k[:, :, o : o + T] = k
            layer.v[:, :, o : o + T] = v
            if self.positions is not None:
                layer.positions[:, o : o + T] = self.positions
        else:
            # indices are built on the host (where the fill lengths live) and moved once
            slots = (offsets[:, None] + torch.arange(T)).to(dev, non_blocking=True)  # (N, T)
            r = (torch.arange(B, device=dev) if rows is None else rows)[:, None]  # (N, 1)
            layer.k[r, :, slots] = k.transpose(1, 2)
            layer.v[r, :, slots] = v.transpose(1, 2)
            if self.positions is not None:
                layer.positions[r, slots] = self.positions
        if rows_host is None:
            layer.lengths += self.counts
        else:
            layer.lengths[rows_host] += self.counts
        if subset and N == 1 and T == 1:  # one row decodes: attend to its own slots alone (views, no mask)
            b, n = int(rows_host[0]), int(offsets[0]) + 1
            return KVRead(layer.k[b : b + 1, :, :n], layer.v[b : b + 1, :, :n], None, False, None)
        keys, values = layer.k[:, :, :L], layer.v[:, :, :L]  # (B, G, L, E) views, no copy
        if uniform and T == 1:
            return KVRead(keys, values, None, False, None)
        if uniform and o == 0:
            return KVRead(keys, values, None, True, None)
        # query t of a writing row sees slots <= offset + t; other rows see slot 0 (their queries
        # are zero rows whose output is discarded)
        limit = offsets[:, None] + torch.arange(T)  # (N, T) host
        if subset:
            full = torch.zeros(B, T, dtype=torch.long)
            full[rows_host] = limit
            limit = full
        mask = torch.arange(L, device=dev) <= limit.to(dev, non_blocking=True)[..., None]  # (B, T, L)
        return KVRead(keys, values, mask[:, None], False, rows if subset else None)


class _Accounting:
    """KV bytes and routed counts, from each layer's `k` buffer and host fill lengths."""

    cfg: ModelConfig

    def _host_lengths(self) -> list[torch.Tensor]:
        """Fill lengths per layer, (B,) host long each."""
        raise NotImplementedError

    def _tokens_seen(self) -> int:
        raise NotImplementedError

    def _bytes_per_token(self) -> int:
        k = self.layers[0].k
        return 2 * k.shape[1] * k.shape[3] * k.element_size()

    def bytes_in_use(self) -> int:
        """Bytes of keys/values actually held (sum over layers and rows of fill lengths)."""
        return sum(int(n.sum()) for n in self._host_lengths()) * self._bytes_per_token()

    def bytes_allocated(self) -> int:
        return sum(layer.k.numel() + layer.v.numel() for layer in self.layers) * self.layers[0].k.element_size()

    def dense_bytes(self) -> int:
        """What a dense model of the same size would hold for the same tokens."""
        return self._tokens_seen() * self.cfg.n_layers * self._bytes_per_token()

    def routed_counts(self) -> dict[int, torch.Tensor]:
        """Tokens cached per row, for each routed layer."""
        lengths = self._host_lengths()
        return {i: lengths[i].clone() for i, layer in enumerate(self.layers) if layer.routed}


class KVCache(_Accounting):
    """Per-layer caches of a model for `batch_size` rows; see the module docstring."""

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device,
        routed_fraction: float | None = None,
        dial=None,
    ):
        self.cfg, self.batch_size, self.max_seq_len = cfg, batch_size, max_seq_len
        self.dial = dial  # per-row held routed fractions (`mixdepth.model.dial.Dial`), from make_cache
        frac = cfg.routing.capacity if routed_fraction is None else routed_fraction
        routed = set(cfg.kv_routed_layer_ids)
        routed_slots = min(max_seq_len, math.ceil(max_seq_len * min(1.0, frac * 1.25)) + 16)
        self.layers = [
            LayerKV(
                batch_size, cfg.n_kv_heads, cfg.head_dim, routed_slots if i in routed else max_seq_len,
                dtype, device, i in routed, max_seq_len,
            )
            for i in range(cfg.n_layers)
        ]
        self.seq_lengths = torch.zeros(batch_size, dtype=torch.long)  # host: tokens seen per row
        # each row's last token, for routers that read the token before a token (-1: none yet)
        self.last_ids = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        self._valid: torch.Tensor | None = None

    def reset(self) -> None:
        """Empty every row (the dial's fractions are kept, their states restart)."""
        for layer in self.layers:
            layer.reset()
        self.seq_lengths.zero_()
        self.last_ids.fill_(-1)
        if self.dial is not None:
            fractions = self.dial.fraction.copy()
            for b in range(self.batch_size):
                self.dial.reset_row(b)
            self.dial.fraction[:] = fractions

    # ---- rows, for a server's pool of rows (continuous batching) ----------------------------
    def set_fraction(self, row: int | None, fraction: float | None, rule: str | None = None) -> None:
        """Route row `row` (None: every row) at `fraction` by `rule` (default `dial.DEFAULT_RULE`):
        `hold` keeps the row's routed fraction at it on any text, `threshold` takes the calibration
        table's threshold for it (`mixdepth.model.dial`); None: the calibrated threshold again."""
        if self.dial is None:
            raise ValueError("this cache has no dial: make it with model.make_cache")
        self.dial.set_fraction(row, fraction, DEFAULT_RULE if rule is None else rule)

    def reset_row(self, b: int) -> None:
        """Empty row b for a new sequence (its dial off); the other rows are untouched."""
        for layer in self.layers:
            layer.lengths[b] = 0
            if layer.positions is not None:
                layer.positions[b] = -1
        self.seq_lengths[b] = 0
        self.last_ids[b] = -1
        if self.dial is not None:
            self.dial.reset_row(b)

    def copy_row_from(self, src: KVCache, src_row: int, dst_row: int) -> None:
        """Make row `dst_row` hold what row `src_row` of `src` holds (keys, values, fill lengths, last
        token, dial state), e.g. a prompt prefilled in a cache of its own joining a running batch."""
        if src.cfg is not self.cfg and src.cfg != self.cfg:
            raise ValueError("the source cache belongs to another model")
        n = int(src.seq_lengths[src_row])
        if n > self.max_seq_len:
            raise ValueError(f"row of {n} tokens exceeds the cache's max_seq_len ({self.max_seq_len})")
        for dst, s in zip(self.layers, src.layers):
            m = int(s.lengths[src_row])
            dst.ensure(m)
            dst.k[dst_row, :, :m] = s.k[src_row, :, :m]
            dst.v[dst_row, :, :m] = s.v[src_row, :, :m]
            if dst.positions is not None:
                dst.positions[dst_row] = -1
                dst.positions[dst_row, :m] = s.positions[src_row, :m]
            dst.lengths[dst_row] = m
        self.seq_lengths[dst_row] = n
        self.last_ids[dst_row] = src.last_ids[src_row].to(self.last_ids.device)
        if self.dial is not None and src.dial is not None:
            self.dial.copy_row(src.dial, src_row, dst_row)

    def select_rows(self, idx: torch.Tensor | list[int]) -> None:
        """Make row i hold what row idx[i] held (keys, values, fill lengths, last token, dial); the
        batch size becomes len(idx). Beam search reorders and repeats rows this way; rows move whole,
        since a routed layer's rows hold different numbers of tokens."""
        host = torch.as_tensor(idx, dtype=torch.long).cpu()
        if host.dim() != 1 or host.numel() == 0 or int(host.min()) < 0 or int(host.max()) >= self.batch_size:
            raise ValueError(f"row indices must be a non-empty list in [0, {self.batch_size}), got {host.tolist()}")
        dev = host.to(self.last_ids.device)
        for layer in self.layers:
            layer.k, layer.v = layer.k.index_select(0, dev), layer.v.index_select(0, dev)
            if layer.positions is not None:
                layer.positions = layer.positions.index_select(0, dev)
            layer.lengths = layer.lengths[host]
        self.seq_lengths, self.last_ids, self.batch_size = self.seq_lengths[host], self.last_ids[dev], len(host)
        if self.dial is not None:
            self.dial.select_rows(host.numpy())

    def prefix(self, n: int) -> KVCache:
        """A cache of the first n rows that shares this cache's buffers, e.g. a server's decode step
        over its busy rows when they are the pool's first n (the idle rows cost nothing then). After
        the step, `merge_prefix(view)` takes back what the view replaced (a grown buffer, the dial)."""
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"a prefix of {n} rows of a cache of {self.batch_size}")
        view = object.__new__(KVCache)
        view.cfg, view.batch_size, view.max_seq_len = self.cfg, n, self.max_seq_len
        view.layers = []
        for layer in self.layers:
            lv = object.__new__(LayerKV)
            lv.routed, lv.max_len = layer.routed, layer.max_len
            lv.k, lv.v, lv.lengths = layer.k[:n], layer.v[:n], layer.lengths[:n]
            lv.positions = layer.positions[:n] if layer.positions is not None else None
            view.layers.append(lv)
        view.seq_lengths, view.last_ids = self.seq_lengths[:n], self.last_ids[:n]
        view.dial = self.dial.prefix(n) if self.dial is not None else None
        view._valid = None
        return view

    def merge_prefix(self, view: KVCache) -> None:
        """Take back the state of a `prefix` view after a step (buffers it grew, fill lengths, the
        last tokens, the dial)."""
        n = view.batch_size
        for layer, lv in zip(self.layers, view.layers):
            if lv.capacity > layer.capacity:  # the view grew its own buffers: grow ours and copy the rows
                layer.ensure(lv.capacity)
            if lv.k.data_ptr() != layer.k.data_ptr() or lv.capacity != layer.capacity:
                m = lv.capacity
                layer.k[:n, :, :m], layer.v[:n, :, :m] = lv.k, lv.v
                if layer.positions is not None:
                    layer.positions[:n, :m] = lv.positions
            layer.lengths[:n] = lv.lengths
        self.seq_lengths[:n] = view.seq_lengths
        self.last_ids[:n] = view.last_ids.to(self.last_ids.device)
        if self.dial is not None:
            self.dial.merge_prefix(view.dial)

    def fill_state(self) -> list[torch.Tensor]:
        """The fill lengths of every layer and row (host tensors), for `restore_fill`."""
        return [layer.lengths.clone() for layer in self.layers] + [self.last_ids.clone(), self.seq_lengths.clone()]

    def restore_fill(self, state: list[torch.Tensor]) -> None:
        """Roll the cache back to an earlier `fill_state()`, e.g. to decode again from the same prompt.

        Entries written since are left in place but lie past the fill lengths, where attention never
        reads (a slot is only read up to its row's fill length).
        """
        for layer, lengths in zip(self.layers, state):
            layer.lengths.copy_(lengths)
        self.last_ids = state[-2].clone()
        self.seq_lengths.copy_(state[-1])

    # ---- used by the model's forward ----------------------------------------------------------
    def begin(self, valid_counts: torch.Tensor) -> None:
        self._valid = valid_counts.to(torch.long).cpu()

    def end(self) -> None:
        self.seq_lengths += self._valid
        self._valid = None

    def dense_slot(self, layer_id: int) -> CacheSlot:
        return CacheSlot(self.layers[layer_id], self._valid, None, None)

    def routed_slot(self, layer_id: int, counts: torch.Tensor, positions: torch.Tensor, *,
                    rows: torch.Tensor | None = None, rows_host: torch.Tensor | None = None) -> CacheSlot:
        """Slot for the rows `rows` (None: all rows) of a routed layer, each writing `counts[i]` real
        tokens (host, (N,)) whose original positions are `positions` (N, K)."""
        return CacheSlot(self.layers[layer_id], counts, rows, positions, rows_host)

    # ---- accounting ---------------------------------------------------------------------------
    def _host_lengths(self) -> list[torch.Tensor]:
        return [layer.lengths for layer in self.layers]

    def _tokens_seen(self) -> int:
        return int(self.seq_lengths.sum())


class StaticSlot:
    """One layer's static cache as one decode step sees it: rows with `write` (B,) bool store
    their new key and value at their fill length, the others at the spare slot (the last)."""

    def __init__(self, layer: StaticLayerKV, write: torch.Tensor):
        self.layer, self.write = layer, write

    def update(self, k: torch.Tensor, v: torch.Tensor) -> KVRead:
        """Store one token's keys and values (B, G, 1, E) per row; every row reads every slot (S + 1)
        under a mask: its filled slots, and the spare one for a row that wrote there (so a row
        with an empty cache reads something, and its discarded output is finite)."""
        layer, write = self.layer, self.write
        B, spare = k.shape[0], layer.spare
        rows = torch.arange(B, device=k.device)
        slot = torch.where(write, layer.lengths, spare)  # (B,)
        layer.k[rows, :, slot] = k[:, :, 0]  # (B, G, E) into (B, G, S + 1, E)
        layer.v[rows, :, slot] = v[:, :, 0]
        layer.lengths.add_(write.long())
        at = torch.arange(spare + 1, device=k.device)
        mask = (at < layer.lengths[:, None]) | ((at == spare) & ~write[:, None])  # (B, S + 1)
        return KVRead(layer.k, layer.v, mask[:, None, None], False, None)


class StaticLayerKV:
    """One layer's static buffers: keys/values (B, G, S + 1, E), fill lengths (B,) on the device."""

    def __init__(self, B: int, G: int, E: int, S: int, dtype, device, routed: bool):
        self.routed = routed
        self.k = torch.zeros(B, G, S + 1, E, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.lengths = torch.zeros(B, dtype=torch.long, device=device)

    @property
    def spare(self) -> int:
        """Index of the spare slot; slots below it hold tokens."""
        return self.k.shape[2] - 1

    def resize(self, S: int) -> None:
        """Reallocate with S token slots (+1 spare), keeping the filled ones (out of a step only)."""
        keep = min(S, self.spare)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], old.shape[1], S + 1, old.shape[3])
            new[:, :, :keep] = old[:, :, :keep]
            setattr(self, name, new)


class StaticCache(_Accounting):
    """A KV cache for static-shape decode steps (`mixdepth.static`); see the module docstring.

    Made from a prefilled `KVCache` (`load`), for `batch_size` >= its rows (the rest are padding,
    never active). Dense layers hold `max_seq_len` slots; a routed layer holds what its rows cached
    plus `headroom` slots, and `reserve` grows it (outside a step) when a row could outrun them.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_seq_len: int, routed_slots: int, dtype, device):
        self.cfg, self.batch_size, self.max_seq_len = cfg, batch_size, max_seq_len
        routed = set(cfg.kv_routed_layer_ids)
        self.layers = [
            StaticLayerKV(batch_size, cfg.n_kv_heads, cfg.head_dim, min(routed_slots, max_seq_len)
                          if i in routed else max_seq_len, dtype, device, i in routed)
            for i in range(cfg.n_layers)
        ]
        self.seq_lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) device
        self.slack = 0
        """Decode steps that surely fit every routed layer's buffers (a host-side bound: a step
        adds at most one token per row)."""

    def static_slot(self, layer_id: int, write: torch.Tensor) -> StaticSlot:
        return StaticSlot(self.layers[layer_id], write)

    def load(self, cache: KVCache, headroom: int) -> None:
        """Copy a prefilled cache's rows in (the others are emptied) and size the routed layers to
        hold what they cached plus `headroom` tokens per row (a step never reallocates)."""
        B = cache.batch_size
        if B > self.batch_size or cache.max_seq_len > self.max_seq_len:
            raise ValueError(f"a cache of {B} rows x {cache.max_seq_len} tokens does not fit a static cache of "
                             f"{self.batch_size} x {self.max_seq_len}")
        most = max([int(src.lengths.max()) for src in cache.layers if src.routed] or [0])
        need = min(self.max_seq_len, most + headroom)
        for src, dst in zip(cache.layers, self.layers):
            # a buffer much larger than needed is read in full by every step: shrink it too
            if dst.routed and (dst.spare < need or dst.spare > 2 * need):
                dst.resize(need)
            n = min(src.capacity, dst.spare)
            dst.k[:B, :, :n] = src.k[:, :, :n]
            dst.v[:B, :, :n] = src.v[:, :, :n]
            dst.lengths.zero_()
            dst.lengths[:B] = src.lengths.to(dst.lengths.device)
        self.seq_lengths.zero_()
        self.seq_lengths[:B] = cache.seq_lengths.to(self.seq_lengths.device)
        self.slack = min(layer.spare for layer in self.layers) - most

    def reserve(self, headroom: int) -> bool:
        """Make sure the next step fits: when the host-side bound runs out, read the fill lengths
        (one sync) and grow the routed layers that need it by `headroom` (or by half). Returns whether buffers
        were reallocated (a captured CUDA graph of the step must then be captured again)."""
        if self.slack >= 1:
            return False
        routed = [layer for layer in self.layers if layer.routed]
        if not routed:
            self.slack = self.max_seq_len
            return False
        most = torch.stack([layer.lengths for layer in routed]).amax(1).tolist()  # one host sync
        grown = False
        for layer, m in zip(routed, most):
            # grown before it is full, so the next sync is a quarter of `headroom` steps away at least
            if layer.spare - m < max(1, headroom // 4) and layer.spare < self.max_seq_len:
                # by half at least: each new size means a new compiled or captured step
                layer.resize(min(self.max_seq_len, max(m + headroom, layer.spare + layer.spare // 2)))
                grown = True
        # a layer at max_seq_len cannot overflow: a row never holds more tokens than that
        self.slack = max(1, min([layer.spare - m for layer, m in zip(routed, most)] or [1]))
        return grown

    def step_taken(self) -> None:
        self.slack -= 1

    # ---- accounting ---------------------------------------------------------------------------
    def _host_lengths(self) -> list[torch.Tensor]:
        return [layer.lengths.cpu() for layer in self.layers]

    def _tokens_seen(self) -> int:
        return int(self.seq_lengths.sum())
