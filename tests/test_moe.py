"""Mixture-of-Experts MLPs, staged MoDE and integrated MoDE (paper section 3.6).

Every check reads the module from the outside: which rows reach the experts (a wrapper around
`expert_mlp`), a hand-written reference of the experts, `FlopCounterMode`, the KV cache against a
full forward pass, and the command line. Variants:
- MoE: `moe.n_experts` 4, `routing.router none`;
- staged MoDE: MoE inside the default expert-choice MoD router;
- integrated MoDE: MoE with a no-op expert, `routing.router none`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import mixdepth.model.moe as moe_module
from mixdepth import flops
from mixdepth.cli import main
from mixdepth.config import ModelConfig
from mixdepth.generate import decode_one, prefill
from mixdepth.model import MoDTransformer
from mixdepth.model.moe import MoE, balance_loss, expert_mlp

E = 4
VOCAB = 256
VARIANTS = {
    "moe": dict(moe=dict(n_experts=E), routing=dict(router="none")),
    "moe_top2": dict(moe=dict(n_experts=E, top_k=2), routing=dict(router="none")),
    "staged_mode": dict(moe=dict(n_experts=E)),
    "integrated_mode": dict(moe=dict(n_experts=E, noop=True), routing=dict(router="none")),
    "integrated_mode_top2": dict(moe=dict(n_experts=E, noop=True, top_k=2), routing=dict(router="none")),
}
THREE = ["moe", "staged_mode", "integrated_mode"]


def _cfg(variant: str, **moe) -> ModelConfig:
    v = VARIANTS[variant]
    return ModelConfig.from_name("debug", moe={**v["moe"], **moe}, routing=v.get("routing", {}))


def _ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _record_expert_calls(monkeypatch) -> list[tuple[torch.Tensor, list[int]]]:
    """Wrap `expert_mlp` (as `MoE.forward` calls it): each call's rows and tokens per expert."""
    calls: list[tuple[torch.Tensor, list[int]]] = []
    real = moe_module.expert_mlp

    def recording(x, counts, *args, **kwargs):
        calls.append((x.detach().clone(), [int(c) for c in counts]))
        return real(x, counts, *args, **kwargs)

    monkeypatch.setattr(moe_module, "expert_mlp", recording)
    return calls


def _hand_expert(moe: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU of expert e, written out from its weights."""
    gp, up, down = (moe.experts[n][e] for n in ("gate_proj", "up_proj", "down_proj"))
    return (F.silu(x @ gp) * (x @ up)) @ down


def _forced_moe(variant: str, logits: torch.Tensor, **moe) -> tuple[MoE, torch.Tensor]:
    """A MoE whose router logits for the returned tokens are exactly `logits` (N, E'): the gate
    reads the first E' input features, which are set to the wanted logits."""
    cfg = _cfg(variant, **moe)
    layer = MoE(cfg)
    N, C = logits.shape
    x = torch.randn(N, cfg.dim, generator=torch.Generator().manual_seed(3))
    x[:, :C] = logits
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[:, :C] = torch.eye(C)
    return layer, x


def _moe_inputs(model: MoDTransformer):
    """Hooks that keep each MoE layer's last input; returns (store, handles)."""
    store: dict[int, torch.Tensor] = {}
    handles = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: store.__setitem__(i, a[0].detach()))
               for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoE)]
    return store, handles


