"""Config validation, JSON round trip, presets and `k(T)` (issue 2: bad config values give one-line errors)."""

from __future__ import annotations

import json
import logging
import math

import pytest

from mixdepth.config import PRESETS, ModelConfig, RoutingConfig


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, f"error must be one non-empty line, got {msg!r}"
    return msg


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(capacity=1.0001), "routing.capacity"),
        (dict(capacity=1.5), "routing.capacity"),
        (dict(capacity=-0.1), "routing.capacity"),
        (dict(router="moe"), "routing.router"),
        (dict(gate="tanh"), "routing.gate"),
        (dict(mode="sample"), "routing.mode"),
        (dict(causal_method="oracle"), "routing.causal_method"),
        (dict(route_every=0), "routing.route_every"),
        (dict(routed_layers=[-1]), "routing.routed_layers"),
        (dict(aux_loss_weight=-1.0), "routing.aux_loss_weight"),
        (dict(predictor_loss_weight=-0.5), "routing.predictor_loss_weight"),
        (dict(balance_loss_weight=-1e-3), "routing.balance_loss_weight"),
        (dict(router_init_std=-1.0), "routing.router_init_std"),
        (dict(predictor_hidden=-4), "routing.predictor_hidden"),
    ],
)
def test_routing_bad_value_is_one_line_naming_field(kwargs, field):
    with pytest.raises(ValueError) as excinfo:
        RoutingConfig(**kwargs)
    msg = _one_line_error(excinfo)
    assert field in msg
    # the bad value itself is shown, so the user sees what was wrong
    assert str(next(iter(kwargs.values()))) in msg


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(dim=64, n_heads=3), ["model.dim", "model.n_heads"]),
        (dict(n_heads=4, n_kv_heads=3), ["model.n_heads", "model.n_kv_heads"]),
        (dict(dim=0), ["model.dim"]),
        (dict(n_layers=-2), ["model.n_layers"]),
        (dict(vocab_size=0), ["model.vocab_size"]),
        (dict(head_dim=7), ["model.head_dim"]),
        (dict(norm_eps=0.0), ["model.norm_eps"]),
        (dict(rope_theta=-1.0), ["model.rope_theta"]),
        (dict(init_std=0.0), ["model.init_std"]),
        (dict(n_layers=4, routing=dict(routed_layers=[1, 4])), ["routing.routed_layers", "model.n_layers"]),
    ],
)
def test_model_bad_value_is_one_line_naming_field(kwargs, words):
    with pytest.raises(ValueError) as excinfo:
        ModelConfig(**kwargs)
    msg = _one_line_error(excinfo)
    for w in words:
        assert w in msg


def test_routed_layers_at_last_index_is_accepted():
    cfg = ModelConfig(n_layers=4, routing=dict(routed_layers=[3, 0, 3]))
    # deduplicated and sorted, so layer ids are unambiguous
    assert cfg.routing.routed_layers == [0, 3]
    assert cfg.routed_layer_ids == [0, 3]


def test_unknown_preset_is_one_line():
    with pytest.raises(ValueError) as excinfo:
        ModelConfig.from_name("gigantic")
    assert "gigantic" in _one_line_error(excinfo)


@pytest.mark.parametrize(
    "routing, expected",
    [
        (dict(), [1, 3, 5]),  # every other block, starting dense
        (dict(route_every=1), [0, 1, 2, 3, 4, 5]),
        (dict(route_every=3), [2, 5]),
        (dict(routed_layers=[0, 4]), [0, 4]),
        (dict(router="none"), []),
    ],
)
def test_routed_layer_ids(routing, expected):
    assert ModelConfig(n_layers=6, routing=routing).routed_layer_ids == expected


