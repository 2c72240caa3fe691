"""Mixture-of-Depths routing: the paper's properties and the bugs public implementations had.

Every check here reads the model from the outside (routing masks, forward hooks, gradients) or
recomputes a routed layer by hand from its own weights, so a wrong gather, gate, position id,
residual or detach shows up as a failure.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixdepth.model import MoDBlock, MoDTransformer
from mixdepth.model.routers import RandomRouter, chosen_first, topk_indices

T = 32
VOCAB = 256


def _ids(B: int = 2, T: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _hand_gate(gate: str, router: str, r: torch.Tensor) -> torch.Tensor:
    """The block-output scale written out from the config, independently of `MoDBlock.gate`."""
    if router == "random":
        return torch.ones_like(r)
    return {"raw": r, "sigmoid": torch.sigmoid(r), "straight_through": torch.ones_like(r)}[gate]


def _hand_routed_layer(layer: MoDBlock, rope, x: torch.Tensor, chosen: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x + gate(r) * f(x_chosen) for the chosen tokens, x elsewhere; row by row, original positions."""
    rc = layer.rc
    out = x.clone()
    for b in range(x.shape[0]):
        idx = chosen[b].nonzero().squeeze(1)  # ascending original positions
        if idx.numel() == 0:
            continue
        cos, sin = rope(idx)
        delta = layer.delta(x[b : b + 1, idx], cos, sin)[0]  # (k, D)
        out[b, idx] = x[b, idx] + _hand_gate(rc.gate, rc.router, r[b, idx])[:, None] * delta
    return out


# ---- top-k selection ----------------------------------------------------------------------------
@pytest.mark.parametrize("router", ["expert_choice", "random"])
@pytest.mark.parametrize("capacity, k", [(0.125, 4), (0.3, 10), (0.5, 16), (1.0, 32)])
def test_topk_chooses_exactly_k_per_row(debug_cfg, router, capacity, k):
    model = MoDTransformer(debug_cfg(router=router, capacity=capacity))
    out = model(_ids(3), return_routing=True)
    assert sorted(out.routing) == model.cfg.routed_layer_ids == [1, 3]
    for mask in out.routing.values():
        assert mask.shape == (3, T) and mask.dtype == torch.bool
        assert mask.sum(1).tolist() == [k, k, k]
    torch.testing.assert_close(out.routed_frac, torch.full((2,), k / T))


def test_topk_picks_highest_router_scores(debug_cfg):
    model = MoDTransformer(debug_cfg(capacity=0.25))
    layer = model.layers[1]
    x = torch.randn(3, T, model.cfg.dim)
    out, info = layer(x, model.rope, torch.arange(T)[None], mode="topk")
    r = x @ layer.router.weight[0]  # (B, T): the router reads the residual stream, before the norm
    want = torch.zeros(3, T, dtype=torch.bool).scatter(1, r.topk(8, dim=1).indices, True)
    assert torch.equal(info["chosen"], want)


def test_topk_indices_sorted_and_deterministic():
    scores = torch.randn(4, 50)
    idx = topk_indices(scores, 7)
    assert idx.shape == (4, 7)
    assert torch.all(idx[:, 1:] > idx[:, :-1])  # original order kept
    assert torch.equal(idx, scores.topk(7, dim=1).indices.sort(dim=1).values)
    assert torch.equal(idx, topk_indices(scores.clone(), 7))
    ties = torch.zeros(2, 10)
    assert torch.equal(topk_indices(ties, 3), topk_indices(ties.clone(), 3))
    assert topk_indices(scores, 50).tolist() == [list(range(50))] * 4


def test_chosen_first_orders_valid_tokens_first():
    chosen = torch.tensor([[False, True, False, True, True], [True, False, False, False, False]])
    idx, ok = chosen_first(chosen, 3)
    assert idx.tolist()[0] == [1, 3, 4] and ok.tolist()[0] == [True, True, True]
    assert idx.tolist()[1][0] == 0 and ok.tolist()[1] == [True, False, False]


