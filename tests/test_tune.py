"""Tests of the pretrained-model recipe (`mixdepth.tune`, `mixdepth tune`; issue 16): sensitivity
ranking, a frozen trunk that stays bit-identical, the compute dial, the layer-drop baseline, and
the command end to end, on small models with random weights."""

from __future__ import annotations

import json

import pytest
import torch

from mixdepth import ModelConfig, MoDTransformer
from mixdepth.checkpoint import is_routing_parameter, load_model, save_checkpoint
from mixdepth.tune import (
    dense_source,
    drop_layers,
    kl_from,
    layer_sensitivity,
    least_sensitive,
    trunk_tensors,
    tune_routers,
    with_config,
)


def _source(n_layers: int = 4, **kw) -> MoDTransformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("debug", n_layers=n_layers, init_std=0.1, tie_embeddings=False,
                                routing=dict(router="none"), **kw)
    return MoDTransformer(cfg).eval()


def _ids(b=2, t=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t + 1), generator=g)


def _routed(source, layers, unit="block", **routing):
    cfg = source.cfg.with_routing(router="expert_choice", routed_layers=layers, unit=unit,
                                  gate="straight_through", **routing)
    return with_config(source, cfg, seed=3)


# ---- sensitivity ---------------------------------------------------------------------------------
def test_sensitivity_ranks_a_near_identity_layer_least_sensitive():
    source = _source()
    with torch.no_grad():  # layer 2's block adds (almost) nothing: skipping it costs (almost) nothing
        source.layers[2].self_attn.o_proj.weight.mul_(1e-4)
        source.layers[2].mlp.down_proj.weight.mul_(1e-4)
        source.layers[1].mlp.down_proj.weight.mul_(1e-4)  # layer 1's MLP alone
    ids = _ids()
    sens = layer_sensitivity(source, ids[:, :-1], ids[:, 1:], ["block", "attn", "mlp"])
    block, mlp = sens["block"]["kl"], sens["mlp"]["kl"]
    assert least_sensitive(block, 1) == [2]
    assert min(range(4), key=lambda i: mlp[i]) in (1, 2)
    assert block[2] < 1e-4 < min(block[i] for i in (0, 1, 3))
    assert mlp[1] < 1e-4 < mlp[0]
    assert all(len(v["kl"]) == 4 and len(v["loss_rise"]) == 4 for v in sens.values())


def test_sensitivity_equals_the_kl_of_the_model_without_that_layer():
    source = _source()
    ids = _ids()
    x, y = ids[:, :-1], ids[:, 1:]
    sens = layer_sensitivity(source, x, y, ["block"])
    with torch.no_grad():
        ref = source(x).logits.float().log_softmax(-1)
        for i in range(4):
            logits = drop_layers(source, [i])(x).logits
            assert sens["block"]["kl"][i] == pytest.approx(float(kl_from(ref, logits)), rel=1e-4, abs=1e-6)
            rise = float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), y)
                         - torch.nn.functional.cross_entropy(ref.transpose(1, 2), y))
            assert sens["block"]["loss_rise"][i] == pytest.approx(rise, rel=1e-4, abs=1e-5)


def test_least_sensitive_picks_the_smallest_in_layer_order():
    assert least_sensitive([0.5, 0.1, 0.9, 0.2, 0.05], 3) == [1, 3, 4]
    assert least_sensitive([1.0, 1.0, 0.5], 2) == [0, 2]  # ties: lower layer first


# ---- the layer-drop baseline ---------------------------------------------------------------------
def test_layer_drop_equals_the_model_with_those_layers_removed():
    source = _source(n_layers=5)
    ids = _ids()[:, :-1]
    dropped = drop_layers(source, [1, 3])
    assert dropped.cfg.n_layers == 3 and not dropped.routed_layers
    # shares the kept blocks' tensors: no copy
    assert dropped.layers[1].mlp.up_proj.weight.data_ptr() == source.layers[2].mlp.up_proj.weight.data_ptr()
    with torch.no_grad():
        # by hand: the residual stream through blocks 0, 2 and 4 only
        cos, sin = source.rope(torch.arange(ids.shape[1]))
        h = source.embed_tokens(ids)
        for i in (0, 2, 4):
            h = h + source.layers[i].delta(h, cos, sin)
        by_hand = source.lm_head(source.norm(h))
        torch.testing.assert_close(dropped(ids).logits, by_hand, rtol=0, atol=1e-5)
        # and a routed model on those layers that lets no token in (fraction 0)
        routed = _routed(source, [1, 3])
        skip_all = routed(ids, mode="causal", thresholds=routed.causal_thresholds(0.0)).logits
        torch.testing.assert_close(dropped(ids).logits, skip_all, rtol=0, atol=1e-5)
        assert not torch.allclose(dropped(ids).logits, source(ids).logits, atol=1e-3)