def test_json_round_trip_with_nested_routing(tmp_path):
    cfg = ModelConfig.from_name(
        "debug", tie_embeddings=False, n_kv_heads=1,
        routing=dict(router="token_choice", capacity=0.3, routed_layers=[0, 2], gate="raw", mode="causal",
                     causal_method="aux_loss", aux_loss_weight=0.05, predictor_hidden=12),
    )
    path = tmp_path / "config.json"
    cfg.to_json(path)
    on_disk = json.loads(path.read_text())
    assert isinstance(on_disk["routing"], dict) and on_disk["routing"]["capacity"] == 0.3
    back = ModelConfig.from_json(path)
    assert back == cfg
    assert isinstance(back.routing, RoutingConfig)
    assert back.routing.routed_layers == [0, 2]
    # dict round trip too, and it is a fixed point
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict(back.to_dict()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("where", ["model", "routing"])
def test_unknown_key_rejected(where):
    d = ModelConfig.from_name("debug").to_dict()
    if where == "model":
        d["n_layer"] = 3
        name = "n_layer"
    else:
        d["routing"]["capcity"] = 0.5
        name = "routing.capcity"
    with pytest.raises(ValueError) as excinfo:
        ModelConfig.from_dict(d)
    assert name in _one_line_error(excinfo)


def test_missing_keys_take_defaults(caplog):
    with caplog.at_level(logging.INFO, logger="mixdepth"):
        cfg = ModelConfig.from_dict({"dim": 32, "n_heads": 2, "routing": {"capacity": 0.25}})
    defaults = ModelConfig()
    assert cfg.dim == 32 and cfg.n_heads == 2 and cfg.routing.capacity == 0.25
    assert cfg.n_layers == defaults.n_layers and cfg.vocab_size == defaults.vocab_size
    assert cfg.routing.router == RoutingConfig().router and cfg.routing.gate == RoutingConfig().gate
    assert cfg.head_dim == 16  # derived from the given dim and heads, not the default's
    assert "missing" in caplog.text  # the user is told defaults were used


@pytest.mark.parametrize("content, word", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object")])
def test_from_json_bad_file(tmp_path, content, word):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(ValueError) as excinfo:
        ModelConfig.from_json(path)
    assert word in _one_line_error(excinfo)


def test_from_json_missing_file(tmp_path):
    with pytest.raises(ValueError) as excinfo:
        ModelConfig.from_json(tmp_path / "nope.json")
    assert "nope.json" in _one_line_error(excinfo)


@pytest.mark.parametrize(
    "capacity, T, k",
    [
        (0.125, 1024, 128),  # float noise must not make this 129
        (0.125, 1000, 125),
        (0.125, 1001, 126),
        (0.125, 8, 1),
        (0.125, 7, 1),
        (0.125, 1, 1),
        (0.01, 5, 1),  # at least one token
        (0.3, 10, 3),
        (0.3, 11, 4),
        (0.1, 30, 3),
        (0.07, 100, 7),  # 0.07*100 = 7.000000000000001 in floats: float noise must not add a token
        (0.07, 1200, 84),  # 84.00000000000001 in floats
        (1.0, 37, 37),
        (0.5, 3, 2),
    ],
)
def test_k_is_ceil_capacity_times_T(capacity, T, k):
    assert RoutingConfig(capacity=capacity).k(T) == k


@pytest.mark.parametrize("capacity", [0.05, 0.07, 0.125, 0.3, 0.5, 0.9, 1.0])
def test_k_bounds_for_all_lengths(capacity):
    rc = RoutingConfig(capacity=capacity)
    for T in range(1, 300):
        k = rc.k(T)
        assert 1 <= k <= T
        assert k >= capacity * T - 1e-9  # never fewer than C*T
        assert k - 1 < capacity * T + 1e-9 or k == 1  # ceil: one fewer would be below C*T
        assert k == max(1, math.ceil(capacity * T - 1e-9))  # ceil of the exact product, not of float noise


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_configs(name):
    cfg = ModelConfig.from_name(name)
    assert cfg.n_heads % cfg.n_kv_heads == 0 and cfg.head_dim % 2 == 0
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_debug_preset_builds_fast_and_is_routed(debug_cfg):
    import time

    from mixdepth.model import MoDTransformer

    t0 = time.perf_counter()
    MoDTransformer(ModelConfig.from_name("debug"))
    assert time.perf_counter() - t0 < 1.0  # DESIGN: the debug preset builds in under a second on CPU
    cfg = debug_cfg(capacity=0.5, dim=32)
    assert cfg.dim == 32 and cfg.routing.capacity == 0.5
    assert cfg.routed_layer_ids  # the debug preset is a MoD model


def test_from_name_overrides_are_validated():
    with pytest.raises(ValueError) as excinfo:
        ModelConfig.from_name("debug", routing=dict(capacity=2.0))
    assert "routing.capacity" in _one_line_error(excinfo)


def test_with_routing_makes_a_validated_copy():
    cfg = ModelConfig.from_name("debug")
    dense = cfg.with_routing(router="none")
    assert dense.routing.router == "none" and cfg.routing.router == "expert_choice"
    assert dense.routed_layer_ids == [] and cfg.routed_layer_ids == [1, 3]
    with pytest.raises(ValueError, match="routing.gate"):
        cfg.with_routing(gate="relu")
