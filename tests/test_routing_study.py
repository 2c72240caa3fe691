"""The routing study's pieces: the new arms (frozen, rule, capacity 0), the value-1 gate, router
options, stable training with every gate, divergence detection, paired initialisation and the
study's paired-difference arithmetic (issue: learned routing has to earn its keep)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import greedy_by_full_forward
from mixdepth.config import GATES, WHITESPACE_BYTES, ModelConfig
from mixdepth.model import MoDTransformer
from mixdepth.runtime import seed_everything
from mixdepth.train import TrainConfig, make_optimizer, run_train

SONNETS = Path(__file__).parent / "data" / "sonnets.txt"
TEXT = list(SONNETS.read_bytes()[:4000])


def _train_cfg(tmp_path, model: ModelConfig, **kw) -> TrainConfig:
    base = dict(model=model, data=str(SONNETS), seq_len=32, batch_size=2, eval_batches=2, warmup_steps=2,
                log_every=1, eval_every=0, max_steps=6, cache_dir=str(tmp_path / "cache"),
                out_dir=str(tmp_path / "run"), progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


# ---- the value-1 gate ------------------------------------------------------------------------------
def test_sigmoid_st_gate_is_exactly_one_forward_with_the_sigmoid_gradient(debug_cfg):
    model = MoDTransformer(debug_cfg(gate="sigmoid_st"))
    router = model.routed_layers[0].router
    r = torch.randn(3, 7, requires_grad=True) * 5
    r.retain_grad()
    g = router.gate(r)
    assert torch.equal(g, torch.ones_like(g))  # exactly 1, not 1 within rounding
    g.sum().backward()
    s = torch.sigmoid(r.detach())
    assert torch.allclose(r.grad, s * (1 - s))


def test_value_one_gate_matches_gate_one_forward_and_its_gradient_reaches_only_the_router(debug_cfg):
    """Same weights: the sigmoid_st model's logits equal those of a model whose gate is 1 (frozen
    router's gate), the router weight gets a gradient, and (router input detached by default for the
    value-1 gates) the trunk's gradient is the one of the gate-1 forward."""
    seed_everything(0)
    st = MoDTransformer(debug_cfg(gate="sigmoid_st"))
    ref = MoDTransformer(debug_cfg(gate="sigmoid_st", router_detach=True))
    ref.load_state_dict(st.state_dict())
    assert st.cfg.routing.detach_router_input
    x = torch.tensor([TEXT[:64], TEXT[64:128]])
    out = st(x, x, mode="topk")
    # the gate-1 forward: the same model with its routers' gates replaced by ones
    for layer in ref.routed_layers:
        layer.router.gate = lambda r: torch.ones_like(r)
    out1 = ref(x, x, mode="topk")
    assert torch.equal(out.logits, out1.logits)
    out.lm_loss.backward()
    out1.lm_loss.backward()
    for layer in st.routed_layers:
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    trunk = [n for n, _ in st.named_parameters() if ".router." not in n and ".predictor." not in n]
    p1 = dict(ref.named_parameters())
    for n, p in st.named_parameters():
        if n in trunk:
            assert torch.allclose(p.grad, p1[n].grad, atol=1e-6), n


@pytest.mark.parametrize("gate", GATES)
def test_every_gate_trains_a_few_steps_and_stays_finite(tmp_path, debug_cfg, gate):
    summary = run_train(_train_cfg(tmp_path, debug_cfg(gate=gate), max_steps=8, lr=3e-3))
    recs = _metrics(summary["run_dir"])
    assert len(recs) == 8
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["lm_loss"]) for r in recs)
    assert recs[-1]["lm_loss"] < recs[0]["lm_loss"]
    assert all(len(r["router_grad_norm"]) == 2 and all(g > 0 for g in r["router_grad_norm"]) for r in recs)


