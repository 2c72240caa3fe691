"""Routers of a Mixture-of-Depths layer: each owns its behaviour (paper sections 3.1-3.5).

A router maps the residual stream entering a block to one score per token, `r` (B, T), in fp32,
and owns everything that depends on its kind:
- `gate(r)`: the scale of the block output (x' = x + gate(r) * f(x)), which puts the router on
  the gradient path;
- `select(r, k)`: which tokens enter the block in `topk` mode (training);
- `causal_score(x, r)`: a per-token score from the token's own prefix, thresholded for sampling;
- `topk_terms(x, r, chosen)`: its auxiliary losses, as named terms weighted by `loss_weights`;
- `param_counts(cfg)`, `flops_per_token(cfg, mode)`: its analytic cost, read by `mixdepth.flops`.

The kinds:
- `ExpertChoiceRouter` (the MoD default): r = w.x; the block takes the top-k of r per sequence.
  Its causal decision is a `Predictor` (a small MLP on stop-gradient inputs) or, with
  `causal_method="aux_loss"`, r itself trained towards top-k membership by a BCE loss.
- `TokenChoiceRouter`: two logits per token (skip, block); r = l_block - l_skip, so
  sigmoid(r) = softmax(l)[block]; a token asks for the block iff r > 0; at most k get it.
- `RandomRouter`: no parameters; k uniformly random tokens (the paper's ablation, fig. 5).
- `RandomTokenRouter`: the same with a causal rule (a uniform score per token against a threshold).
- `FrozenRouter`: expert choice whose router weight keeps its random initialisation (a control:
  selects by content, learns nothing); gate 1.
- `RuleRouter`: no parameters; the tokens right after a `rule_tokens` token (whitespace), the first
  k in sequence order, filled up to k with the earliest others; its causal rule is the same test
  (a token enters iff the token before it is whitespace); gate 1. Reads the token ids (`needs_ids`).

A new router is one new class, decorated with `@register_router("name")`; `make_router` is the
only place that reads the router's name.

Dimensions: B batch, T tokens, K gathered tokens, D model width.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ROUTERS, ModelConfig
from .layers import Linear


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores per row, in ascending (original) order. (B, T) -> (B, k).

    Sorting keeps the chosen tokens in sequence order, so causal attention among them is causal
    in the original order. Exact ties are resolved by `torch.topk`, which is deterministic for a
    given device and input.
    """
    if k >= scores.shape[1]:
        return torch.arange(scores.shape[1], device=scores.device).expand(scores.shape[0], -1)
    idx = scores.topk(k, dim=1, sorted=False).indices
    return idx.sort(dim=1).values