def test_layer_drop_refuses_to_drop_everything():
    with pytest.raises(ValueError, match="every layer"):
        drop_layers(_source(n_layers=2), [0, 1])


# ---- tuning: the trunk stays frozen --------------------------------------------------------------
@pytest.mark.parametrize("unit, objective", [("block", "relaxed"), ("attn", "relaxed"), ("mlp", "relaxed"),
                                             ("block", "topk"), ("mlp", "topk")])
def test_tune_trains_routers_and_leaves_the_trunk_bit_identical(unit, objective):
    source = _source()
    model = _routed(source, [1, 2], unit=unit, capacity=0.3)
    before = {k: v.clone() for k, v in trunk_tensors(model).items()}
    source_before = {k: v.clone() for k, v in source.state_dict().items()}
    routers = {k: v.clone() for k, v in model.state_dict().items() if is_routing_parameter(k)}
    flags = [p.requires_grad for p in model.parameters()]
    ids = _ids(4, 32)
    hist = tune_routers(model, source, lambda s: ids[:, :-1], steps=4, fractions=[0.25, 0.5], lr=1e-2,
                        objective=objective)
    assert [h["fraction"] for h in hist] == [0.25, 0.5, 0.25, 0.5]
    assert model.cfg.routing.capacity == 0.3  # the topk objective moves it per step, and puts it back
    assert [p.requires_grad for p in model.parameters()] == flags
    for k, v in source.state_dict().items():
        assert torch.equal(v, source_before[k]), k
    after = trunk_tensors(model)
    assert before.keys() == after.keys() and len(before) > 10
    for k in before:
        assert torch.equal(before[k], after[k]), k
    changed = [k for k, v in model.state_dict().items() if k in routers and not torch.equal(v, routers[k])]
    assert any(".router." in k for k in changed) and any(".predictor." in k for k in changed)


def test_tuning_lowers_the_kl_from_the_source():
    source = _source()
    model = _routed(source, [1, 2, 3], causal_method="aux_loss")
    x = _ids(4, 48, seed=5)[:, :-1]

    def kl():  # sampling-time routing at half the tokens
        with torch.no_grad():
            model.calibrate_causal(x, fraction=0.5)
            return float(kl_from(source(x).logits.float().log_softmax(-1), model(x, mode="causal").logits))

    start = kl()
    tune_routers(model, source, lambda s: x, steps=60, fractions=[0.5], lr=3e-2)
    assert kl() < 0.85 * start


@pytest.mark.parametrize("unit", ["block", "attn", "mlp"])
def test_relaxed_forward_computes_what_causal_routing_at_that_fraction_does(unit):
    source = _source()
    model = _routed(source, [1, 3], unit=unit, causal_method="aux_loss")
    x = _ids(2, 40, seed=4)[:, :-1]  # 80 tokens: 0.25 of them is a whole number
    with torch.no_grad():
        relaxed = model(x, mode="dense", relax=0.25)
        causal = model(x, mode="causal", calibrate=0.25)
    assert [float(f) for f in relaxed.routed_frac] == [0.25, 0.25]
    torch.testing.assert_close(relaxed.logits, causal.logits, rtol=0, atol=1e-5)


def test_relaxed_training_sends_every_token_a_router_gradient():
    source = _source()
    model = _routed(source, [1], causal_method="aux_loss")
    model.layers[1].router.weight.requires_grad_(True)
    x = _ids(1, 32, seed=4)[:, :-1]
    seen = {}
    h = model.layers[1].router.register_forward_hook(lambda m, a, out: out.retain_grad() or seen.setdefault("r", out))
    with torch.no_grad():
        ref = source(x).logits.float().log_softmax(-1)
    kl_from(ref, model(x, mode="dense", relax=0.25).logits).backward()
    h.remove()
    assert (seen["r"].grad != 0).float().mean() > 0.9  # skipped tokens too, not only the chosen quarter


