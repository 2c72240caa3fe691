"""Mixture-of-Experts MLP, and the no-op expert of integrated MoDE (paper section 3.6, figure 7).

`MoE` replaces a block's SwiGLU MLP with E SwiGLU experts and a token-choice router:
- the router (`gate`, HF Mixtral's name) scores E experts, plus one no-op expert for integrated
  MoDE; each token takes its top-k (k = 1 or 2) and the chosen experts' outputs are weighted by
  their router probabilities, which puts the router on the gradient path;
- the no-op expert's output is zero: a token sent there keeps its residual and costs nothing in
  the MLP (it is never gathered, no call, no padding row);
- in training an expert takes at most `capacity_factor * N * k / E` of the N tokens of a batch
  (times the non-no-op share for integrated MoDE), first choices first and then in token order;
  tokens over capacity keep their residual. Inference (eval mode, or no gradients) is dropless: a token's experts
  depend on that token alone, so decoding with a KV cache equals a full causal forward pass;
- balancing: the Switch loss sum_i f_i P_i / t_i over the target shares t (1/E each; with the
  no-op, `noop_fraction` for it and the rest shared), 1.0 at the targets; optionally DeepSeek-V3's
  aux-loss-free bias, added to the scores for selection only and moved after each training forward;
- experts run only on their own tokens: tokens sorted by expert, then one `F.grouped_mm` per
  projection, or a plain loop of matmuls (the reference, used where grouped_mm cannot run).

The losses of the last forward are left in `self.losses` (read by the model right after), since
`Block.delta` returns only the block's output.

Dimensions: N tokens, D model width, E experts (E' = E + 1 with the no-op), F expert hidden width,
A kept assignments.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .layers import Linear


def expert_mlp(x: torch.Tensor, counts: list[int] | torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
               w_down: torch.Tensor, grouped: bool) -> torch.Tensor:
    """SwiGLU of expert e on its rows of `x` (rows sorted by expert; `counts[e]` rows each). (A, D) -> (A, D).

    `grouped`: one `F.grouped_mm` per projection (offsets on device, no host sync); else a loop of
    matmuls over the experts (the reference).
    """
    if grouped:
        offs = torch.as_tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        h = F.silu(F.grouped_mm(x, w_gate, offs=offs)) * F.grouped_mm(x, w_up, offs=offs)
        return F.grouped_mm(h, w_down, offs=offs)
    outs, start = [], 0
    for e, n in enumerate(counts.tolist() if torch.is_tensor(counts) else counts):
        xe = x[start : start + n]
        outs.append((F.silu(xe @ w_gate[e]) * (xe @ w_up[e])) @ w_down[e])
        start += n
    return torch.cat(outs) if outs else x.new_zeros(0, w_down.shape[-1])


def choice_shares(choice: torch.Tensor, n_choices: int) -> torch.Tensor:
    """(E',) share of the token choices `choice` (any shape of expert ids) that went to each expert."""
    return torch.bincount(choice.flatten(), minlength=n_choices).float() / choice.numel()


def balance_loss(probs: torch.Tensor, assigned: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Switch balancing loss sum_i f_i P_i / t_i: f the share of assignments per expert (no gradient),
    P the mean router probability, t the target shares. 1.0 when f = P = t, and above 1 for any other
    f = P (Cauchy-Schwarz); other pairs can go below 1, so it is not a lower bound in general."""
    f = choice_shares(assigned, probs.shape[-1])
    return (f * probs.mean(0) / targets).sum()


class MoE(nn.Module):
    """E SwiGLU experts behind a token-choice router (plus a no-op expert for integrated MoDE).

    Weights: `gate.weight` (E', D), `experts.gate_proj` (E, D, F), `experts.up_proj` (E, D, F),
    `experts.down_proj` (E, F, D); buffer `expert_bias` (E',) for aux-loss-free balancing.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        m = cfg.moe
        self.mc = m
        self.n_experts = m.n_experts
        self.n_choices = m.n_experts + int(m.noop)  # the no-op, if any, is the last choice
        self.top_k = m.top_k
        hidden = m.ffn_dim or cfg.ffn_dim
        self.gate = Linear(cfg.dim, self.n_choices)
        self.experts = nn.ParameterDict({
            "gate_proj": nn.Parameter(torch.empty(m.n_experts, cfg.dim, hidden)),
            "up_proj": nn.Parameter(torch.empty(m.n_experts, cfg.dim, hidden)),
            "down_proj": nn.Parameter(torch.empty(m.n_experts, hidden, cfg.dim)),
        })
        share = (1 - m.noop_fraction) if m.noop else 1.0
        targets = [share / m.n_experts] * m.n_experts + ([m.noop_fraction] if m.noop else [])
        self.register_buffer("targets", torch.tensor(targets), persistent=False)
        self.register_buffer("expert_bias", torch.zeros(self.n_choices))
        self.grouped = m.impl == "grouped" or (m.impl == "auto" and cfg.dim % 4 == 0 and hidden % 4 == 0)
        self.losses: dict[str, torch.Tensor] = {}
        self.init_std = cfg.init_std
        self.out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.experts["gate_proj"], std=self.init_std)
        nn.init.normal_(self.experts["up_proj"], std=self.init_std)
        nn.init.normal_(self.experts["down_proj"], std=self.out_std)
        nn.init.normal_(self.gate.weight, std=self.init_std)

    def capacity(self, n_tokens: int) -> int | None:
        """Most tokens one expert takes from a batch of `n_tokens` (None: dropless)."""
        m = self.mc
        if m.dropless or not self.training or not torch.is_grad_enabled():  # no_grad: generation, evaluation
            return None
        share = (1 - m.noop_fraction) if m.noop else 1.0
        return max(1, math.ceil(m.capacity_factor * n_tokens * self.top_k * share / self.n_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities (N, E'), chosen experts (N, k) and their weights (N, k), for N tokens."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)  # (N, E')
        choice = (probs + self.expert_bias).topk(self.top_k, dim=-1).indices  # bias: selection only
        return probs, choice, probs.gather(1, choice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        N = x.shape[0]
        probs, choice, weight = self.route(x)
        # assignments first choices first, each in token order: capacity keeps the earlier ones
        expert = choice.t().reshape(-1)  # (N*k,)
        token = torch.arange(N, device=x.device).repeat(self.top_k)  # (N*k,)
        w = weight.t().reshape(-1)
        keep = expert < self.n_experts  # the no-op is never computed
        cap = self.capacity(N)
        if cap is not None:
            onehot = F.one_hot(expert, self.n_choices)  # (N*k, E')
            slot = (onehot.cumsum(0) * onehot).sum(1) - 1  # position of each assignment in its expert's queue
            keep = keep & (slot < cap)
        order = torch.argsort(torch.where(keep, expert, self.n_choices), stable=True)
        n_keep = int(keep.sum())  # host sync: the expert batch's shape depends on it
        order = order[:n_keep]
        e_sorted, t_sorted = expert[order], token[order]
        counts = torch.bincount(e_sorted, minlength=self.n_experts)[: self.n_experts]
        xs = x[t_sorted]  # (A, D)
        gp, up, down = self.experts["gate_proj"], self.experts["up_proj"], self.experts["down_proj"]
        # grouped_mm's CPU kernel: fp32 only (the loop serves autocast and other devices)
        grouped = self.grouped and (self.mc.impl == "grouped" or (xs.device.type == "cpu" and xs.dtype == gp.dtype
                                                                   == torch.float32))
        y = expert_mlp(xs, counts if grouped else counts.cpu(), gp, up, down, grouped)  # (A, D)
        y = y * w[order, None].to(y.dtype)
        out = x.new_zeros(N, shape[-1]).index_add(0, t_sorted, y.to(x.dtype))
        self.losses = {"expert_balance_loss": balance_loss(probs, choice, self.targets)} if self.training else {}
        if self.training and torch.is_grad_enabled() and self.mc.bias_update_rate > 0:
            self._update_bias(choice)
        return out.reshape(shape)

    @torch.no_grad()
    def _update_bias(self, choice: torch.Tensor) -> None:
        """Aux-loss-free balancing: raise the selection bias of experts below their target share."""
        load = choice_shares(choice, self.n_choices)
        self.expert_bias.add_(self.mc.bias_update_rate * torch.sign(self.targets - load))

    @torch.no_grad()
    def set_noop_share(self, x: torch.Tensor, fraction: float) -> float:
        """Set the no-op's selection bias so that `fraction` of the tokens of `x` choose it (top-1).

        The integrated-MoDE analogue of a causal threshold: it fixes the MLP compute of a model at
        inference (e.g. a random or early model whose router does not yet hit `noop_fraction`).
        Returns the bias.
        """
        if not self.mc.noop or self.top_k != 1:
            raise ValueError("set_noop_share needs a no-op expert and top_k 1")
        probs = torch.softmax(self.gate(x.reshape(-1, x.shape[-1])).float(), dim=-1)
        real = (probs[:, :-1] + self.expert_bias[:-1]).max(-1).values
        margin = (real - probs[:, -1]).double()  # the no-op wins when its bias exceeds this
        bias = torch.quantile(margin, fraction) if 0 < fraction < 1 else margin.max() + 1 if fraction else -2.0
        self.expert_bias[-1] = float(bias) + 1e-7 * (fraction > 0)
        return float(self.expert_bias[-1])

    def stats(self, x: torch.Tensor) -> torch.Tensor:
        """(E',) share of token choices per expert (the no-op last) for the tokens of `x`."""
        _, choice, _ = self.route(x.reshape(-1, x.shape[-1]))
        return choice_shares(choice, self.n_choices)