# ---- 1. capacity in training --------------------------------------------------------------------
def _expected_kept(choice: torch.Tensor, cap: int, n_experts: int) -> dict[int, list[int]]:
    """Per expert, the tokens it computes: first choices first, each in token order, up to `cap`."""
    kept: dict[int, list[int]] = {e: [] for e in range(n_experts)}
    for j in range(choice.shape[1]):
        for t in range(choice.shape[0]):
            e = int(choice[t, j])
            if e < n_experts and len(kept[e]) < cap:
                kept[e].append(t)
    return kept


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_capacity_respected_in_training(monkeypatch, top_k):
    N = 32
    logits = torch.zeros(N, E)
    t = torch.arange(N)
    group_b = t % 4 == 3  # 8 tokens prefer expert 1, the other 24 expert 0 (then 1 as second choice)
    logits[:, 0] = torch.where(group_b, 5.0, 10.0)
    logits[:, 1] = torch.where(group_b, 10.0, 5.0)
    layer, x = _forced_moe("moe", logits, top_k=top_k)
    layer.train()
    cap = layer.capacity(N)
    assert cap == -(-5 * N * top_k // (4 * E))  # ceil(1.25 * N * k / E)
    probs, choice, weight = layer.route(x)
    assert choice[:, 0].tolist() == torch.where(group_b, 1, 0).tolist()  # the forced routing holds
    calls = _record_expert_calls(monkeypatch)
    out = layer(x)
    assert len(calls) == 1
    rows, counts = calls[0]
    assert max(counts) <= cap
    kept = _expected_kept(choice, cap, E)
    assert counts == [len(kept[e]) for e in range(E)]
    assert sum(counts) < N * top_k, "the test needs overflowing tokens"
    # the rows each expert computed are exactly its kept tokens, in token order
    start = 0
    for e in range(E):
        got = rows[start : start + counts[e]]
        tokens = [int((x == r).all(1).nonzero()) for r in got]
        assert tokens == kept[e], (e, tokens, kept[e])
        start += counts[e]
    if top_k == 1:
        assert kept[0] == [i for i in range(N) if not group_b[i]][:cap]  # the first tokens in order
    else:
        assert kept[0] == [i for i in range(N) if not group_b[i]][:cap]  # first choices only
        assert kept[1] == [i for i in range(N) if group_b[i]] + [i for i in range(N) if not group_b[i]][: cap - 8]
    # output: the kept experts' weighted outputs; a token with no kept expert adds exactly zero
    with torch.no_grad():
        for i in range(N):
            want = torch.zeros(x.shape[1])
            for j in range(top_k):
                e = int(choice[i, j])
                if i in kept[e]:
                    want = want + weight[i, j] * _hand_expert(layer, e, x[i : i + 1])[0]
            if not any(i in kept[int(e)] for e in choice[i]):
                assert torch.equal(out[i], torch.zeros_like(out[i])), i
            else:
                torch.testing.assert_close(out[i], want, atol=1e-6, rtol=1e-5)
    # eval is dropless: every assignment is computed
    layer.eval()
    calls.clear()
    layer(x)
    assert layer.capacity(N) is None and sum(calls[0][1]) == N * top_k


def test_moe_dropless_training_keeps_every_token(monkeypatch):
    logits = torch.zeros(16, E)
    logits[:, 0] = 10.0
    layer, x = _forced_moe("moe", logits, dropless=True)
    layer.train()
    calls = _record_expert_calls(monkeypatch)
    layer(x)
    assert layer.capacity(16) is None and calls[0][1] == [16, 0, 0, 0]


# ---- 2. the no-op expert ------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["integrated_mode", "integrated_mode_top2"])
def test_mode_noop_tokens_get_exactly_zero_mlp_output(variant):
    model = MoDTransformer(_cfg(variant)).eval()
    outs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, layer in enumerate(model.layers):
        layer.mlp.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, (a[0].detach(), o.detach())))
    with torch.no_grad():
        model(_ids(2, 32))
    assert len(outs) == model.cfg.n_layers
    saw_noop = saw_expert = 0
    for i, (inp, out) in outs.items():
        moe = model.layers[i].mlp
        x, y = inp.reshape(-1, inp.shape[-1]), out.reshape(-1, out.shape[-1])
        _, choice, weight = moe.route(x)
        for t in range(x.shape[0]):
            if (choice[t] == E).all():  # only the no-op: the residual alone, bit for bit
                assert torch.equal(y[t], torch.zeros_like(y[t]))
                saw_noop += 1
            else:
                want = sum(weight[t, j] * _hand_expert(moe, int(e), x[t : t + 1])[0]
                           for j, e in enumerate(choice[t]) if e < E)
                torch.testing.assert_close(y[t], want, atol=1e-6, rtol=1e-5)
                assert y[t].abs().sum() > 0
                saw_expert += 1
    assert saw_expert > 0
    if variant == "integrated_mode":
        assert saw_noop > 0, "the test needs tokens that take the no-op"