# ---- the compute dial ----------------------------------------------------------------------------
@pytest.mark.parametrize("router", ["expert_choice", "random_token"])
def test_dial_routes_the_fraction_asked(router):
    source = _source()
    model = with_config(source, source.cfg.with_routing(router=router, routed_layers=[1, 2, 3],
                                                         gate="straight_through", causal_method="aux_loss"))
    ids = _ids(16, 127, seed=2)[:, :-1]  # 2032 tokens: random scores calibrate to about 1%
    model.calibrate_causal(ids, fraction=0.5, dial=[i / 20 for i in range(1, 20)])
    torch.manual_seed(0)
    for f in (0.25, 0.5, 0.75, 0.6, 0.33):
        out = model(ids, mode="causal", thresholds=model.causal_thresholds(f))
        got = out.routed_frac
        tol = 0.01 if router == "expert_choice" and round(f * 20) == f * 20 else 0.06
        assert got.sub(f).abs().max() <= tol, (f, got.tolist())
    # the calibrated default is the fraction calibrated for
    assert model(ids, mode="causal").routed_frac.sub(0.5).abs().max() <= (0.01 if router == "expert_choice" else 0.06)


def test_dial_beats_a_single_pass_table_far_from_its_fraction():
    source = _source()
    model = _routed(source, [0, 1, 2, 3], causal_method="aux_loss")
    ids = _ids(4, 64, seed=2)[:, :-1]
    model.calibrate_causal(ids, fraction=0.9)  # one pass: the table at 0.25 is read off 0.9's inputs
    single = model(ids, mode="causal", thresholds=model.causal_thresholds(0.25)).routed_frac
    model.calibrate_causal(ids, fraction=0.9, dial=[0.25, 0.5, 0.9])
    dial = model(ids, mode="causal", thresholds=model.causal_thresholds(0.25)).routed_frac
    assert dial.sub(0.25).abs().max() <= 0.01
    assert single.sub(0.25).abs().max() > dial.sub(0.25).abs().max() + 0.01


def test_eval_fraction_flag_moves_the_routed_fraction(tmp_path, capsys):
    from mixdepth.cli import main

    source = _source()
    model = _routed(source, [1, 2], causal_method="aux_loss")
    corpus = tmp_path / "text.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    from mixdepth.data import ByteTokenizer, prepare_corpus

    tokens = prepare_corpus(str(corpus), ByteTokenizer(), tmp_path / "cache")
    x, _ = tokens.batch_at("train", tokens.eval_offsets(64, 4, split="train"), 64)
    model.calibrate_causal(x, fraction=0.5, dial=[0.25, 0.5, 0.75])
    save_checkpoint(tmp_path / "ck", model, trainer_state={"data": str(corpus), "seq_len": 64})
    js = tmp_path / "e.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "ck"), "--fraction", "0.25", "--batches", "2",
                 "--batch-size", "2", "--device", "cpu", "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    assert r["fraction"] == 0.25 and all(abs(f - 0.25) < 0.1 for f in r["routed_frac_causal"])
    assert "--fraction 0.25" in capsys.readouterr().out