def chosen_first(chosen: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order tokens chosen-first, each group in sequence order, and keep the first K.

    Returns indices (B, K) and validity (B, K). Because the valid tokens come first and in order,
    plain causal attention over the gathered tokens never lets a valid token see a padding one.
    """
    B, T = chosen.shape
    key = (~chosen).long() * T + torch.arange(T, device=chosen.device)  # (B, T)
    idx = key.topk(K, dim=1, largest=False, sorted=True).indices  # (B, K)
    return idx, chosen.gather(1, idx)


def balance_loss(r: torch.Tensor, capacity: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style balancing loss for two choices (block, skip) with target fractions (C, 1-C).

    sum_i f_i * P_i / target_i, where f_i is the fraction of tokens choosing i (no gradient) and
    P_i the mean probability of i; it equals 1 when both match their targets.
    """
    p = torch.sigmoid(r)
    wants = (r > 0).float()
    if valid is not None:
        p, wants = p[valid], wants[valid]
    f_block, p_block = wants.mean(), p.mean()
    loss = f_block * p_block / capacity
    if capacity < 1:
        loss = loss + (1 - f_block) * (1 - p_block) / (1 - capacity)
    return loss


class Predictor(nn.Module):
    """Two-layer MLP (D -> D/8 -> 1) predicting top-k membership from the detached residual.

    The input is detached, so its BCE loss trains only the predictor and never the trunk or the
    router: the language-model loss is untouched (paper section 3.5, second method).
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden, bias=True)
        self.fc2 = Linear(hidden, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x.detach()))).squeeze(-1).float()  # (B, T)


class Router(nn.Module):
    """Base of the routers: the defaults are those of a learned scalar score per token.

    Modules a router needs besides its own weights (the predictor) are listed in `companions`;
    the block registers them under those names, so state-dict keys stay
    `layers.{i}.router.weight` and `layers.{i}.predictor.*`.
    """

    can_decode_causally: ClassVar[bool] = True
    """False for routers with no per-token causal rule (random): they cannot sample."""
    needs_ids: ClassVar[bool] = False
    """True for routers that read the token before each token (`prev_ids`) besides the residual stream."""
    loss_weights: dict[str, float]
    """Weight of each named auxiliary loss in the training objective."""

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        self.rc = cfg.routing if cfg is not None else None
        self.companions: dict[str, nn.Module] = {}
        self.loss_weights = {}

    # ---- behaviour ----------------------------------------------------------------------------
    def gate(self, r: torch.Tensor) -> torch.Tensor:
        """Scale of the block output from the router scores r (any shape)."""
        if self.rc.gate == "sigmoid":
            return torch.sigmoid(r)
        if self.rc.gate == "straight_through":
            return 1.0 + (r - r.detach())  # value 1, gradient of r
        if self.rc.gate == "sigmoid_st":
            s = torch.sigmoid(r)
            return 1.0 + (s - s.detach())  # value 1, gradient of sigmoid(r)
        return r

    def select(self, r: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`topk` mode: indices (B, k) of the tokens that enter the block, in sequence order, and
        their validity (B, k) bool, or None when all k are real."""
        return topk_indices(r, k), None

    def causal_score(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Per-token score from information at or before that token only. (B, T) fp32."""
        return r

    def topk_terms(self, x: torch.Tensor, r: torch.Tensor, chosen: torch.Tensor
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """What a `topk` forward adds: the unweighted auxiliary losses by name, and the causal score
        (detached, for statistics; None without a causal rule). `chosen` (B, T) float: top-k membership."""
        return {}, self.causal_score(x, r).detach() if self.can_decode_causally else None

    # ---- analytic cost (config-driven, for mixdepth.flops) --------------------------------------
    @classmethod
    def param_counts(cls, cfg: ModelConfig) -> dict[str, int]:
        """Parameters of one routed layer's router parts, by name."""
        return {"routers": 0, "predictors": 0}

    @classmethod
    def flops_per_token(cls, cfg: ModelConfig, mode: str) -> float:
        """Forward matmul FLOPs per token (every token of the sequence) of the router parts."""
        return 0.0

    @classmethod
    def untrained_flops_per_token(cls, cfg: ModelConfig) -> float:
        """FLOPs per token that 3x the forward counts but a training step never spends (gradients
        of detached inputs)."""
        return 0.0


class LinearRouter(Router):
    """Logits `w.x` per token from one linear map, weight (n_logits, D) at `layers.{i}.router.weight`.

    Its input is the residual stream entering the block, detached when `routing.router_detach` says
    so (the value-1 gates) and RMS-normalised with `routing.router_norm`.
    """

    n_logits: ClassVar[int] = 1

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.weight = nn.Parameter(torch.empty(self.n_logits, cfg.dim))
        self.init_std = self.rc.router_init_std
        self.eps = cfg.norm_eps
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def router_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the router weight reads: x, detached and/or RMS-normalised as configured. (B, T, D)"""
        if self.rc.detach_router_input:
            x = x.detach()
        if self.rc.router_norm:
            xf = x.float()
            x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return x

    @classmethod
    def param_counts(cls, cfg):
        return {"routers": cls.n_logits * cfg.dim, "predictors": 0}

    @classmethod
    def flops_per_token(cls, cfg, mode):
        return 2 * cls.n_logits * cfg.dim


class ExpertChoiceRouter(LinearRouter):
    """r = w.x, one scalar per token; the block takes the top-k of r per sequence (the MoD router).

    Causal rule: the predictor (`causal_method="predictor"`) or r itself (`"aux_loss"`, trained
    towards top-k membership by the BCE `aux_loss`).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        # trained whatever the causal method, so the method can change after training; kept out of
        # this module's registry: the block registers it as `predictor`
        object.__setattr__(self, "predictor", Predictor(cfg.dim, _predictor_hidden(cfg)))
        self.companions["predictor"] = self.predictor
        self.loss_weights = {"predictor_loss": self.rc.predictor_loss_weight}
        if self.rc.aux_loss_weight > 0:
            self.loss_weights["aux_loss"] = self.rc.aux_loss_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.router_input(x), self.weight).squeeze(-1).float()  # (B, T)

    def causal_score(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return self.predictor(x) if self.rc.causal_method == "predictor" else r

    def topk_terms(self, x, r, chosen):
        p = self.predictor(x)
        losses = {"predictor_loss": F.binary_cross_entropy_with_logits(p, chosen)}
        if "aux_loss" in self.loss_weights:
            losses["aux_loss"] = F.binary_cross_entropy_with_logits(r, chosen)
        return losses, (p if self.rc.causal_method == "predictor" else r).detach()

    @classmethod
    def param_counts(cls, cfg):
        h = _predictor_hidden(cfg)
        return {"routers": cfg.dim, "predictors": cfg.dim * h + h + h + 1}

    @classmethod
    def flops_per_token(cls, cfg, mode):
        flops = super().flops_per_token(cfg, mode)
        # the predictor runs for its training loss (topk) and as the causal rule only
        if mode == "topk" or (mode == "causal" and cfg.routing.causal_method == "predictor"):
            h = _predictor_hidden(cfg)
            flops += 2 * (cfg.dim * h + h)
        return flops

    @classmethod
    def untrained_flops_per_token(cls, cfg):
        return 2 * cfg.dim * _predictor_hidden(cfg)  # the predictor's first layer: its input is detached


class TokenChoiceRouter(LinearRouter):
    """Token choice: logits (skip, block) per token; r = l_block - l_skip. Weight shape (2, D).

    A token asks for the block iff r > 0 and at most k of those get it; a balancing loss keeps the
    fraction asking near the capacity. Causal rule: r against a calibrated threshold.
    """

    n_logits = 2

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.loss_weights = {"balance_loss": self.rc.balance_loss_weight}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(self.router_input(x), self.weight).float()  # (B, T, 2)
        return logits[..., 1] - logits[..., 0]  # (B, T)

    def select(self, r, k):
        B, T = r.shape
        wants = r > 0
        idx = topk_indices(r.masked_fill(~wants, float("-inf")), k)
        valid = wants.gather(1, idx)
        # valid tokens first, so padding never becomes a key of a valid token
        idx = idx.gather(1, ((~valid).long() * T + idx).argsort(dim=1))
        return idx, wants.gather(1, idx)

    def topk_terms(self, x, r, chosen):
        return {"balance_loss": balance_loss(r, self.rc.capacity)}, r.detach()


class RandomRouter(Router):
    """Random routing: k uniformly random tokens per sequence. No parameters, no causal rule.

    The block output is not scaled (gate 1): there is no router to put on the gradient path.
    """

    can_decode_causally = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rand(x.shape[:2], device=x.device)  # (B, T)

    def gate(self, r: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(r)

    def causal_score(self, x, r):
        raise ValueError("random routing has no causal decision: it cannot sample or run in causal mode")


class RandomTokenRouter(RandomRouter):
    """Random routing with a causal rule: each token draws a uniform score of its own, and enters
    where it exceeds the threshold, i.e. with the routed fraction's probability (a coin per token).

    The random baseline of sampling at a routed fraction (`topk` mode still takes k random tokens).
    """

    can_decode_causally = True

    def causal_score(self, x, r):
        return r


class FrozenRouter(ExpertChoiceRouter):
    """Expert choice with the router weight frozen at its random initialisation: it selects by
    content (a fixed random direction of the residual stream) and learns nothing, a control between
    random and learned routing. Gate 1 (a frozen score says nothing about how much to add); the
    predictor still learns its top-k choice, so it samples like the learned router.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.router_input(x).detach(), self.weight.detach()).squeeze(-1).float()  # (B, T)

    def gate(self, r: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(r)

    def topk_terms(self, x, r, chosen):
        p = self.predictor(x)  # no aux loss: the router never trains
        return {"predictor_loss": F.binary_cross_entropy_with_logits(p, chosen)}, (
            p if self.rc.causal_method == "predictor" else r).detach()


class RuleRouter(Router):
    """A fixed rule, causal by construction: a token enters iff the token before it is one of
    `routing.rule_tokens` (whitespace bytes: the token starts a word), the first token of a sequence
    counting as after whitespace. In `topk` mode the first k such tokens in sequence order enter,
    filled up to k with the earliest others (static k, like every router). No parameters; gate 1.

    Scores: 1 for a token after whitespace, else 0, minus a tiny position term that makes top-k
    take the earliest first; the causal rule thresholds them at the calibrated threshold (between
    0 and 1 at any fraction the rule can route).
    """

    needs_ids = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("rule_tokens", torch.tensor(self.rc.rule_tokens, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor, prev_ids: torch.Tensor | None = None) -> torch.Tensor:
        if prev_ids is None:
            raise ValueError("the rule router reads the token ids: call the model with input_ids")
        after = torch.isin(prev_ids, self.rule_tokens.to(prev_ids.device)) | (prev_ids < 0)  # (B, T)
        return after.float()

    def select(self, r, k):
        T = r.shape[1]
        order = r - torch.arange(T, device=r.device, dtype=r.dtype) / (2 * T)  # earliest first among equals
        return topk_indices(order, k), None

    def gate(self, r: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(r)

    def topk_terms(self, x, r, chosen):
        return {}, r.detach()


def _predictor_hidden(cfg: ModelConfig) -> int:
    return cfg.routing.predictor_hidden or max(1, cfg.dim // 8)


ROUTER_CLASSES: dict[str, type[Router]] = {
    "expert_choice": ExpertChoiceRouter,
    "token_choice": TokenChoiceRouter,
    "random": RandomRouter,
    "random_token": RandomTokenRouter,
    "frozen": FrozenRouter,
    "rule": RuleRouter,
    "none": Router,  # a dense model: no routed layer, so no router cost
}


def register_router(name: str):
    """Class decorator: make a `Router` subclass available as `routing.router=name` everywhere
    (config validation, the model, FLOP accounting, the CLI)."""

    def register(cls: type[Router]) -> type[Router]:
        ROUTER_CLASSES[name] = cls
        if name not in ROUTERS:
            ROUTERS.append(name)
        return cls

    return register


def router_class(cfg: ModelConfig) -> type[Router]:
    """The router class a config names (`Router` itself for `none`: zero cost, never built)."""
    return ROUTER_CLASSES[cfg.routing.router]


def make_router(cfg: ModelConfig) -> Router:
    """The router of a routed layer."""
    cls = router_class(cfg)
    if cls is Router:
        raise ValueError("routing.router is none: a dense model has no routed layer")
    return cls(cfg)
