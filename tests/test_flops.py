"""Analytic FLOP/parameter/KV-byte formulas against `FlopCounterMode` and the model itself (issue 2).

Convention (see `mixdepth.flops`): matmul FLOPs only, attention as the full T x S matrix, which is
what `FlopCounterMode` reports under the math SDPA backend.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mixdepth import flops
from mixdepth.model import MoDTransformer

T, B = 40, 2  # T not a multiple of 8: k = ceil(C*T) must be counted, not C*T

CONFIGS = {
    "dense": dict(routing=dict(router="none")),
    "expert_choice": dict(),
    "token_choice": dict(routing=dict(router="token_choice")),
    "random": dict(routing=dict(router="random")),
    "route_every_1": dict(routing=dict(route_every=1)),
    "mha": dict(n_kv_heads=4),
    "gqa_1kv": dict(n_kv_heads=1),
    "untied": dict(tie_embeddings=False),
    "capacity_0.3": dict(routing=dict(capacity=0.3)),
    "explicit_layers_big_predictor": dict(routing=dict(routed_layers=[0, 2, 3], predictor_hidden=24)),
    "head_dim_override": dict(head_dim=8, n_heads=4, n_kv_heads=2),
    "unit_attn": dict(routing=dict(unit="attn")),
    "unit_mlp": dict(routing=dict(unit="mlp")),
    "random_token": dict(routing=dict(router="random_token")),
}


def _counted(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def _check(counted: float, analytic: float) -> None:
    assert analytic == pytest.approx(counted, rel=0.02)  # the bar
    # the formulas are exact under this convention, so a drift below 2% (a forgotten router) shows too
    assert analytic == pytest.approx(counted, rel=1e-6)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_and_train_step_flops_match_counter(debug_cfg, name):
    cfg = debug_cfg(**CONFIGS[name])
    model = MoDTransformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1))
    _check(_counted(lambda: model(ids[:, :-1])), flops.forward_flops(cfg, T, B))

    def step():
        model(ids[:, :-1], ids[:, 1:]).loss.backward()

    _check(_counted(step), flops.train_step_flops(cfg, T, B))


def test_routed_layers_count_k_not_T(debug_cfg):
    # a routed layer at capacity C costs about C of a dense one (less in attention, quadratic in k)
    cfg = debug_cfg(routing=dict(capacity=0.25, router="random"))
    dense = flops.forward_flops(cfg.with_routing(router="none"), 64)
    mod = flops.forward_flops(cfg, 64)
    per_layer = (dense - 2 * 64 * cfg.dim * cfg.vocab_size) / cfg.n_layers
    assert dense - mod == pytest.approx(2 * per_layer * (1 - 0.25), rel=0.15)
    assert dense - mod > 2 * per_layer * (1 - 0.25)  # attention k^2 saves more than linear


def _other_mode_flops(debug_cfg, mode: str, method: str) -> tuple[int, float]:
    # one routed layer and one row: in causal mode the block runs exactly the tokens that chose it
    cfg = debug_cfg(routing=dict(routed_layers=[1], capacity=0.25, causal_method=method))
    model = MoDTransformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, T))
    frac = None
    if mode == "causal":
        model.calibrate_causal(ids, 0.4)
        frac = float(model(ids, mode="causal").routed_frac[0])
        assert 0 < frac < 1
    counted = _counted(lambda: model(ids, mode=mode))
    return counted, flops.forward_flops(cfg, T, 1, mode=mode, routed_fraction=frac)


OTHER_MODES = [("dense", "predictor"), ("causal", "predictor"), ("causal", "aux_loss")]


@pytest.mark.parametrize("mode, method", OTHER_MODES)
def test_forward_flops_other_modes_within_2_percent(debug_cfg, mode, method):
    counted, analytic = _other_mode_flops(debug_cfg, mode, method)
    assert analytic == pytest.approx(counted, rel=0.02)


@pytest.mark.parametrize("mode, method", OTHER_MODES)
def test_forward_flops_other_modes_exact(debug_cfg, mode, method):
    counted, analytic = _other_mode_flops(debug_cfg, mode, method)
    assert analytic == pytest.approx(counted, rel=1e-6)


@pytest.mark.parametrize("routed, unit", [("none", "block"), ("all", "block"), ("skip", "block"),
                                          ("all", "attn"), ("skip", "attn"), ("all", "mlp"), ("skip", "mlp")])
def test_decode_flops_per_token_match_counter(debug_cfg, routed, unit):
    ctx = 12
    cfg = debug_cfg(routing=dict(router="none" if routed == "none" else "expert_choice", capacity=0.25, unit=unit))
    model = MoDTransformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, ctx + 1))
    f = None
    if routed != "none":
        model.calibrate_causal(ids, 0.5)
        f = 1.0 if routed == "all" else 0.0
        model.set_causal_fraction(f)  # 1: every token routes, 0: none, whatever the scores
    cache = model.make_cache(1, 32)
    model(ids[:, :ctx], mode="causal", cache=cache, input_pos=torch.tensor([0]))
    counted = _counted(lambda: model(ids[:, ctx:], mode="causal", cache=cache, input_pos=torch.tensor([ctx])))
    if routed != "none" and unit != "mlp":
        assert all(int(v[0]) == (ctx + 1 if f else 0) for v in cache.routed_counts().values())
    if unit == "mlp":  # attention runs for every token: each layer caches every token
        assert not cache.routed_counts() and all(int(layer.lengths[0]) == ctx + 1 for layer in cache.layers)
    _check(counted, flops.decode_flops_per_token(cfg, ctx, routed_fraction=f))


@pytest.mark.parametrize("unit", ["block", "attn", "mlp"])
def test_kv_bytes_per_token_match_cache(debug_cfg, unit):
    cfg = debug_cfg(routing=dict(routed_layers=[1], capacity=0.25, unit=unit))
    model = MoDTransformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, T))
    model.calibrate_causal(ids, 0.3)
    cache = model.make_cache(1, 64)
    model(ids, mode="causal", cache=cache, input_pos=torch.tensor([0]))
    frac = int(cache.routed_counts()[1][0]) / T if unit != "mlp" else 1.0
    assert 0 < frac < 1 or unit == "mlp"
    got = cache.bytes_in_use()
    assert flops.kv_bytes_per_token(cfg, 4, routed_fraction=frac) * T == pytest.approx(got)
    assert flops.kv_bytes_per_token(cfg.with_routing(router="none"), 4) * T == cache.dense_bytes()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_param_counts_total_equals_model(debug_cfg, name):
    cfg = debug_cfg(**CONFIGS[name])
    model = MoDTransformer(cfg)
    counts = flops.param_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] == model.num_params()
    assert counts["non_embedding"] == model.num_params(exclude_embedding=True)
    assert counts["routers"] == sum(p.numel() for n, p in model.named_parameters() if ".router." in n)
    assert counts["predictors"] == sum(p.numel() for n, p in model.named_parameters() if ".predictor." in n)


def test_steps_for_budget_consistent_with_train_step_flops(debug_cfg):
    cfg = debug_cfg()
    dense = cfg.with_routing(router="none")
    step = flops.train_step_flops(cfg, 64, 4)
    assert flops.steps_for_budget(cfg, 10.5 * step, 64, 4) == 10
    assert flops.steps_for_budget(cfg, 10 * step, 64, 4) in (9, 10)  # float rounding at the edge
    assert flops.steps_for_budget(cfg, 0.1 * step, 64, 4) == 1
    budget = 1e12
    n_mod, n_dense = flops.steps_for_budget(cfg, budget, 64, 4), flops.steps_for_budget(dense, budget, 64, 4)
    assert n_mod * step <= budget < (n_mod + 1) * step
    assert n_mod > n_dense  # isoFLOP: MoD gets more steps for the same budget
    assert flops.train_step_flops(cfg, 64, 4) == pytest.approx(4 * flops.train_step_flops(cfg, 64, 1))
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="budget"):
            flops.steps_for_budget(cfg, bad, 64, 4)


@pytest.mark.parametrize("kind", ["train", "prefill", "decode"])
def test_ideal_speedup(debug_cfg, kind):
    mod = debug_cfg(routing=dict(capacity=0.125))
    assert flops.ideal_speedup(mod, 128, kind, context_len=128) > 1
    assert flops.ideal_speedup(debug_cfg(routing=dict(capacity=0.5)), 128, kind, context_len=128) < \
        flops.ideal_speedup(mod, 128, kind, context_len=128)
    assert flops.ideal_speedup(mod.with_routing(router="none"), 128, kind, context_len=128) == 1.0
    # capacity 1 on every other block costs a little more than dense (routers, predictors)
    assert flops.ideal_speedup(debug_cfg(routing=dict(capacity=1.0)), 128, kind, context_len=128) < 1.0


def test_ideal_speedup_near_paper_ratio():
    # a wide model, where matmuls dominate: every other block at C=0.125 costs about 0.5 + 0.5*C of dense
    from mixdepth.config import ModelConfig

    cfg = ModelConfig.from_name("small", routing=dict(capacity=0.125))
    s = flops.ideal_speedup(cfg, 256)
    assert 1 / (0.5 + 0.5 * 0.125) * 0.9 < s < 1 / (0.5 + 0.5 * 0.125) * 1.2
    with pytest.raises(ValueError, match="kind"):
        flops.ideal_speedup(cfg, 256, "sample")


def test_flops_table_rows(debug_cfg):
    rows = flops.flops_table(debug_cfg(), 64, 2)
    assert [r["model"] for r in rows] == ["dense", "expert_choice"]
    assert rows[0]["train_ratio_vs_dense"] == 1.0 and rows[1]["train_ratio_vs_dense"] < 1.0
    assert rows[1]["params"] > rows[0]["params"]  # routers and predictors
    text = flops.format_table(rows)
    assert len(text.splitlines()) == 3 and "expert_choice" in text