@pytest.mark.parametrize("impl", ["grouped", "loop"])
@pytest.mark.parametrize("training", [True, False])
def test_mode_all_noop_computes_no_expert_row(monkeypatch, impl, training):
    logits = torch.zeros(12, E + 1)
    logits[:, E] = 10.0  # the no-op wins for every token
    layer, x = _forced_moe("integrated_mode", logits, impl=impl)
    layer.train(training)
    calls = _record_expert_calls(monkeypatch)
    with FlopCounterMode(display=False) as fc:
        out = layer(x)
    assert torch.equal(out, torch.zeros_like(x))
    assert all(rows.shape[0] == 0 and sum(counts) == 0 for rows, counts in calls)  # no row, no padding row
    assert fc.get_total_flops() == 2 * 12 * x.shape[1] * (E + 1)  # the router alone


# ---- 3. balancing loss --------------------------------------------------------------------------
def _consistent_probs(assigned: torch.Tensor, n: int) -> torch.Tensor:
    """Router probabilities whose mean P equals the assignment shares f (half one-hot, half f)."""
    onehot = F.one_hot(assigned, n).float().mean(1)  # (N, n): 1/k on each chosen expert
    f = onehot.mean(0)
    return 0.5 * onehot + 0.5 * f


def test_expert_balance_loss_minimum_at_uniform():
    targets = torch.full((E,), 1 / E)
    assigned = torch.arange(8).remainder(E)[:, None]  # (N, 1) uniform
    assert balance_loss(torch.full((8, E), 1 / E), assigned, targets).item() == pytest.approx(1.0, abs=1e-7)
    assigned2 = torch.stack([torch.arange(8).remainder(E), (torch.arange(8) + 1).remainder(E)], 1)  # top-2 uniform
    assert balance_loss(torch.full((8, E), 1 / E), assigned2, targets).item() == pytest.approx(1.0, abs=1e-7)
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        k = 1 + trial % 2
        N = 64
        skew = torch.rand(E, generator=g) ** 3 + 1e-3
        assigned = torch.stack([torch.multinomial(skew, N, replacement=True, generator=g) for _ in range(k)], 1)
        if k == 2:  # two distinct experts per token
            assigned[:, 1] = torch.where(assigned[:, 1] == assigned[:, 0], (assigned[:, 0] + 1) % E, assigned[:, 1])
        probs = _consistent_probs(assigned, E)
        f = torch.bincount(assigned.flatten(), minlength=E).float() / assigned.numel()
        if torch.allclose(f, targets):
            continue
        loss = balance_loss(probs, assigned, targets)
        torch.testing.assert_close(loss, (f * f / targets).sum())  # f = P here
        assert loss > 1.0 + 1e-4, (trial, f)


def test_expert_balance_loss_with_noop_minimum_at_target_shares():
    layer = MoE(_cfg("integrated_mode", noop_fraction=0.5))
    targets = layer.targets
    torch.testing.assert_close(targets, torch.tensor([0.125] * E + [0.5]))
    torch.testing.assert_close(MoE(_cfg("integrated_mode", noop_fraction=0.3)).targets,
                               torch.tensor([0.175] * E + [0.3]))
    at_target = torch.tensor([0, 1, 2, 3] + [E] * 4)[:, None]  # (8, 1): shares 1/8 each, 1/2 no-op
    best = balance_loss(_consistent_probs(at_target, E + 1), at_target, targets)
    assert best.item() == pytest.approx(1.0, abs=1e-6)
    uniform = torch.arange(10).remainder(E + 1)[:, None]  # the minimum without the no-op target
    assert balance_loss(_consistent_probs(uniform, E + 1), uniform, targets) > 1.0 + 1e-3
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        assigned = torch.randint(0, E + 1, (40, 1), generator=g)
        f = torch.bincount(assigned.flatten(), minlength=E + 1).float() / 40
        if torch.allclose(f, targets):
            continue
        assert balance_loss(_consistent_probs(assigned, E + 1), assigned, targets) > best + 1e-4