# ---- the block runs on k tokens, in order --------------------------------------------------------
@pytest.mark.parametrize("router", ["expert_choice", "token_choice", "random"])
def test_block_runs_on_k_gathered_tokens_in_order(debug_cfg, router):
    capacity = 0.25
    model = MoDTransformer(debug_cfg(router=router, capacity=capacity))
    k = model.cfg.routing.k(T)
    seen_q: dict[int, torch.Tensor] = {}
    seen_mlp: dict[int, tuple] = {}
    layer_in: dict[int, torch.Tensor] = {}
    hooks = []
    for layer in model.layers:
        i = layer.layer_id
        hooks.append(layer.self_attn.q_proj.register_forward_hook(lambda m, a, o, i=i: seen_q.__setitem__(i, a[0])))
        hooks.append(layer.mlp.register_forward_hook(lambda m, a, o, i=i: seen_mlp.__setitem__(i, a[0].shape)))
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: layer_in.__setitem__(i, a[0])))
    out = model(_ids(2), return_routing=True)
    for h in hooks:
        h.remove()
    D = model.cfg.dim
    for layer in model.layers:
        i = layer.layer_id
        if layer.routed:
            # shape probe: the attention and MLP see k tokens, not T (real compute skipping)
            assert seen_q[i].shape == (2, k, D) and seen_mlp[i] == (2, k, D)
            # and they are the chosen tokens, in their original order
            mask = out.routing[i]
            normed = layer.input_layernorm(layer_in[i])
            for b in range(2):
                n = int(mask[b].sum())
                torch.testing.assert_close(seen_q[i][b, :n], normed[b, mask[b]])
        else:
            assert seen_q[i].shape == (2, T, D) and seen_mlp[i] == (2, T, D)


# ---- the routed layer's arithmetic --------------------------------------------------------------
@pytest.mark.parametrize("router, gate, mode", [
    (router, gate, mode)
    for router, gate in [("expert_choice", "raw"), ("expert_choice", "sigmoid"), ("expert_choice", "straight_through"),
                         ("token_choice", "sigmoid"), ("token_choice", "raw"), ("random", "sigmoid")]
    for mode in ("topk", "causal")
    if not (router == "random" and mode == "causal")  # random routing has no causal mode (tested below)
])
def test_routed_layer_equals_hand_computation(debug_cfg, router, gate, mode):
    model = MoDTransformer(debug_cfg(router=router, gate=gate, capacity=0.25))
    layer = model.layers[1]
    B, D = 3, model.cfg.dim
    x = torch.randn(B, T, D)
    if router == "token_choice":
        with torch.no_grad():
            # rows 1 and 2 have fewer than k = 8 tokens asking for the block (3 and 5): the k slots are
            # filled with padding, which must get no output and must not be attended by a chosen token
            u = layer.router.weight[1] - layer.router.weight[0]  # r = x . u
            for b, n in ((1, 3), (2, 5)):
                top = (x[b] @ u).topk(n + 1).values
                x[b] -= (top[n - 1] + top[n]) / 2 * u / u.dot(u)
            assert (layer.router(x) > 0).sum(1)[1:].tolist() == [3, 5]
    if mode == "causal":
        with torch.no_grad():
            score = layer.router.causal_score(x, layer.router(x))
            layer.causal_threshold.fill_(float(score.quantile(0.7)))
    out, info = layer(x, model.rope, torch.arange(T)[None], mode=mode)
    chosen = info["chosen"]
    assert chosen.any() and not chosen.all()
    # unchosen tokens pass EXACTLY unchanged: no gate on the residual, no double residual, no padding leak
    assert torch.equal(out[~chosen], x[~chosen])
    # chosen tokens: x + gate(r) * f(x_chosen), f run on the chosen tokens alone at their original positions
    r = layer.router(x)
    want = _hand_routed_layer(layer, model.rope, x, chosen, r)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[chosen], x[chosen])  # the block did something