def test_router_detach_default_follows_the_gate():
    from mixdepth.config import RoutingConfig

    assert RoutingConfig(gate="straight_through").detach_router_input
    assert RoutingConfig(gate="sigmoid_st").detach_router_input
    assert not RoutingConfig(gate="sigmoid").detach_router_input
    assert not RoutingConfig(gate="raw").detach_router_input
    assert not RoutingConfig(gate="straight_through", router_detach=False).detach_router_input
    with pytest.raises(ValueError, match="routing.router_lr_scale"):
        RoutingConfig(router_lr_scale=0)


# ---- divergence --------------------------------------------------------------------------------------
def test_a_diverging_run_stops_naming_the_step_and_keeps_its_last_checkpoint(tmp_path, debug_cfg, monkeypatch):
    """The loss jumps (here made to, from step 7 on): training stops before that step's update with
    one line naming the step, and the checkpoint of step 6 is the run's latest, intact."""
    from mixdepth.checkpoint import load_model, resolve_checkpoint

    orig = MoDTransformer.forward
    calls = {"n": 0}

    def exploding(self, *a, **k):
        out = orig(self, *a, **k)
        if self.training and out.loss is not None:
            calls["n"] += 1
            if calls["n"] >= 7:
                out.loss = out.loss + 10.0
        return out

    monkeypatch.setattr(MoDTransformer, "forward", exploding)
    cfg = _train_cfg(tmp_path, debug_cfg(), max_steps=12, ckpt_every=3)
    with pytest.raises(ValueError) as e:
        run_train(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "diverged at step 7" in msg and "step-000006" in msg
    monkeypatch.setattr(MoDTransformer, "forward", orig)
    assert resolve_checkpoint(cfg.out_dir).name == "step-000006"
    load_model(cfg.out_dir)
    # with the check off, the same run goes to its end
    monkeypatch.setattr(MoDTransformer, "forward", exploding)
    calls["n"] = 0
    summary = run_train(_train_cfg(tmp_path, debug_cfg(), max_steps=8, diverge_nats=0, out_dir=str(tmp_path / "r2")))
    assert summary["steps"] == 8


def test_divergence_check_cli_is_one_line_exit_2(tmp_path, capsys):
    from mixdepth.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--preset", "debug", "--train.diverge_nats", "-1", "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.diverge_nats" in err[0]


# ---- the new arms ------------------------------------------------------------------------------------
@pytest.mark.parametrize("routing", [dict(router="frozen"), dict(router="rule", capacity=0.25),
                                     dict(capacity=0.0), dict(router="random"),
                                     dict(gate="sigmoid_st"), dict(router_norm=True),
                                     dict(router_lr_scale=10.0)])
def test_each_routing_arm_trains_end_to_end(tmp_path, debug_cfg, routing):
    cfg = debug_cfg(**routing)
    seed_everything(0)
    before = MoDTransformer(cfg).state_dict()
    summary = run_train(_train_cfg(tmp_path, cfg))
    from mixdepth.checkpoint import load_model

    model = load_model(summary["checkpoint"])
    recs = _metrics(summary["run_dir"])
    assert all(math.isfinite(r["loss"]) for r in recs) and recs[-1]["lm_loss"] < recs[0]["lm_loss"]
    frac = recs[-1]["routed_frac"]
    assert frac == pytest.approx([cfg.routing.capacity] * 2, abs=1e-6)
    after = model.state_dict()
    for layer in model.routed_layers:
        w = f"layers.{layer.layer_id}.router.weight"
        if routing.get("router") == "frozen":
            assert torch.equal(after[w], before[w])  # never trained
        elif w in after:
            assert not torch.equal(after[w], before[w])
    # the trunk trained in every arm
    assert not torch.equal(after["layers.0.self_attn.q_proj.weight"], before["layers.0.self_attn.q_proj.weight"])


def test_router_lr_scale_gives_the_router_its_own_learning_rate(tmp_path, debug_cfg):
    cfg = _train_cfg(tmp_path, debug_cfg(router_lr_scale=5.0))
    model = MoDTransformer(cfg.model)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    routers = [g for g in opt.param_groups if g.get("lr_scale")]
    assert len(routers) == 1 and routers[0]["lr_scale"] == 5.0
    assert {id(p) for p in routers[0]["params"]} == {id(layer.router.weight) for layer in model.routed_layers}
    plain = make_optimizer(MoDTransformer(debug_cfg()), _train_cfg(tmp_path, debug_cfg()), torch.device("cpu"))
    assert len(plain.param_groups) == 2


def test_router_norm_scores_the_direction_of_the_residual(debug_cfg):
    model = MoDTransformer(debug_cfg(router_norm=True))
    router = model.routed_layers[0].router
    x = torch.randn(2, 9, model.cfg.dim)
    assert torch.allclose(router(x), router(7.0 * x), atol=1e-5)
    plain = MoDTransformer(debug_cfg()).routed_layers[0].router
    assert not torch.allclose(plain(x), plain(7.0 * x))


def test_capacity_zero_drops_the_routed_blocks(debug_cfg):
    """k = 0: a routed layer passes its input through in topk mode; after calibration at fraction 0 the
    causal mode does the same, and cached decoding stores nothing in the routed layers."""
    seed_everything(0)
    m = MoDTransformer(debug_cfg(capacity=0.0)).eval()
    assert m.cfg.routing.k(64) == 0
    x = torch.tensor([TEXT[:40]])
    seen = {}
    for layer in m.routed_layers:
        layer.register_forward_hook(lambda mod, inp, out, i=layer.layer_id: seen.__setitem__(i, (inp[0], out[0])))
    with torch.no_grad():
        out = m(x, mode="topk", return_routing=True)
    for i, (inp, o) in seen.items():
        assert torch.equal(inp, o) and not out.routing[i].any()
    with torch.no_grad():
        m.calibrate_causal(x)
        causal = m(x, mode="causal")
        cache = m.make_cache(1, 64)
        m(x, mode="causal", cache=cache)
    assert torch.allclose(causal.logits, out.logits, atol=1e-5)
    assert all(int(cache.layers[i].lengths.sum()) == 0 for i in m.cfg.routed_layer_ids)


def test_frozen_router_selects_by_content_with_gate_one(debug_cfg):
    m = MoDTransformer(debug_cfg(router="frozen"))
    router = m.routed_layers[0].router
    assert not router.weight.requires_grad
    r = torch.randn(2, 5)
    assert torch.equal(router.gate(r), torch.ones_like(r))
    x = torch.tensor([TEXT[:32], TEXT[32:64]])
    o = m(x, x, mode="topk")
    assert set(o.losses) == {"predictor_loss"}  # no aux loss: the router never trains


# ---- the rule router ---------------------------------------------------------------------------------
def test_rule_router_takes_the_tokens_after_whitespace_first_in_order(debug_cfg):
    m = MoDTransformer(debug_cfg(router="rule", capacity=0.25)).eval()
    ids = torch.full((1, 32), ord("a"))
    for p in (3, 9, 20):
        ids[0, p] = 32
    with torch.no_grad():
        out = m(ids, mode="topk", return_routing=True)
    chosen = out.routing[1][0].nonzero().flatten().tolist()
    after = [0, 4, 10, 21]  # the first token counts as after whitespace
    assert chosen == sorted(after + [1, 2, 3, 5])  # k = 8: filled with the earliest others
    many = torch.full((1, 32), 32)  # more tokens after whitespace than k: the first k in order
    with torch.no_grad():
        out = m(many, mode="topk", return_routing=True)
    assert out.routing[1][0].nonzero().flatten().tolist() == list(range(8))
    assert set(WHITESPACE_BYTES) == {9, 10, 13, 32}


def test_rule_router_is_causal_and_samples(debug_cfg):
    """A later token never changes an earlier decision; cached decoding decides and computes exactly
    as the full causal forward; generation runs."""
    from mixdepth.generate import generate

    seed_everything(0)
    m = MoDTransformer(debug_cfg(router="rule")).eval()
    x = torch.tensor([TEXT[100:160]])
    with torch.no_grad():
        m.calibrate_causal(torch.tensor([TEXT[:128], TEXT[128:256]]))
        full = m(x, mode="causal", return_routing=True)
        for t in (10, 30, 59):
            y = x.clone()
            y[0, t:] = torch.randint(0, 256, (60 - t,))
            part = m(y, mode="causal", return_routing=True)
            for i in full.routing:
                assert torch.equal(part.routing[i][0, :t + 1], full.routing[i][0, :t + 1])
        for r in full.routing.values():  # causal rule: exactly the tokens after whitespace
            prev = torch.cat([torch.tensor([-1]), x[0, :-1]])
            assert torch.equal(r[0], torch.isin(prev, torch.tensor(WHITESPACE_BYTES)) | (prev < 0))
        cache = m.make_cache(1, 128)
        m(x[:, :20], mode="causal", cache=cache)
        steps = [m(x[:, t:t + 1], mode="causal", cache=cache, return_routing=True) for t in range(20, 60)]
    for j, s in enumerate(steps):
        assert torch.allclose(s.logits[0, -1], full.logits[0, 20 + j], atol=1e-5)
        for i in full.routing:
            assert bool(s.routing[i][0, 0]) == bool(full.routing[i][0, 20 + j])
    res = generate(m, [TEXT[:20]], max_new_tokens=8, temperature=0.0).run()
    assert res.tokens[0] == greedy_by_full_forward(m, TEXT[:20], 8)


def test_rule_router_is_refused_by_the_static_decoder(debug_cfg):
    from mixdepth.static import StaticDecoder

    with pytest.raises(ValueError, match="token ids"):
        StaticDecoder(MoDTransformer(debug_cfg(router="rule")))


# ---- paired arms -------------------------------------------------------------------------------------
def test_routing_variants_share_their_trunk_initialisation(debug_cfg):
    """Paired seeds: models that differ only in routing draw the same trunk weights from a seed."""
    def trunk(routing):
        seed_everything(3)
        sd = MoDTransformer(debug_cfg(**routing)).state_dict()
        return {k: v for k, v in sd.items() if ".router." not in k and ".predictor." not in k
                and "threshold" not in k}

    ref = trunk(dict(router="none"))
    for routing in (dict(), dict(router="random"), dict(router="frozen"), dict(router="rule"),
                    dict(router="token_choice"), dict(gate="sigmoid_st"), dict(capacity=0.0)):
        other = trunk(routing)
        assert set(other) == set(ref) and all(torch.equal(ref[k], other[k]) for k in ref), routing


def test_study_variant_options_build_the_arms(debug_cfg):
    from mixdepth.study import ARMS, arm_variant
    from mixdepth.sweep import parse_variant, variant_config, variant_options

    base = debug_cfg(router="none")
    assert parse_variant("mod-0-e2") == ("mod", 0.0, 2)
    assert variant_options("mod-12.5-e2+gate=sigmoid_st+router_lr_scale=10+init_std=0.01") == {
        "routing": {"gate": "sigmoid_st", "router_lr_scale": 10}, "model": {"init_std": 0.01}}
    cfg = variant_config("mod-12.5-e2+router_norm=true", base)
    assert cfg.routing.router_norm is True and cfg.routing.router == "expert_choice"
    assert variant_config(arm_variant("rule"), base).routing.router == "rule"
    assert variant_config(arm_variant("dropped"), base).routing.capacity == 0
    for bad in ("mod-12.5-e2+gate", "mod-12.5-e2+nonsense=1", "random-0-e2"):
        with pytest.raises(ValueError):
            parse_variant(bad)
    with pytest.raises(ValueError, match="routing.gate"):
        variant_config("mod-12.5-e2+gate=tanh", base)
    assert set(ARMS) >= {"learned", "learned-gate1", "random", "frozen", "rule", "dropped", "dense"}


# ---- the study's arithmetic --------------------------------------------------------------------------
def test_study_paired_difference_arithmetic_on_known_numbers():
    from mixdepth.study import paired_difference, verdict

    a, b = [1.10, 1.20, 1.30], [1.00, 1.15, 1.20]  # d = 0.10, 0.05, 0.10
    mean, se = paired_difference(a, b)
    assert mean == pytest.approx(0.25 / 3)
    sd = math.sqrt(((0.1 - 0.25 / 3) ** 2 * 2 + (0.05 - 0.25 / 3) ** 2) / 2)
    assert se == pytest.approx(sd / math.sqrt(3))
    assert verdict(mean, se) == "higher"  # 0.083 > 2 x 0.0167
    assert verdict(-mean, se) == "lower"
    assert verdict(0.01, 0.01) == "not resolved"
    assert paired_difference([2.0], [1.5]) == (0.5, None) and verdict(0.5, None).startswith("one seed")
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])