# ---- 4. grouped_mm path against the loop ----------------------------------------------------------
@pytest.mark.parametrize("counts", [[5, 0, 9, 2], [0, 7, 3, 0], [16, 0, 0, 0]])
def test_expert_grouped_equals_loop_fp32_forward_and_backward(counts):
    g = torch.Generator().manual_seed(2)
    D, Fh = 12, 20  # multiples of 4 (grouped_mm wants 16-byte rows)
    A = sum(counts)
    x = torch.randn(A, D, generator=g)
    ws = [torch.randn(E, D, Fh, generator=g) * 0.3, torch.randn(E, D, Fh, generator=g) * 0.3,
          torch.randn(E, Fh, D, generator=g) * 0.3]
    upstream = torch.randn(A, D, generator=g)  # a non-uniform gradient, as the router weights give

    def run(grouped):
        leaves = [t.clone().requires_grad_(True) for t in (x, *ws)]
        y = expert_mlp(leaves[0], counts, *leaves[1:], grouped=grouped)
        (y * upstream).sum().backward()
        return y.detach(), [t.grad for t in leaves]

    y_g, grads_g = run(True)
    y_l, grads_l = run(False)
    torch.testing.assert_close(y_g, y_l, atol=1e-6, rtol=1e-5)
    for name, a, b in zip(["x", "gate_proj", "up_proj", "down_proj"], grads_g, grads_l):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    for e, n in enumerate(counts):
        if n == 0:  # an empty expert gets an exactly zero gradient on both paths
            assert all(gr[e].abs().sum() == 0 for gr in grads_g[1:])
    # and the loop is what its docstring says: SwiGLU of each expert on its own rows
    start = 0
    for e, n in enumerate(counts):
        xe = x[start : start + n]
        torch.testing.assert_close(y_l[start : start + n], (F.silu(xe @ ws[0][e]) * (xe @ ws[1][e])) @ ws[2][e])
        start += n


@pytest.mark.parametrize("variant", ["moe", "moe_top2", "integrated_mode"])
@pytest.mark.parametrize("training", [True, False])
def test_moe_grouped_impl_equals_loop_impl(variant, training):
    layers = {impl: MoE(_cfg(variant, impl=impl)).train(training) for impl in ("grouped", "loop")}
    layers["loop"].load_state_dict(layers["grouped"].state_dict())
    x = torch.randn(3, 16, 64)
    upstream = torch.randn(3, 16, 64)
    res = {}
    for impl, layer in layers.items():
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        loss = (y * upstream).sum() + (layer.losses["expert_balance_loss"] if training else 0)
        loss.backward()
        res[impl] = (y.detach(), xi.grad, {n: p.grad for n, p in layer.named_parameters()})
    torch.testing.assert_close(res["grouped"][0], res["loop"][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res["grouped"][1], res["loop"][1], atol=1e-6, rtol=1e-5)
    assert set(res["grouped"][2]) == {"gate.weight", "experts.gate_proj", "experts.up_proj", "experts.down_proj"}
    for name, grad in res["grouped"][2].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, res["loop"][2][name], atol=1e-6, rtol=1e-5, msg=name)


def test_moe_auto_impl_uses_grouped_on_cpu_fp32(monkeypatch):
    seen = []
    real = moe_module.expert_mlp
    monkeypatch.setattr(moe_module, "expert_mlp", lambda *a, **k: seen.append(a[-1]) or real(*a, **k))
    MoE(_cfg("moe"))(torch.randn(8, 64))
    MoE(_cfg("moe", impl="loop"))(torch.randn(8, 64))
    assert seen == [True, False]