def test_hand_computation_detects_renumbered_positions(debug_cfg):
    # the check above has teeth: RoPE positions renumbered 0..k-1 would give different outputs
    model = MoDTransformer(debug_cfg(capacity=0.25))
    layer = model.layers[1]
    x = torch.randn(1, T, model.cfg.dim)
    out, info = layer(x, model.rope, torch.arange(T)[None], mode="topk")
    idx = info["chosen"][0].nonzero().squeeze(1)
    assert idx.tolist() != list(range(len(idx)))
    cos, sin = model.rope(torch.arange(len(idx)))
    wrong = x[0, idx] + torch.sigmoid(layer.router(x)[0, idx])[:, None] * layer.delta(x[:, idx], cos, sin)[0]
    assert not torch.allclose(out[0, idx], wrong, atol=1e-4)


@pytest.mark.parametrize("gate", ["raw", "sigmoid", "straight_through"])
@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
def test_lm_loss_gradient_reaches_router(debug_cfg, gate, router):
    # aux losses off: the only path from the LM loss to the router is the gate on the block output
    model = MoDTransformer(debug_cfg(router=router, gate=gate, capacity=0.25, aux_loss_weight=0.0,
                                     balance_loss_weight=0.0))
    ids = _ids(2, T + 1)
    out = model(ids[:, :-1], ids[:, 1:])
    assert out.losses.get("aux_loss") is None
    out.lm_loss.backward()
    for layer in model.routed_layers:
        g = layer.router.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


# ---- capacity 1.0 / dense mode equal the dense model ----------------------------------------------
@pytest.mark.parametrize("capacity, mode", [(1.0, "topk"), (1.0, "dense"), (0.125, "dense")])
def test_full_capacity_straight_through_equals_dense_model(debug_cfg, capacity, mode):
    cfg = debug_cfg(capacity=capacity, gate="straight_through", route_every=1)
    mod = MoDTransformer(cfg)
    dense = MoDTransformer(cfg.with_routing(router="none"))
    result = dense.load_state_dict(mod.state_dict(), strict=False)
    assert result.missing_keys == []
    extra = {k.split(".", 2)[2].split(".")[0] for k in result.unexpected_keys}
    assert extra == {"router", "predictor", "causal_threshold", "threshold_table"}
    ids = _ids(2)
    want = dense(ids).logits
    got = mod(ids, mode=mode).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dense_mode_sigmoid_gate_differs_from_dense_model(debug_cfg):
    # the comparison above has teeth: a gate that is not 1 changes the function
    cfg = debug_cfg(capacity=1.0, gate="sigmoid")
    mod = MoDTransformer(cfg)
    dense = MoDTransformer(cfg.with_routing(router="none"))
    dense.load_state_dict(mod.state_dict(), strict=False)
    ids = _ids(1)
    assert not torch.allclose(mod(ids, mode="dense").logits, dense(ids).logits, atol=1e-4)


# ---- causality ----------------------------------------------------------------------------------
@pytest.mark.parametrize("router, method", [
    ("expert_choice", "predictor"), ("expert_choice", "aux_loss"), ("token_choice", "predictor"),
])
@pytest.mark.parametrize("p", [5, 20, 31])
def test_causal_mode_is_causal(debug_cfg, router, method, p):
    model = MoDTransformer(debug_cfg(router=router, causal_method=method, capacity=0.25))
    ids = _ids(3)
    model.calibrate_causal(ids, 0.3)
    ids2 = ids.clone()
    ids2[:, p] = (ids2[:, p] + 17) % VOCAB
    ids2[:, p + 1 :] = _ids(3, seed=9)[:, p + 1 :]  # and everything after it
    a = model(ids, mode="causal", return_routing=True)
    b = model(ids2, mode="causal", return_routing=True)
    assert any(m.any() for m in a.routing.values()), "calibration should route some tokens"
    torch.testing.assert_close(a.logits[:, :p], b.logits[:, :p], atol=1e-5, rtol=1e-5)
    for i in a.routing:
        assert torch.equal(a.routing[i][:, :p], b.routing[i][:, :p])
    assert not torch.allclose(a.logits[:, p], b.logits[:, p])