def test_study_table_and_findings_follow_the_numbers():
    """summarise_arms pairs the arms by seed, and the table and findings show what the numbers say."""
    from mixdepth.study import StudyConfig, findings, format_table, summarise_arms

    cfg = StudyConfig(arms=["learned", "random", "dense"], seeds=[0, 1, 2])
    losses = {"mod-12.5-e2": [1.50, 1.52, 1.49], "random-12.5-e2": [1.56, 1.57, 1.55], "dense": [1.51, 1.50, 1.53]}
    results, analyses = [], {}
    for v, ls in losses.items():
        for s, loss in enumerate(ls):
            run = f"{v}-s{s}"
            results.append({"run": run, "variant": v, "seed": s, "steps": 100, "fwd_flops_per_token": 1.0,
                            "loss_topk": 9.0})  # the training-time evaluation: not what the study compares
            layers = {} if v == "dense" else {"1": {"p_after_ws": 0.3, "p_is_ws": 0.1, "base_rate": 0.125}}
            analyses[run] = {"loss": loss, "loss_causal": None if v == "random-12.5-e2" else loss + 0.01,
                             "loss_initial": loss + 1, "loss_other": loss - 0.1, "layers": layers}
    rows = {r["arm"]: r for r in summarise_arms(cfg, results, analyses)}
    assert rows["random"]["d_loss"] == pytest.approx(0.0567, abs=1e-4)  # d = 0.06, 0.05, 0.06
    assert rows["random"]["verdict"] == "higher"
    assert rows["dense"]["verdict"] == "not resolved"  # d = 0.01, -0.02, 0.04
    assert rows["random"]["d_initial"] == pytest.approx(rows["random"]["d_loss"])
    assert rows["learned"]["loss_topk"] == pytest.approx(1.5033, abs=1e-4)
    assert rows["learned"]["loss_causal"] == pytest.approx(1.5133, abs=1e-4) and rows["random"]["loss_causal"] is None
    table = format_table(cfg, rows.values())
    assert "| random |" in table and "+0.0567 ± " in table and "0.300 / 0.100 / 0.125" in table
    notes = "\n".join(findings(cfg, list(rows.values())))
    assert "learned is better by more than 2 standard errors" in notes
    assert "not resolved" in notes
    with pytest.raises(ValueError, match="reference"):
        StudyConfig(arms=["random", "dense"])