# ---- 5. FLOP formulas against the counter ---------------------------------------------------------
T, B = 40, 2
FLOP_VARIANTS = ["moe", "moe_top2", "staged_mode", "integrated_mode", "integrated_mode_top2"]


def _counted(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def _with_measured_noop(model: MoDTransformer, store: dict[int, torch.Tensor]) -> ModelConfig:
    """The config with `noop_fraction` set to the no-op share the forward measured, averaged over
    the MoE layers (each sees the same tokens, and the count is linear in the share)."""
    cfg = model.cfg
    if not cfg.moe.noop:
        return cfg
    assert len(store) == len(model.moe_layers)
    shares = [float(model.layers[i].mlp.stats(x)[-1]) for i, x in store.items()]
    share = sum(shares) / len(shares)
    assert 0 < share < 1, shares
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, noop_fraction=share))


@pytest.mark.parametrize("variant", FLOP_VARIANTS)
def test_moe_and_mode_forward_flops_match_counter(variant):
    model = MoDTransformer(_cfg(variant, impl="loop")).eval()
    ids = _ids(B, T)
    store, _ = _moe_inputs(model)
    counted = _counted(lambda: model(ids))
    cfg = _with_measured_noop(model, store)
    assert round(flops.forward_flops(cfg, T, B)) == counted


@pytest.mark.parametrize("variant", ["moe", "moe_top2", "integrated_mode"])
def test_moe_and_mode_train_step_flops_match_counter_when_dropless(variant):
    # dropless: every token runs its experts, so the count is the formula's (drops only lower it)
    model = MoDTransformer(_cfg(variant, impl="loop", dropless=True))
    ids = _ids(B, T + 1)
    store, _ = _moe_inputs(model)
    counted = _counted(lambda: model(ids[:, :-1], ids[:, 1:]).loss.backward())
    cfg = _with_measured_noop(model, store)
    assert round(flops.train_step_flops(cfg, T, B)) == counted


@pytest.mark.parametrize("variant", ["moe", "moe_top2", "staged_mode", "integrated_mode"])
def test_moe_and_mode_decode_flops_match_counter(variant):
    ctx, rows = 12, 4
    model = MoDTransformer(_cfg(variant, impl="loop")).eval()
    ids = _ids(rows, ctx + 1)
    f = None
    if model.routed_layers:
        model.calibrate_causal(ids, 0.5)
        f = 1.0
        model.set_causal_fraction(f)  # every token enters the routed blocks
    cache = model.make_cache(rows, 32)
    with torch.no_grad():
        model(ids[:, :ctx], mode="causal", cache=cache)
    store, _ = _moe_inputs(model)
    counted = _counted(lambda: model(ids[:, ctx:], mode="causal", cache=cache))
    cfg = _with_measured_noop(model, store)
    assert round(rows * flops.decode_flops_per_token(cfg, ctx, routed_fraction=f)) == counted


def test_moe_flops_count_top_k_experts_and_router():
    # a hand count of one MoE layer: router D x E' on every token, top_k experts of 3 D F each
    for variant, experts in [("moe", 1), ("moe_top2", 2), ("integrated_mode", 0.5)]:
        cfg = _cfg(variant)
        dense = flops.forward_flops(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, n_experts=0,
                                                                                      noop=False)), T)
        per_layer = 2 * T * (experts * 3 * cfg.dim * cfg.ffn_dim - 3 * cfg.dim * cfg.ffn_dim
                             + cfg.dim * (E + cfg.moe.noop))
        assert flops.forward_flops(cfg, T) == pytest.approx(dense + cfg.n_layers * per_layer, rel=1e-12)


# ---- 6. cached decoding equals a full causal forward ---------------------------------------------
CACHE_VARIANTS = ["moe", "moe_top2", "staged_mode", "integrated_mode", "integrated_mode_top2"]
ATOL = 1e-5