def test_topk_mode_is_not_causal(debug_cfg):
    """Why causal mode exists: in top-k mode a future token can evict an earlier one from the block."""
    model = MoDTransformer(debug_cfg(capacity=0.25))
    layer = model.layers[1]
    x = torch.randn(1, T, model.cfg.dim)
    pos = torch.arange(T)[None]
    out, info = layer(x, model.rope, pos, mode="topk")
    t = int((~info["chosen"][0]).nonzero().max())  # the last token that skipped
    assert info["chosen"][0, :t].any()
    x2 = x.clone()
    w = layer.router.weight[0]
    x2[0, t] = 100 * w / w.norm() ** 2  # router score 100: now the top token
    out2, info2 = layer(x2, model.rope, pos, mode="topk")
    assert info2["chosen"][0, t]
    # exactly one earlier token lost its place, so earlier outputs changed because of a later token
    assert (info["chosen"][0, :t] & ~info2["chosen"][0, :t]).sum() == 1
    assert not torch.allclose(out[:, :t], out2[:, :t])
    # the same change in causal mode leaves every earlier decision and output alone
    with torch.no_grad():
        layer.causal_threshold.fill_(float(layer.router.causal_score(x, layer.router(x)).quantile(0.75)))
    c1, i1 = layer(x, model.rope, pos, mode="causal")
    c2, i2 = layer(x2, model.rope, pos, mode="causal")
    assert torch.equal(i1["chosen"][:, :t], i2["chosen"][:, :t])
    torch.testing.assert_close(c1[:, :t], c2[:, :t], atol=1e-6, rtol=1e-6)


# ---- the predictor ------------------------------------------------------------------------------
def test_predictor_inputs_are_detached(debug_cfg):
    model = MoDTransformer(debug_cfg(capacity=0.25))
    ids = _ids(2, T + 1)
    out = model(ids[:, :-1], ids[:, 1:])
    assert out.losses.get("predictor_loss") is not None and out.losses.get("predictor_loss").requires_grad
    out.losses.get("predictor_loss").backward(retain_graph=True)
    for name, param in model.named_parameters():
        if ".predictor." in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None or param.grad.abs().sum() == 0, f"predictor loss reached {name}"
    model.zero_grad(set_to_none=True)
    out.lm_loss.backward()
    for name, param in model.named_parameters():
        if ".predictor." in name:
            assert param.grad is None or param.grad.abs().sum() == 0, f"lm loss reached {name}"
    assert model.layers[1].router.weight.grad.abs().sum() > 0


def test_total_loss_is_weighted_sum(debug_cfg):
    model = MoDTransformer(debug_cfg(aux_loss_weight=0.3, predictor_loss_weight=0.7))
    ids = _ids(2, T + 1)
    out = model(ids[:, :-1], ids[:, 1:])
    torch.testing.assert_close(out.loss,
                               out.lm_loss + 0.3 * out.losses["aux_loss"] + 0.7 * out.losses["predictor_loss"])
    torch.testing.assert_close(
        out.lm_loss, F.cross_entropy(out.logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)))
    assert out.causal_acc.shape == (2,) and ((0 <= out.causal_acc) & (out.causal_acc <= 1)).all()


def test_aux_loss_is_bce_against_topk_membership(debug_cfg):
    model = MoDTransformer(debug_cfg(capacity=0.25, route_every=4))  # one routed layer: 3
    layer = model.layers[3]
    seen = {}
    layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    out = model(_ids(2), return_routing=True)
    r = layer.router(seen["x"])
    torch.testing.assert_close(out.losses["aux_loss"], F.binary_cross_entropy_with_logits(r, out.routing[3].float()))


