"""The Mixture-of-Depths language model: embeddings, a stack of dense and routed blocks, LM head.

`MoDTransformer.forward` returns a `ModelOutput` with the logits, the total training loss (LM
loss plus the weighted router losses), each loss on its own, and routing statistics per routed
layer. Routed layers follow `mixdepth.model.mod`; dense layers are plain Llama blocks.

Dimensions: B batch, T tokens, D model width, V vocabulary, R routed layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MODES, ModelConfig
from ..kvcache import KVCache
from .dial import Dial
from .layers import Block, Linear, RMSNorm, RotaryEmbedding
from .mod import N_FRACTIONS, MoDBlock
from .moe import MoE


@dataclass
class ModelOutput:
    logits: torch.Tensor
    """(B, T, V) logits (or (B, 1, V) with `last_only`)."""
    loss: torch.Tensor | None = None
    """Training objective: lm_loss + the weighted sum of `losses`."""
    lm_loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    """Auxiliary losses by name (e.g. the router BCE `aux_loss`, the predictor's `predictor_loss`,
    token choice's `balance_loss`), each the mean over the routed layers that have it, unweighted."""
    loss_weights: dict[str, float] = field(default_factory=dict)
    """The weight of each term of `losses` in `loss`."""
    routed_frac: torch.Tensor | None = None
    """(R,) fraction of tokens that entered each routed layer's block."""
    causal_acc: torch.Tensor | None = None
    """(R,) agreement of the causal decision with top-k membership, per routed layer."""
    routing: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer id -> (B, T) bool, which tokens entered the block (with `return_routing`)."""
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer id -> (B, T) causal scores (with `return_scores`)."""


class MoDTransformer(nn.Module):
    """Decoder-only LM with Mixture-of-Depths routing; module names follow HF's Llama."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # building draws from the RNG (default inits, overwritten below) as much as the routing asks;
        # initialise from the RNG as it was before, so routing variants share their trunk's init
        rng = torch.random.get_rng_state()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(
            MoDBlock(cfg, i) if cfg.routing.is_routed(i, cfg.n_layers) else Block(cfg, i)
            for i in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        # weight of each named auxiliary loss, as the routers declare them (fixed at construction)
        self.loss_weights = {name: w for layer in self.routed_layers for name, w in layer.router.loss_weights.items()}
        self.moe_layers = [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]
        # routers that read the token before each token (the `rule` router): fixed at construction
        self.needs_ids = any(layer.router.needs_ids for layer in self.routed_layers)
        if self.moe_layers:
            self.loss_weights["expert_balance_loss"] = cfg.moe.balance_loss_weight
        torch.random.set_rng_state(rng)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every weight: the trunk first, then the routers and predictors, so that models
        that differ only in routing draw the same trunk from the same seed (paired comparisons)."""
        modules = list(self.named_modules())
        for routing in (False, True):
            for name, m in modules:
                if (".router" in name or ".predictor" in name) == routing:
                    self._init_module(name, m)

    def _init_module(self, name: str, m: nn.Module) -> None:
        std = self.cfg.init_std
        if isinstance(m, MoE):  # its expert weights live in a ParameterDict
            m.reset_parameters()
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            out_std = std / math.sqrt(2 * self.cfg.n_layers)
            nn.init.normal_(m.weight, std=out_std if name.endswith(("o_proj", "down_proj")) else std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
        elif hasattr(m, "reset_parameters") and m is not self and not list(m.children()):
            m.reset_parameters()

    def materialize(self, device: str | torch.device = "cpu") -> None:
        """Finish a model built on the meta device whose pretrained weights were assigned
        (`load_state_dict(..., assign=True)`): create on `device`, freshly initialised, what the
        weights did not hold (routers, predictors, calibration buffers), rebuild the RoPE table and
        re-tie the embeddings. So a converted model holds one copy of its weights, never two.
        """
        cfg = self.cfg
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling).to(device)
        if cfg.tie_embeddings:  # assign=True replaced embed_tokens' parameter object
            self.lm_head.weight = self.embed_tokens.weight
        for layer in self.routed_layers:
            if layer.causal_threshold.is_meta or layer.threshold_table.is_meta:
                layer.reset_calibration(device)
            for name, m in layer.named_modules(prefix=f"layers.{layer.layer_id}"):
                if any(t.is_meta for t in m.parameters(recurse=False)):
                    m.to_empty(device=device, recurse=False)
                    self._init_module(name, m)
        left = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if left:
            raise ValueError(f"weight {left[0]} was not loaded")

    @property
    def routed_layers(self) -> list[MoDBlock]:
        return [layer for layer in self.layers if layer.routed]

    @property
    def can_decode_causally(self) -> bool:
        """False for routers with no causal rule (random); `generate` refuses those."""
        return all(layer.router.can_decode_causally for layer in self.routed_layers)

    # ---- generation state ---------------------------------------------------------------------
    def make_cache(self, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None,
                   routed_fraction: float | None = None) -> KVCache:
        """A new KV cache for `batch_size` rows, to pass into `forward` (the model keeps no cache).

        `routed_fraction` sizes the routed layers' buffers (default: the capacity); they grow if needed.
        """
        p = self.embed_tokens.weight
        return KVCache(self.cfg, batch_size, max_seq_len or self.cfg.max_seq_len, dtype or p.dtype,
                       device or p.device, routed_fraction, dial=self.make_dial(batch_size))

    def make_dial(self, batch_size: int, fraction: float | None = None) -> Dial:
        """Per-row routed fractions held by the `hold` rule (`mixdepth.model.dial`), every row at
        `fraction` (None: no row uses it until `Dial.set_fraction`). A `KVCache` keeps one
        (`KVCache.set_fraction`); pass one to `forward(dial=...)` to use it without a cache."""
        dial = Dial.for_model(self, batch_size)
        if fraction is not None:
            dial.set_fraction(None, fraction)
        return dial

    @property
    def calibrated(self) -> bool:
        """Whether every routed layer has a calibration table (uncalibrated layers route every token)."""
        return all(layer.calibrated for layer in self.routed_layers)

    def causal_thresholds(self, fraction: float) -> dict[int, torch.Tensor]:
        """Per routed layer, the causal threshold that routes `fraction` of the calibration tokens.

        Pass it to `forward(thresholds=...)` to run at another operating point for one call, without
        changing the calibrated thresholds (so concurrent generations can differ).
        """
        return {layer.layer_id: layer.threshold_for(fraction) for layer in self.routed_layers}

    # ---- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        mode: str | None = None,
        cache: KVCache | None = None,
        input_pos: torch.Tensor | None = None,
        thresholds: dict[int, torch.Tensor] | None = None,
        valid_lengths: torch.Tensor | None = None,
        last_only: bool = False,
        return_routing: bool = False,
        return_scores: bool = False,
        calibrate: float | None = None,
        relax: float | None = None,
        dial: Dial | None = None,
    ) -> ModelOutput:
        """Run the model.

        Args:
            input_ids: (B, T) token ids.
            targets: (B, T) next-token ids (-100 to ignore); gives `loss` and `lm_loss`.
            mode: `topk`, `causal` or `dense`; defaults to the config's `routing.mode`.
            cache: a KV cache (`make_cache`) to run against: the tokens continue what it holds,
                and their keys and values are added to it (causal or dense mode only).
            input_pos: (B,) host tensor of each row's start position in the cache; optional (the
                cache knows), and when given it must equal the tokens the cache already holds.
            thresholds: routed layer id -> causal threshold, overriding the calibrated ones for
                this call only (`causal_thresholds(fraction)`).
            valid_lengths: (B,) host tensor, real tokens per row (the rest right padding).
            last_only: return logits only at each row's last real token, (B, 1, V).
            return_routing: fill `routing` with the per-layer chosen masks.
            return_scores: fill `scores` with the per-layer causal scores.
            calibrate: causal mode, no cache: each routed layer first sets its thresholds from this
                call's scores to route this fraction (`MoDBlock.calibrate`), in layer order, so each
                is calibrated under the decisions of the ones before it (`calibrate_causal`).
            relax: router training of a frozen model (`mixdepth tune`), no cache: every token runs
                each routed unit, kept where its causal score is in the top `relax` fraction of the
                call's tokens, by a hard gate with a sigmoid's gradient (`MoDBlock._forward_relaxed`).
            dial: causal mode without a cache: rows held at a routed fraction by the `hold` rule
                (`make_dial`; a cache brings its own, `KVCache.set_fraction`). It is advanced by the
                call, so a fresh one per sequence.
        """
        cfg = self.cfg
        mode = mode or cfg.routing.mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if calibrate is not None and (mode != "causal" or cache is not None or thresholds or relax is not None):
            raise ValueError("calibrate runs in causal mode without a cache, threshold overrides or relax")
        if calibrate is not None and not 0 <= calibrate <= 1:
            raise ValueError(f"calibrate is a routed fraction in [0, 1], got {calibrate}")
        if dial is not None and (cache is not None or mode != "causal"):
            raise ValueError("dial holds routed fractions in causal mode without a cache (a cache has its own)")
        if relax is not None and (cache is not None or not 0 <= relax <= 1):
            raise ValueError(f"relax is a routed fraction in [0, 1] for a forward without a cache, got {relax}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T == 0:
            raise ValueError("input_ids is empty")
        out_of_range = (input_ids < 0) | (input_ids >= cfg.vocab_size)
        if out_of_range.any():  # one host sync; an embedding lookup would fail with a deep traceback
            bad = int(input_ids[out_of_range][0])
            raise ValueError(f"token id {bad} out of range for vocab_size {cfg.vocab_size}")
        dev = input_ids.device
        valid = None
        if valid_lengths is not None:
            valid_lengths = torch.as_tensor(valid_lengths, dtype=torch.long).cpu()
            valid = torch.arange(T, device=dev) < valid_lengths.to(dev)[:, None]  # (B, T)
        if input_pos is not None and cache is None:
            raise ValueError("forward got input_pos but no KV cache: pass cache=model.make_cache(...)")
        if cache is not None:
            if mode == "topk":
                raise ValueError("topk routing reads future tokens and cannot decode with a KV cache; use causal")
            if cache.batch_size != B:
                raise ValueError(f"the KV cache holds {cache.batch_size} rows, the input {B}")
            if input_pos is None:
                input_pos = cache.seq_lengths.clone()
            input_pos = torch.as_tensor(input_pos, dtype=torch.long).cpu()
            if input_pos.shape != (cache.batch_size,) or not torch.equal(input_pos, cache.seq_lengths):
                raise ValueError(
                    f"input_pos {input_pos.tolist()} does not match the tokens in the cache "
                    f"{cache.seq_lengths.tolist()} (cache.reset() to start over)"
                )
            end = int((input_pos + T).max())
            if end > cache.max_seq_len:
                raise ValueError(f"sequence of {end} tokens exceeds the cache's max_seq_len ({cache.max_seq_len})")
            position_ids = input_pos.to(dev)[:, None] + torch.arange(T, device=dev)  # (B, T)
            cache.begin(valid_lengths if valid_lengths is not None else torch.full((B,), T))
            dial = cache.dial
        else:
            if T > cfg.max_seq_len:
                window = ", the source model's sliding window" if cfg.sliding_window else ""
                raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len ({cfg.max_seq_len}{window})")
            position_ids = torch.arange(T, device=dev)[None]  # (1, T)

        prev_ids = self._prev_ids(input_ids, cache) if self.needs_ids else None
        x = self.embed_tokens(input_ids)  # (B, T, D)
        for moe in self.moe_layers:  # a staged-MoDE block that no token entered leaves none
            moe.losses = {}
        infos: list[tuple[int, dict]] = []
        for layer in self.layers:
            if layer.routed:
                x, info = layer(x, self.rope, position_ids, mode=mode, cache=cache, valid=valid,
                                want_scores=return_scores, calibrate=calibrate, relax=relax, prev_ids=prev_ids,
                                threshold=thresholds.get(layer.layer_id) if thresholds else None, dial=dial)
                infos.append((layer.layer_id, info))
            else:
                x, _ = layer(x, self.rope, position_ids, cache=cache)
        if cache is not None:
            if self.needs_ids:  # the token before the next call's first token, per row
                ends = (valid_lengths if valid_lengths is not None else torch.full((B,), T)).to(dev)
                last = input_ids.gather(1, (ends - 1).clamp(min=0)[:, None])[:, 0]
                cache.last_ids = torch.where(ends > 0, last, cache.last_ids.to(dev))
            cache.end()
        x = self.norm(x)
        if last_only:
            last = (valid_lengths - 1 if valid_lengths is not None else torch.full((B,), T - 1)).to(dev)
            x = x[torch.arange(B, device=dev), last][:, None]  # (B, 1, D)
        logits = self.lm_head(x)  # (B, T, V)
        out = ModelOutput(logits=logits)
        self._collect(out, infos, return_routing, return_scores)
        if targets is not None:
            out.lm_loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                                          ignore_index=-100)
            loss = out.lm_loss
            for name, value in out.losses.items():
                loss = loss + out.loss_weights[name] * value
            out.loss = loss
        return out

    @staticmethod
    def _prev_ids(input_ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """(B, T): the token before each token; -1 before a sequence's first (or the cache's last)."""
        B = input_ids.shape[0]
        first = torch.full((B, 1), -1, dtype=input_ids.dtype, device=input_ids.device)
        if cache is not None:
            first = cache.last_ids.to(input_ids.device, input_ids.dtype)[:, None]
        return torch.cat([first, input_ids[:, :-1]], dim=1)

    def _collect(self, out: ModelOutput, infos, return_routing: bool, return_scores: bool) -> None:
        def gather(key):
            return [info[key] for _, info in infos if key in info]

        terms: dict[str, list[torch.Tensor]] = {}
        for losses in [info["losses"] for _, info in infos] + [moe.losses for moe in self.moe_layers]:
            for name, value in losses.items():
                terms.setdefault(name, []).append(value)
        out.losses = {name: torch.stack(vs).mean() for name, vs in terms.items()}
        out.loss_weights = {name: self.loss_weights[name] for name in out.losses}
        fr = gather("frac")
        out.routed_frac = torch.stack(fr).detach() if fr else None
        acc = gather("causal_acc")
        out.causal_acc = torch.stack(acc).detach() if acc and len(acc) == len(infos) else None
        if return_routing:
            out.routing = {i: info["chosen"] for i, info in infos}
        if return_scores:
            out.scores = {i: info["score"] for i, info in infos if "score" in info}

    # ---- calibration of the causal decision --------------------------------------------------
    @torch.no_grad()
    def calibrate_causal(self, input_ids: torch.Tensor, fraction: float | None = None,
                         dial: list[float] | None = None) -> list[float]:
        """Set each routed layer's causal threshold so that `fraction` (default: the capacity) of
        the tokens of `input_ids` enter its block when decoding causally.

        Layers are calibrated in order, each under the already calibrated layers before it, since
        an earlier layer's decisions change what a later layer sees: one causal forward in which
        each layer calibrates itself as its input arrives. Each threshold lies between two distinct
        calibration scores (`mod.thresholds_for_fractions`), as near the fraction as ties allow. A
        table of thresholds per fraction is kept in the `threshold_table` buffers (saved with the
        weights), so `set_causal_fraction` and `causal_thresholds` can later move the operating
        point without data.

        With `dial` (a list of fractions), one such pass runs per fraction of the dial, and each
        entry of the table comes from the pass nearest its fraction: a later layer's inputs depend
        on how much the earlier layers route, so a table from one pass drifts at fractions far
        from it. `causal_thresholds(f)` then routes f as measured on these tokens.

        Returns the thresholds, one per routed layer.
        """
        fraction = self.cfg.routing.capacity if fraction is None else fraction
        points = sorted({float(f) for f in (dial or [])})
        for f in [fraction, *points]:
            if not 0 <= f <= 1:
                raise ValueError(f"routed fraction must be in [0, 1], got {f}")
        if not self.routed_layers:
            return []
        if points:
            tables = []
            for f in points:
                self(input_ids, mode="causal", calibrate=f)
                tables.append(torch.stack([layer.threshold_table.clone() for layer in self.routed_layers]))
            grid = torch.linspace(0, 1, N_FRACTIONS)
            nearest = (grid[:, None] - torch.tensor(points)[None]).abs().argmin(1)  # (N_FRACTIONS,)
            stacked = torch.stack(tables)  # (P, R, N_FRACTIONS)
            table = stacked.gather(0, nearest.to(stacked.device)[None, None].expand(1, *stacked.shape[1:]))[0]
            for layer, row in zip(self.routed_layers, table):
                layer.threshold_table.copy_(row)
                layer.set_causal_fraction(fraction)
        else:
            self(input_ids, mode="causal", calibrate=fraction)
        return [float(layer.causal_threshold) for layer in self.routed_layers]

    @torch.no_grad()
    def calibrate_noop(self, input_ids: torch.Tensor, fraction: float | None = None) -> list[float]:
        """Integrated MoDE: set each MoE layer's no-op bias so that `fraction` (default:
        `moe.noop_fraction`) of the tokens of `input_ids` skip its MLP; layers in order, each under
        the ones before it. Returns the biases."""
        fraction = self.cfg.moe.noop_fraction if fraction is None else fraction
        biases = []
        for moe in self.moe_layers:
            seen = []
            handle = moe.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0]))
            try:
                self(input_ids, mode="causal")
            finally:
                handle.remove()
            biases.append(moe.set_noop_share(seen[0], fraction))
        return biases

    def set_causal_fraction(self, fraction: float) -> None:
        """Move every routed layer's causal threshold to route `fraction` of the tokens."""
        for layer in self.routed_layers:
            layer.set_causal_fraction(fraction)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embed_tokens.weight.numel()
        return n
