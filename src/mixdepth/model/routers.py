"""Routers of a Mixture-of-Depths layer and the causal predictor (paper sections 3.1-3.5).

A router maps the residual stream entering a block to one score per token, `r` (B, T), in fp32.
- `ExpertChoiceRouter` (the MoD default): r = w.x; the block takes the top-k of r per sequence.
- `TokenChoiceRouter`: two logits per token (skip, block); r = l_block - l_skip, so
  sigmoid(r) = softmax(l)[block]; a token asks for the block iff r > 0; at most k get it.
- `RandomRouter`: no parameters; k uniformly random tokens (the paper's ablation, fig. 5).
`Predictor` is the small MLP that learns, on stop-gradient inputs, whether a token will be in the
top-k, so that sampling can decide causally (section 3.5).

Dimensions: B batch, T tokens, K gathered tokens, D model width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Linear


class ExpertChoiceRouter(nn.Module):
    """r = w.x, one scalar per token; state-dict key `layers.{i}.router.weight`, shape (1, D)."""

    can_decode_causally = True

    def __init__(self, dim: int, init_std: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, dim))
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight).squeeze(-1).float()  # (B, T)


class TokenChoiceRouter(ExpertChoiceRouter):
    """Token choice: logits (skip, block) per token; r = l_block - l_skip. Weight shape (2, D)."""

    def __init__(self, dim: int, init_std: float) -> None:
        nn.Module.__init__(self)
        self.weight = nn.Parameter(torch.empty(2, dim))
        self.init_std = init_std
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight).float()  # (B, T, 2)
        return logits[..., 1] - logits[..., 0]  # (B, T)


class RandomRouter(nn.Module):
    """Random routing: k uniformly random tokens per sequence. No parameters, no causal rule."""

    can_decode_causally = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rand(x.shape[:2], device=x.device)  # (B, T)


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


def make_router(kind: str, dim: int, init_std: float) -> nn.Module | None:
    if kind == "expert_choice":
        return ExpertChoiceRouter(dim, init_std)
    if kind == "token_choice":
        return TokenChoiceRouter(dim, init_std)
    if kind == "random":
        return RandomRouter()
    return None


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