# ---- token choice -------------------------------------------------------------------------------
def test_token_choice_respects_capacity(debug_cfg):
    model = MoDTransformer(debug_cfg(router="token_choice", capacity=0.125))
    layer = model.layers[1]
    k = model.cfg.routing.k(T)
    x = torch.randn(4, T, model.cfg.dim)
    r = layer.router(x)
    wants = r > 0
    assert (wants.sum(1) > k).any(), "the test needs rows where more than k tokens ask for the block"
    out, info = layer(x, model.rope, torch.arange(T)[None], mode="topk")
    chosen = info["chosen"]
    assert (chosen.sum(1) <= k).all()
    assert torch.equal(chosen.sum(1), wants.sum(1).clamp(max=k))
    assert not (chosen & ~wants).any()  # only tokens that asked get in
    # overflow is decided by the router score: the chosen ones are the highest of those that asked
    for b in range(4):
        overflow = wants[b] & ~chosen[b]
        if chosen[b].any() and overflow.any():
            assert r[b][chosen[b]].min() >= r[b][overflow].max()


def test_token_choice_nobody_wants_the_block(debug_cfg):
    model = MoDTransformer(debug_cfg(router="token_choice"))
    layer = model.layers[1]
    with torch.no_grad():
        layer.router.weight[1] = layer.router.weight[0]  # r = 0 everywhere: no token asks
    x = torch.randn(2, T, model.cfg.dim)
    out, info = layer(x, model.rope, torch.arange(T)[None], mode="topk")
    assert not info["chosen"].any()
    assert torch.equal(out, x)


def test_token_choice_balance_loss(debug_cfg):
    model = MoDTransformer(debug_cfg(router="token_choice", capacity=0.25))
    ids = _ids(2, T + 1)
    out = model(ids[:, :-1], ids[:, 1:])
    assert out.losses.get("balance_loss") is not None and torch.isfinite(out.losses.get("balance_loss"))
    assert out.losses.get("balance_loss") > 0
    assert out.losses.get("aux_loss") is None and out.losses.get("predictor_loss") is None
    out.losses.get("balance_loss").backward()
    for layer in model.routed_layers:
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    # at the target fractions the loss is exactly 1
    from mixdepth.model.routers import balance_loss

    r = torch.tensor([[2.0, -2.0, -2.0, -2.0]])
    p = torch.sigmoid(r).mean()
    torch.testing.assert_close(balance_loss(r, 0.25), 0.25 * p / 0.25 + 0.75 * (1 - p) / 0.75)


# ---- random routing ------------------------------------------------------------------------------
def test_random_router(debug_cfg):
    model = MoDTransformer(debug_cfg(router="random", capacity=0.25))
    assert not model.can_decode_causally
    assert MoDTransformer(debug_cfg()).can_decode_causally
    assert MoDTransformer(debug_cfg(router="token_choice")).can_decode_causally
    assert not any("router" in k for k in model.state_dict())  # no parameters
    ids = _ids(2)
    a = model(ids, return_routing=True).routing[1]
    b = model(ids, return_routing=True).routing[1]
    assert a.sum(1).tolist() == [8, 8] and b.sum(1).tolist() == [8, 8]
    assert not torch.equal(a, b)  # random, not a fixed pattern
    with pytest.raises(ValueError) as excinfo:
        model(ids, mode="causal")
    msg = str(excinfo.value)
    assert "\n" not in msg and "random" in msg


def test_random_router_is_uniform():
    x = torch.zeros(1, 20, 4)
    counts = torch.zeros(20)
    for _ in range(2000):
        counts[topk_indices(RandomRouter()(x), 5)[0]] += 1
    freq = counts / 2000
    assert ((freq - 0.25).abs() < 0.05).all(), freq


# ---- batches ------------------------------------------------------------------------------------
@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
def test_rows_are_routed_independently(debug_cfg, router):
    model = MoDTransformer(debug_cfg(router=router, capacity=0.25))
    ids = _ids(3)
    full = model(ids, return_routing=True)
    for b in range(3):
        alone = model(ids[b : b + 1], return_routing=True)
        torch.testing.assert_close(full.logits[b : b + 1], alone.logits, atol=1e-5, rtol=1e-5)
        for i in full.routing:
            assert torch.equal(full.routing[i][b : b + 1], alone.routing[i])
    # rows with different tokens route differently (so the check above is not trivial)
    assert not torch.equal(full.routing[1][0], full.routing[1][1])