# ---- the command, end to end ---------------------------------------------------------------------
def test_tune_command_end_to_end_and_resume(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    import mixdepth.tune as tune_module
    from mixdepth.cli import main

    source = _source(n_layers=4)
    save_checkpoint(tmp_path / "src", source)
    corpus = tmp_path / "text.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}.\n" for i in range(600)))
    out = tmp_path / "tuned"
    args = ["tune", str(tmp_path / "src"), "--out", str(out), "--units", "block,attn", "--routed", "2",
            "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--dial", "1,0.5", "--data", str(corpus),
            "--eval-windows", "2", "--batch-sizes", "1,2", "--new-tokens", "3", "--rounds", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "layer_drop@0.5" in printed and "random-block@0.5" in printed and "mod-attn@0.5" in printed
    for name in ("sensitivity.json", "curve.json", "curve.md", "curve.png", "answers.md", "tune.json"):
        assert (out / name).exists(), name
    curve = json.loads((out / "curve.json").read_text())
    names = [r["name"] for r in curve["rows"]]
    assert names[0] == "source" and "mod-block@1" in names and "layer_drop@0.5" in names
    drop = next(r for r in curve["rows"] if r["name"] == "layer_drop@0.5")
    assert len(drop["dropped"]) == 1 and drop["flops_ratio"] < 1
    mod1 = next(r for r in curve["rows"] if r["name"] == "mod-block@1")
    src = curve["rows"][0]
    assert mod1["ppl"] == pytest.approx(src["ppl"], rel=1e-5) and mod1["kl"] < 1e-6  # fraction 1 is the source
    # the tuned checkpoint: routed on the least sensitive layers, the sensitivity saved with it
    sens = json.loads((out / "sensitivity.json").read_text())
    tuned = load_model(out / "mod-block")
    assert tuned.cfg.routing.routed_layers == least_sensitive(sens["block"]["kl"], 2)
    state = json.loads((out / "mod-block" / "trainer.json").read_text())
    assert state["sensitivity"]["block"]["kl"] == sens["block"]["kl"] and len(state["history"]) == 3
    for k, v in trunk_tensors(dense_source(tuned)).items():
        assert torch.equal(v, source.state_dict()[k]), k
    # running again resumes: the tuned checkpoints are not redone, their routers are loaded, and the
    # curve measured again with the reloaded models is the first run's
    mtimes = {u: (out / f"mod-{u}" / "model.safetensors").stat().st_mtime_ns for u in ("block", "attn")}
    measured = {}
    measure_curve = tune_module.measure_curve

    def measure(points, *a, **kw):
        measured.update((p.name, p.model) for p in points)
        return measure_curve(points, *a, **kw)

    monkeypatch.setattr(tune_module, "measure_curve", measure)
    assert main(args) == 0
    capsys.readouterr()
    for unit, mtime in mtimes.items():
        assert (out / f"mod-{unit}" / "model.safetensors").stat().st_mtime_ns == mtime
        saved = load_file(out / f"mod-{unit}" / "model.safetensors")
        routing = {k: v for k, v in measured[f"mod-{unit}@0.5"].state_dict().items()
                   if is_routing_parameter(k) or k.endswith(("causal_threshold", "threshold_table"))}
        assert any(".router." in k for k in routing) and any("threshold_table" in k for k in routing)
        for k, v in routing.items():
            assert torch.equal(v, saved[k]), k
    again = {r["name"]: r for r in json.loads((out / "curve.json").read_text())["rows"]}
    tuned_rows = [r for r in curve["rows"] if r["variant"] == "mod"]
    assert len(tuned_rows) == 4  # two units at two fractions
    for r in tuned_rows:
        assert again[r["name"]]["ppl"] == pytest.approx(r["ppl"], rel=1e-6), r["name"]
        assert again[r["name"]]["kl"] == pytest.approx(r["kl"], rel=1e-5, abs=1e-9), r["name"]
        assert again[r["name"]]["routed_measured"] == r["routed_measured"], r["name"]
    half = next(r for r in tuned_rows if r["name"] == "mod-block@0.5")
    assert half["routed_measured"] < 1 and half["kl"] > mod1["kl"]  # fraction 0.5 really routes
    # another source into the same folder is refused, not mixed in
    save_checkpoint(tmp_path / "other", _source(n_layers=4, dim=32, n_heads=2, n_kv_heads=1))
    with pytest.raises(SystemExit) as e:
        main(["tune", str(tmp_path / "other"), *args[2:]])
    assert e.value.code == 2 and "another source" in capsys.readouterr().err


def test_tune_command_bad_input_is_one_line(tmp_path, capsys):
    from mixdepth.cli import main

    save_checkpoint(tmp_path / "src", _source(n_layers=2))
    for extra, message in ((["--units", "block,heads"], "tune units must be some of"),
                           (["--dial", "1,0"], "--dial must list positive numbers"),
                           (["--dial", "1,1.5"], "tune dial must be fractions")):
        with pytest.raises(SystemExit) as e:
            main(["tune", str(tmp_path / "src"), "--out", str(tmp_path / "o"), *extra])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1], err
    with pytest.raises(SystemExit):
        main(["tune", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tune", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--units", "mlp,mlp"])
    assert "must not repeat" in capsys.readouterr().err