def _cache_model(variant: str) -> MoDTransformer:
    model = MoDTransformer(_cfg(variant)).eval()
    if model.routed_layers:
        model.calibrate_causal(_ids(4, 48, seed=7), 0.3)
    return model


def _full_and_check_routing(model: MoDTransformer, ids: torch.Tensor):
    """The full causal forward, after checking that its rows route differently (experts, no-op, MoD)."""
    store, handles = _moe_inputs(model)
    with torch.no_grad():
        full = model(ids, mode="causal", return_routing=True)
    for h in handles:
        h.remove()
    differ = False
    for i, x in store.items():
        moe = model.layers[i].mlp
        _, choice, _ = moe.route(x.reshape(-1, x.shape[-1]))
        per_row = choice.reshape(x.shape[0], -1)
        hist = [torch.bincount(r, minlength=moe.n_choices).tolist() for r in per_row]
        differ |= len({tuple(h) for h in hist}) > 1
        if moe.mc.noop:
            noop = (choice == moe.n_experts).float().mean()
            assert 0 < noop < 1, "the test needs tokens on the no-op and tokens on experts"
    assert differ, "the test needs rows whose expert choices differ"
    for m in full.routing.values():  # staged MoDE: MoD masks differ between rows too
        assert m.any() and not m.all()
        assert len(set(m.sum(1).tolist())) > 1
    return full


@pytest.mark.parametrize("variant", CACHE_VARIANTS)
def test_moe_and_mode_token_by_token_decode_equals_full_forward(variant):
    model = _cache_model(variant)
    Bc, Tc = 3, 24
    ids = _ids(Bc, Tc)
    full = _full_and_check_routing(model, ids)
    cache = model.make_cache(Bc, 32)
    with torch.no_grad():
        for t in range(Tc):
            out = model(ids[:, t : t + 1], mode="causal", cache=cache, input_pos=torch.full((Bc,), t),
                        return_routing=True)
            torch.testing.assert_close(out.logits[:, 0], full.logits[:, t], atol=ATOL, rtol=ATOL)
            for i, m in out.routing.items():
                assert torch.equal(m[:, 0], full.routing[i][:, t])


@pytest.mark.parametrize("variant", CACHE_VARIANTS)
@pytest.mark.parametrize("chunk_size", [1, 5, 11])
def test_moe_and_mode_chunked_prefill_then_decode_equals_full_forward(variant, chunk_size):
    model = _cache_model(variant)
    Bc, Tc, P = 3, 24, 17
    ids = _ids(Bc, Tc)
    full = _full_and_check_routing(model, ids)
    cache = model.make_cache(Bc, 32)
    logits, routing = prefill(model, cache, ids[:, :P], chunk_size=chunk_size)
    torch.testing.assert_close(logits, full.logits[:, P - 1], atol=ATOL, rtol=ATOL)
    for i, m in routing.items():
        assert torch.equal(m, full.routing[i][:, :P])
    for t in range(P, Tc):
        step, _ = decode_one(model, cache, ids[:, t])
        torch.testing.assert_close(step, full.logits[:, t], atol=ATOL, rtol=ATOL)
    # ragged prompts (right padding): each row's last real token gives the full pass's logits there
    lens = torch.tensor([Tc, 15, 6])
    cache = model.make_cache(Bc, 32)
    logits, _ = prefill(model, cache, ids, lens, chunk_size=chunk_size)
    for b in range(Bc):
        torch.testing.assert_close(logits[b], full.logits[b, int(lens[b]) - 1], atol=ATOL, rtol=ATOL)