# ---- forward input checks -----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, word", [
    (dict(input_ids=torch.zeros(2, 4, dtype=torch.long), mode="fast"), "mode"),
    (dict(input_ids=torch.full((1, 4), VOCAB)), "out of range"),
    (dict(input_ids=torch.zeros(4, dtype=torch.long)), "input_ids"),
    (dict(input_ids=torch.zeros(1, 200, dtype=torch.long)), "max_seq_len"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "empty"),
])
def test_forward_bad_input_is_one_line(debug_cfg, kwargs, word):
    model = MoDTransformer(debug_cfg())
    with pytest.raises(ValueError) as excinfo:
        model(**kwargs)
    assert word in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_calibrate_causal_hits_the_fraction(debug_cfg):
    model = MoDTransformer(debug_cfg(capacity=0.25))
    ids = _ids(4, 64)
    thresholds = model.calibrate_causal(ids, 0.3)
    assert len(thresholds) == 2
    frac = model(ids, mode="causal").routed_frac
    assert ((frac - 0.3).abs() < 0.03).all(), frac
    model.set_causal_fraction(0.6)
    frac = model(ids, mode="causal").routed_frac
    assert ((frac - 0.6).abs() < 0.05).all(), frac
    # the ends mean every token and no token, for any input (not the calibration extremes)
    other = _ids(4, 64, seed=11)
    model.set_causal_fraction(1.0)
    assert (model(other, mode="causal").routed_frac == 1).all()
    model.set_causal_fraction(0.0)
    assert (model(other, mode="causal").routed_frac == 0).all()
    with pytest.raises(ValueError, match="fraction"):
        model.set_causal_fraction(1.5)