# ---- the local window of the non-routed layers --------------------------------------------------------
def test_local_window_routing_option_limits_dense_layers_and_cached_decoding_agrees(debug_cfg):
    """model.local_window W: a non-routed layer's token reads only the W-1 tokens before it (a change
    farther back does not reach its output), routed layers still read everything; cached decoding
    equals the full causal forward; the reference attention agrees with the windowed mask."""
    from mixdepth.model.layers import attention_reference

    seed_everything(0)
    cfg = debug_cfg(local_window=8)
    m = MoDTransformer(cfg).eval()
    dense = m.layers[0]
    assert not dense.routed and dense.local_window == 8
    x = torch.randn(1, 30, cfg.dim)
    pos = torch.arange(30)[None]
    with torch.no_grad():
        y = dense(x, m.rope, pos)[0]
        x2 = x.clone()
        x2[0, 5] += 3.0  # position 5 is outside the window of positions >= 13
        y2 = dense(x2, m.rope, pos)[0]
    assert torch.allclose(y[0, 13:], y2[0, 13:], atol=1e-6) and not torch.allclose(y[0, 5:13], y2[0, 5:13])
    attn = dense.self_attn
    h = dense.input_layernorm(x)
    cos, sin = m.rope(pos)
    q = attn.q_proj(h).view(1, 30, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(1, 30, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(h).view(1, 30, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    from mixdepth.model.layers import apply_rope

    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    i, j = torch.arange(30)[:, None], torch.arange(30)[None]
    ref = attention_reference(q, k, v, (j <= i) & (i - j < 8))
    got = attn(h, cos, sin, window=(8, pos))
    want = attn.o_proj(ref.transpose(1, 2).reshape(1, 30, -1))
    assert torch.allclose(got, want, atol=1e-5)
    ids = torch.tensor([TEXT[:60]])
    with torch.no_grad():
        m.calibrate_causal(torch.tensor([TEXT[:128], TEXT[128:256]]))
        full = m(ids, mode="causal")
        cache = m.make_cache(1, 128)
        m(ids[:, :25], mode="causal", cache=cache)
        steps = [m(ids[:, t:t + 1], mode="causal", cache=cache).logits[0, -1] for t in range(25, 60)]
    assert torch.allclose(torch.stack(steps), full.logits[0, 25:], atol=1e-5)
    unwindowed = MoDTransformer(debug_cfg())
    unwindowed.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert not torch.allclose(unwindowed(ids, mode="causal").logits, full.logits, atol=1e-4)


def test_local_window_is_refused_where_it_is_not_built(debug_cfg):
    from mixdepth.hf import hf_config_dict
    from mixdepth.static import StaticDecoder

    cfg = debug_cfg(local_window=8)
    with pytest.raises(ValueError, match="local_window"):
        StaticDecoder(MoDTransformer(cfg))
    with pytest.raises(ValueError, match="local_window"):
        hf_config_dict(cfg)
    with pytest.raises(ValueError, match="model.local_window"):
        debug_cfg(local_window=-1)


def test_local_window_keeps_the_routed_pattern_full_in_every_arm(debug_cfg):
    """The window falls on the layers outside the routed pattern, in MoD and in its dense twin alike."""
    from mixdepth.study import StudyConfig

    for router in ("none", "expert_choice", "random"):
        m = MoDTransformer(debug_cfg(router=router, local_window=8))
        assert [layer.local_window for layer in m.layers if not layer.routed] == (
            [8, 0, 8, 0] if router == "none" else [8, 8]), router
    cfg = StudyConfig(arms=["learned", "dense"], window=16)
    assert cfg.variant("dense") == "dense+local_window=16"
    assert cfg.variant("learned") == "mod-12.5-e2+local_window=16"
    assert cfg.sweep().variants == ["mod-12.5-e2+local_window=16", "dense+local_window=16"]
    with pytest.raises(ValueError, match="--window"):
        StudyConfig(window=-2)


def test_study_reuses_runs_saved_before_a_setting_existed(tmp_path, debug_cfg):
    """A finished run whose run.json lacks a setting added since (its default computes what the run
    computed) is reused, not retrained; one whose saved value differs from the default is not."""
    from mixdepth.train import train_or_reuse

    cfg = _train_cfg(tmp_path, debug_cfg(), max_steps=3)
    first = train_or_reuse(cfg)
    path = Path(first["run_dir"]) / "run.json"
    saved = json.loads(path.read_text())
    del saved["diverge_nats"], saved["model"]["local_window"], saved["model"]["routing"]["router_norm"]
    path.write_text(json.dumps(saved))
    again = train_or_reuse(cfg)
    assert again.get("reused") and again["checkpoint"] == first["checkpoint"]
    saved["model"]["routing"]["router_norm"] = True
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="other settings"):
        train_or_reuse(cfg)