# ---- 7. training ---------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", THREE)
def test_moe_and_mode_training_lowers_the_loss(variant):
    model = MoDTransformer(_cfg(variant))
    ids = _ids(4, 33, seed=3)
    out = model(ids[:, :-1], ids[:, 1:])
    assert "expert_balance_loss" in out.losses and torch.isfinite(out.losses["expert_balance_loss"])
    assert out.loss_weights["expert_balance_loss"] == model.cfg.moe.balance_loss_weight
    want = out.lm_loss + sum(out.loss_weights[n] * v for n, v in out.losses.items())
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    for i, layer in enumerate(model.layers):
        moe = layer.mlp
        assert isinstance(moe, MoE)
        assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0, i
        for name, p in moe.experts.items():
            assert p.grad is not None and p.grad.abs().sum() > 0, (i, name)
    # the LM loss alone reaches every router (the chosen experts are weighted by their probabilities)
    model.zero_grad(set_to_none=True)
    model(ids[:, :-1], ids[:, 1:]).lm_loss.backward()
    assert all(m.gate.weight.grad.abs().sum() > 0 for m in model.moe_layers)
    # and so does the balancing loss alone
    model.zero_grad(set_to_none=True)
    model(ids[:, :-1], ids[:, 1:]).losses["expert_balance_loss"].backward()
    assert all(m.gate.weight.grad.abs().sum() > 0 for m in model.moe_layers)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(12):
        out = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        first = out.lm_loss.item() if first is None else first
    last = model(ids[:, :-1], ids[:, 1:]).lm_loss.item()
    assert last < 0.85 * first, (first, last)


@pytest.mark.parametrize("variant", ["moe", "integrated_mode"])
def test_expert_bias_moves_toward_balance(variant):
    N, C = 64, E + (variant == "integrated_mode")
    logits = 0.3 * torch.randn(N, C, generator=torch.Generator().manual_seed(4))
    logits[:, 0] += 2.0  # expert 0 overloaded: every token's first choice
    layer, x = _forced_moe(variant, logits, bias_update_rate=0.05)
    layer.eval()
    layer(x)
    assert layer.expert_bias.abs().sum() == 0  # eval forwards leave it
    layer.train()
    layer(x)
    bias = layer.expert_bias.clone()
    # the overloaded expert goes down, the ones below their target share go up
    torch.testing.assert_close(bias, torch.tensor([-0.05] + [0.05] * (C - 1)))
    loads = []
    for _ in range(40):
        layer(x)
        loads.append(layer.stats(x))
    # bias acts on selection only: the router probabilities (the weights) are unchanged
    assert layer.expert_bias.abs().max() > 0.1
    probs, choice, weight = layer.route(x)
    torch.testing.assert_close(probs, torch.softmax(logits, -1))
    torch.testing.assert_close(weight, probs.gather(1, choice))
    layer.eval()
    with torch.no_grad():
        out = layer(x)
        for t in range(8):
            e = int(choice[t, 0])
            want = probs[t, e] * _hand_expert(layer, e, x[t : t + 1])[0] if e < E else torch.zeros(x.shape[1])
            torch.testing.assert_close(out[t], want, atol=1e-6, rtol=1e-5)
    err0 = (torch.tensor([1.0] + [0.0] * (C - 1)) - layer.targets).abs().sum()
    err = (torch.stack(loads[-10:]).mean(0) - layer.targets).abs().sum()
    assert err < 0.5 * err0, (err0, loads[-1])


def test_expert_bias_is_saved_and_moves_in_a_model_train_step():
    model = MoDTransformer(_cfg("moe", bias_update_rate=0.01))
    assert all(f"layers.{i}.mlp.expert_bias" in model.state_dict() for i in range(model.cfg.n_layers))
    ids = _ids(2, 33)
    store, _ = _moe_inputs(model)
    model(ids[:, :-1], ids[:, 1:]).loss.backward()
    for i, m in enumerate(model.moe_layers):
        bias = m.expert_bias.clone()
        m.expert_bias.zero_()
        load = m.stats(store[i])  # the load of that forward (made with a zero bias)
        want = 0.01 * torch.sign(m.targets - load)
        assert want.abs().sum() > 0
        torch.testing.assert_close(bias, want)  # overloaded experts down, underloaded up


# ---- 8. validation -------------------------------------------------------------------------------
def _exit_code(argv) -> int:
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    return excinfo.value.code