# ---- learning -----------------------------------------------------------------------------------
def test_debug_model_overfits_one_batch(debug_cfg):
    model = MoDTransformer(debug_cfg())
    assert model.cfg.routed_layer_ids and model.cfg.routing.capacity == 0.125
    ids = _ids(4, 65, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(100):
        out = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.lm_loss.item()
    last = model(ids[:, :-1], ids[:, 1:]).lm_loss.item()
    assert first > 5.0  # about ln(256) at the start
    assert last < 1.0 and last < 0.3 * first, (first, last)


# ---- calibration of the causal decision, with ties --------------------------------------------------
def test_thresholds_for_fractions_lie_between_distinct_scores():
    from mixdepth.model.mod import thresholds_for_fractions

    # three clumps (50%, 30%, 20% of the tokens) with rounding noise far below the gaps
    scores = torch.cat([torch.zeros(50), torch.ones(30), torch.full((20,), 2.0)])
    scores = scores + 1e-9 * torch.randn(100)
    t = thresholds_for_fractions(scores, torch.tensor([0.0, 0.2, 0.3, 0.45, 0.5, 0.9, 1.0]))
    routed = [(scores > v).float().mean().item() for v in t]
    # as near each target as the clumps allow (0.3 is as far from 0.2 as from 0.5: the fewer tokens)
    assert routed == pytest.approx([0.0, 0.2, 0.2, 0.5, 0.5, 1.0, 1.0])
    assert t[0] == float("inf") and t[-1] == float("-inf")
    torch.testing.assert_close(t[1:5], torch.tensor([1.5, 1.5, 0.5, 0.5]), atol=1e-6, rtol=0)
    # continuous scores: the fraction is hit to the token
    s = torch.randn(1000)
    for f in (0.125, 0.5, 0.873):
        th = thresholds_for_fractions(s, torch.tensor([f]))[0]
        assert (s > th).sum().item() == round(f * 1000)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_calibration_with_every_block_routing_on_bytes(seed):
    """Every block routed, byte vocabulary, real text: a token that skipped every earlier routed
    layer still holds its embedding, so scores come in clumps of equal values. Calibration must
    still route near the target in every layer (no threshold on a clump), and cached decoding must
    decide exactly as the full causal forward."""
    from pathlib import Path

    from mixdepth import ModelConfig
    from mixdepth.model.mod import TIE_TOLERANCE

    text = list((Path(__file__).parent / "data" / "sonnets.txt").read_bytes()[:30000])
    torch.manual_seed(seed)
    model = MoDTransformer(ModelConfig.from_name("debug", routing=dict(route_every=1))).eval()
    x = torch.tensor(text[: 48 * 128]).view(48, 128)
    with torch.no_grad():
        model.calibrate_causal(x, 0.125)
        out = model(x, mode="causal", return_scores=True)
    for j, layer in enumerate(model.routed_layers):
        s = out.scores[layer.layer_id]
        # as near the target as the clumps of equal scores allow (a threshold cannot split a clump)
        flat = s.flatten().double()
        achievable = torch.stack([(flat > v).double().mean() for v in flat.unique()] + [torch.tensor(1.0).double()])
        best = float((achievable - 0.125).abs().min())
        assert abs(float(out.routed_frac[j]) - 0.125) <= best + 0.01, (out.routed_frac, best)
        assert abs(float(out.routed_frac[j]) - 0.125) < 0.1, out.routed_frac
        t = layer.causal_threshold
        # never on a calibration score: at least half the tie tolerance away from every one
        assert (s - t).abs().min() > 0.5 * TIE_TOLERANCE * s.abs().max()
    y = torch.tensor(text[20000:20000 + 3 * 96]).view(3, 96)
    with torch.no_grad():
        full = model(y, mode="causal", return_routing=True)
        cache = model.make_cache(3, 128)
        for t in range(y.shape[1]):
            step = model(y[:, t : t + 1], mode="causal", cache=cache, return_routing=True)
            for i, m in step.routing.items():
                assert torch.equal(m[:, 0], full.routing[i][:, t]), (i, t)


# ---- a new router is one class ------------------------------------------------------------------------
def test_a_new_router_is_one_registered_class():
    """A router defined here, in one class, trains (with its own named loss), decodes causally with
    the cache, and is counted by `flops`, without any change to the model, flops or the config."""
    from mixdepth import ModelConfig, flops
    from mixdepth.config import ROUTERS
    from mixdepth.model.routers import ROUTER_CLASSES, LinearRouter, register_router

    @register_router("test_threshold")
    class ThresholdRouter(LinearRouter):
        """Tokens with r > 0 ask for the block, at most k get it; a z-loss keeps r small."""

        def __init__(self, cfg):
            super().__init__(cfg)
            self.loss_weights = {"z_loss": 0.5}

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight).squeeze(-1).float()

        def select(self, r, k):
            idx = topk_indices(r, k)
            return idx, r.gather(1, idx) > 0

        def topk_terms(self, x, r, chosen):
            return {"z_loss": r.pow(2).mean()}, r.detach()

    try:
        cfg = ModelConfig.from_name("debug", routing=dict(router="test_threshold", capacity=0.25))
        model = MoDTransformer(cfg)
        ids = _ids(2, T + 1)
        out = model(ids[:, :-1], ids[:, 1:])
        assert set(out.losses) == {"z_loss"} and out.loss_weights == {"z_loss": 0.5}
        torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.losses["z_loss"])
        out.loss.backward()
        assert model.layers[1].router.weight.grad.abs().sum() > 0
        counts = flops.param_counts(cfg)
        assert counts["total"] == sum(p.numel() for p in model.parameters())
        assert counts["routers"] == len(cfg.routed_layer_ids) * cfg.dim
        model.eval()
        with torch.no_grad():
            model.calibrate_causal(_ids(4, T), 0.5)
            full = model(ids, mode="causal")
            cache = model.make_cache(2, T + 1)
            steps = [model(ids[:, t : t + 1], mode="causal", cache=cache).logits for t in range(T + 1)]
        torch.testing.assert_close(torch.cat(steps, 1), full.logits, atol=1e-5, rtol=1e-5)
    finally:
        ROUTER_CLASSES.pop("test_threshold", None)
        if "test_threshold" in ROUTERS:
            ROUTERS.remove("test_threshold")