@pytest.mark.parametrize("argv, words", [
    (["--moe.top_k", "3", "--moe.n_experts", "4"], ["moe.top_k"]),
    (["--moe.n_experts", "-1"], ["moe.n_experts"]),
    (["--moe.n_experts", "4", "--moe.capacity_factor", "0"], ["moe.capacity_factor"]),
    (["--moe.n_experts", "4", "--moe.noop_fraction", "1"], ["moe.noop_fraction"]),
    (["--moe.n_experts", "4", "--moe.noop", "true"], ["moe.noop", "routing.router"]),
    (["--moe.noop", "true", "--moe.n_experts", "0", "--routing.router", "none"], ["moe.noop", "moe.n_experts"]),
    (["--moe.noop", "true", "--moe.n_experts", "0"], ["moe.noop"]),
    (["--moe.n_experts", "1", "--moe.top_k", "2"], ["moe.top_k"]),
    (["--moe.n_experts", "4", "--moe.impl", "fast"], ["moe.impl"]),
])
def test_moe_flags_validation_is_one_line_exit_2(capsys, argv, words):
    assert _exit_code(["flops", "--preset", "debug", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    for w in words:
        assert w in lines[0], lines[0]


def test_moe_flops_command_prints_active_params(capsys):
    assert main(["flops", "--preset", "debug", "--moe.n_experts", "4", "--routing.router", "none"]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] in ("model", "dense", "moe"):
            rows[cells[0]] = cells
    assert set(rows) == {"model", "dense", "moe"}, out
    header = rows["model"]
    assert "active_params" in header and "params" in header
    moe = dict(zip(header, rows["moe"]))
    dense = dict(zip(header, rows["dense"]))
    total, active = (int(moe[c].replace(",", "")) for c in ("params", "active_params"))
    cfg = _cfg("moe")
    counts = flops.param_counts(cfg)
    assert (total, active) == (counts["total"], counts["active"])
    assert active < total
    # the dense twin has the active size of the MoE (less the MoE routers)
    assert int(dense["params"].replace(",", "")) == int(dense["active_params"].replace(",", ""))
    assert active - int(dense["params"].replace(",", "")) == cfg.n_layers * cfg.dim * E


# ---- 9. parameter counts -------------------------------------------------------------------------
PARAM_VARIANTS = {
    **{name: {} for name in VARIANTS},
    "moe_every_2_wide_untied": dict(moe=dict(every=2, ffn_dim=96), tie_embeddings=False),
    "moe_mlp_bias": dict(mlp_bias=True),
    "mode_noop_fraction_0.25": dict(moe=dict(noop_fraction=0.25)),
}


@pytest.mark.parametrize("name", sorted(PARAM_VARIANTS))
def test_moe_param_counts_total_equals_model(name):
    extra = dict(PARAM_VARIANTS[name])
    base = "integrated_mode" if name.startswith("mode_noop") else (name if name in VARIANTS else "moe")
    cfg = _cfg(base, **extra.pop("moe", {}))
    cfg = dataclasses.replace(cfg, **extra) if extra else cfg
    model = MoDTransformer(cfg)
    counts = flops.param_counts(cfg)
    assert counts["total"] == model.num_params()
    assert counts["non_embedding"] == model.num_params(exclude_embedding=True)
    assert isinstance(counts["active"], int) and counts["active"] < counts["total"]
    # active: the total less the expert weights a token does not use
    m = cfg.moe
    width = m.ffn_dim or cfg.ffn_dim
    used = m.top_k * ((1 - m.noop_fraction) if m.noop else 1)
    idle = sum((m.n_experts - used) * 3 * cfg.dim * width for i in range(cfg.n_layers) if m.is_moe(i))
    assert counts["active"] == round(counts["total"] - idle)
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert expert_params == sum(m.n_experts * 3 * cfg.dim * width for i in range(cfg.n_layers) if m.is_moe(i))
