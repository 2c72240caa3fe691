"""`mixdepth sweep`: a tiny sweep end to end, resume after a kill, workers, and the one-line errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from mixdepth import flops  # noqa: E402
from mixdepth.cli import main  # noqa: E402
from mixdepth.runs import latest_checkpoint  # noqa: E402
from mixdepth.sweep import (  # noqa: E402
    MAIN_MOD,
    RunSpec,
    SweepConfig,
    findings,
    parse_variant,
    plan,
    run_sweep,
    summarise,
    train_config,
    variant_config,
)
from mixdepth.train import Trainer  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
def tiny(tmp_path, corpus, name="sweep", **kw):
    """2 variants x 2 sizes x 1 budget x 1 seed of tiny models: seconds."""
    base = dict(out_dir=str(tmp_path / name), variants=["dense", MAIN_MOD], depths=[2, 3], budgets=[1.5e9],
                seeds=[0], aspect=16, head_dim=8, seq_len=32, batch_size=4, data=str(corpus), eval_batches=2,
                evals=2, decode_tokens=4, decode_context=8, decode_rounds=1, cache_dir=str(tmp_path / "cache"),
                progress=False)
    base.update(kw)
    return SweepConfig(**base)


ARGS = ["--variants", f"dense,{MAIN_MOD}", "--ablations", "none", "--depths", "2,3", "--budgets", "1.5e9",
        "--seeds", "1", "--aspect", "16", "--head-dim", "8", "--seq-len", "32", "--batch-size", "4",
        "--eval-batches", "2", "--evals", "2", "-j", "1", "--no-progress"]


def test_variants_parse_and_build(debug_cfg):
    assert parse_variant("mod-12.5-e2") == ("mod", 0.125, 2)
    assert parse_variant("random-50-e1") == ("random", 0.5, 1)
    assert parse_variant("dense") == ("dense", None, None)
    assert parse_variant("mod-0-e2") == ("mod", 0.0, 2)  # those blocks dropped: the layer-drop baseline
    for bad in ("mod", "random-0-e2", "mod-150-e2", "mod-12.5-e0", "moee", "dense-12.5-e2"):
        with pytest.raises(ValueError, match="unknown variant"):
            parse_variant(bad)
    base = debug_cfg(router="none")
    m = variant_config("mod-50-e1", base)
    assert (m.routing.router, m.routing.capacity, m.routed_layer_ids) == ("expert_choice", 0.5, [0, 1, 2, 3])
    assert variant_config("mod-aux-12.5-e2", base).routing.causal_method == "aux_loss"
    assert variant_config("token-choice-12.5-e2", base).routing.router == "token_choice"
    assert flops.variant_name(variant_config("staged-mode", base)) == "staged-mode"
    assert flops.variant_name(variant_config("integrated-mode", base)) == "integrated-mode"
    assert flops.variant_name(variant_config("moe", base)) == "moe"


def test_plan_is_the_grid_and_runs_share_the_seed_schedule(tmp_path, corpus):
    cfg = tiny(tmp_path, corpus, ablations=["random-12.5-e2"], depths=[2, 3, 4], budgets=[1e9, 2e9], seeds=[0, 1],
               ablation_budgets=[2e9])
    specs = plan(cfg)
    assert len(specs) == 2 * 3 * 2 * 2 + 1 * 1 * 2  # ablations: the middle depth, their budget only
    assert {s.depth for s in specs if s.variant == "random-12.5-e2"} == {3}
    assert len({s.name for s in specs}) == len(specs)
    a, b = (train_config(cfg, RunSpec(v, 3, 2e9, 1)) for v in ("dense", MAIN_MOD))
    assert a.seed == b.seed == 1 and a.data == b.data and a.batch_size == b.batch_size
    assert a.model.dim == 48 and a.model.n_layers == 3 and a.model.n_heads == 6
    # equal FLOPs: each run's steps fit the budget, and MoD's cheaper steps buy more of them
    for tc in (a, b):
        assert tc.total_steps() * tc.flops_per_step <= 2e9 < (tc.total_steps() + 1) * tc.flops_per_step
    assert b.total_steps() > a.total_steps()
    # depth 1 routes no layer every other block: the routed variant starts at depth 2, dense at 1
    low = plan(tiny(tmp_path, corpus, depths=[1, 2], budgets=[1e9], seeds=[0]))
    assert sorted((s.variant, s.depth) for s in low) == [("dense", 1), ("dense", 2), (MAIN_MOD, 2)]


def test_tiny_sweep_end_to_end(tmp_path, corpus):
    cfg = tiny(tmp_path, corpus)
    lines: list[str] = []
    res = run_sweep(cfg, echo=lines.append)
    out = Path(cfg.out_dir)
    # every run trained at the budget, evaluated in both modes
    assert len(res["results"]) == 4
    for r in res["results"]:
        assert r["train_flops"] <= 1.5e9 and r["loss_topk"] > 0 and r["loss_causal"] is not None
        assert (out / "results" / f"{r['run']}.json").exists()
    mod = [r for r in res["results"] if r["variant"] == MAIN_MOD]
    assert all(r["causal_acc"] is not None and 0 <= r["causal_acc"] <= 1 for r in mod)
    assert all(r["fwd_flops_per_token"] < d["fwd_flops_per_token"] for r, d in
               zip(sorted(mod, key=lambda r: r["depth"]),
                   sorted((r for r in res["results"] if r["variant"] == "dense"), key=lambda r: r["depth"])))
    # decode speed against the dense twin, measured for the routed variant (dense is its own twin)
    speed = json.loads((out / "speed.json").read_text())
    routed = speed[f"{MAIN_MOD}-d2"]
    assert routed["ratio"] == pytest.approx(routed["tok_s"] / routed["dense_tok_s"], rel=1e-9)
    assert routed["ideal"] > 1 and 0 <= routed["routed_frac_decode"] <= 1 and routed["rounds"] == 1
    assert routed["checkpoint"] == next(r["checkpoint"] for r in mod if r["depth"] == 2)
    assert speed["dense-d2"]["ratio"] == 1.0
    assert res["speed"] == speed
    # outputs: CSV (one row per run), summary, table with a row per (variant, size), findings, 3 PNGs
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == [r["run"] for r in res["results"]]
    for row, r in zip(rows, res["results"]):
        assert float(row["loss_topk"]) == r["loss_topk"] and int(row["steps"]) == r["steps"]
        assert row["decode_ratio"] == str(speed[f"{r['variant']}-d{r['depth']}"]["ratio"])
    table = (out / "table.md").read_text()
    assert table == res["table"] + "\n"
    body = table.splitlines()[2:]
    assert len(body) == 4
    for r in res["results"]:  # one seed: each row holds its run's numbers
        ratio = speed[f"{r['variant']}-d{r['depth']}"]["ratio"]
        line = next(line for line in body if line.startswith(f"| 1.5e+09 | {r['variant']} | {r['depth']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[4] == str(r["steps"]) and cells[6] == f"{r['loss_topk']:.4f}"
        assert cells[7] == f"{r['loss_causal']:.4f}" and cells[9] == f"{ratio:.2f}x" and cells[10] == "1"
    # the findings name the best of each variant, their losses and the verdict of a single seed
    best = {v: min((r for r in res["results"] if r["variant"] == v), key=lambda r: r["loss_topk"])
            for v in ("dense", MAIN_MOD)}
    findings_md = (out / "findings.md").read_text()
    assert findings_md == "".join(f"- {n}\n" for n in res["findings"])
    first = res["findings"][0]
    assert first.startswith(f"Budget 1.5e+09: the best {MAIN_MOD} (depth {best[MAIN_MOD]['depth']},")
    assert f"reaches {best[MAIN_MOD]['loss_topk']:.4f}" in first
    assert f"the best dense (depth {best['dense']['depth']}" in first and f"{best['dense']['loss_topk']:.4f}" in first
    diff = best[MAIN_MOD]["loss_topk"] - best["dense"]["loss_topk"]
    assert f"difference {diff:+.4f}; one seed: no spread to judge by." in first
    for name in ("isoflop", "loss_vs_forward_flops", "training_curves"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG
    # what the sweep printed: the table and the findings
    printed = "\n".join(lines)
    assert f"\n{res['table']}\n" in printed and all(f"\n- {n}\n" in printed for n in res["findings"])


def test_findings_follow_the_numbers_and_the_spread():
    def row(variant, depth, loss, std, fwd):
        return {"variant": variant, "depth": depth, "budget": 1e12, "seeds": 3, "params": depth * 1000,
                "active_params": depth * 1000, "steps": 1, "fwd_flops_per_token": fwd, "loss_topk": loss,
                "loss_topk_std": std, "loss_causal": None, "loss_causal_std": None, "causal_acc": None,
                "causal_acc_std": None, "decode_ratio": None}

    clear = [row("dense", 2, 2.0, 0.01, 10), row("dense", 3, 2.1, 0.01, 20), row(MAIN_MOD, 3, 1.9, 0.01, 8),
             row("random-12.5-e2", 3, 2.3, 0.01, 12)]
    text = " ".join(findings(clear))
    assert "agrees with the paper (at or below dense)" in text and "larger than the best dense" in text
    assert "agrees with the paper (random worse)" in text and "0.80x" in text
    noisy = [row("dense", 2, 2.0, 0.2, 10), row(MAIN_MOD, 2, 1.98, 0.2, 6)]
    assert "not resolved by these seeds" in " ".join(findings(noisy))
    worse = [row("dense", 2, 2.0, 0.001, 10), row(MAIN_MOD, 2, 2.1, 0.001, 6)]
    text = " ".join(findings(worse))
    assert "disagrees with the paper (above dense)" in text and "no mod-12.5-e2 size reaches" in text
    # the summary's mean and spread over seeds
    results = [{"variant": "dense", "depth": 2, "budget": 1.0, "params": 1, "active_params": 1, "steps": 1,
                "fwd_flops_per_token": 1.0, "loss_topk": v, "loss_causal": v, "causal_acc": None, "seed": i}
               for i, v in enumerate((1.0, 2.0, 3.0))]
    (s,) = summarise(results, {})
    assert s["loss_topk"] == 2.0 and s["loss_topk_std"] == 1.0 and s["seeds"] == 3


def test_a_rerun_with_other_settings_is_refused_and_overwrite_retrains(tmp_path, corpus, capsys):
    """A finished run is reused only with its own settings: another --lr into the same folder stops with
    the one-line refusal (the old result is not handed back), and --overwrite trains the run again."""
    out = tmp_path / "lr"
    args = ["sweep", "--out", str(out), *ARGS, "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"),
            "--decode-tokens", "0"]
    args[args.index("--variants") + 1], args[args.index("--depths") + 1] = "dense", "2"
    run = "dense-d2-b1.5e9-s0"
    assert main(args) == 0
    first = json.loads((out / "results" / f"{run}.json").read_text())
    assert first["settings"]["lr"] == 2e-3
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args + ["--lr", "1e-3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a run with other settings; pass --overwrite" in err[0], err
    assert json.loads((out / "results" / f"{run}.json").read_text()) == first  # nothing replaced
    assert main(args + ["--lr", "1e-3", "--overwrite"]) == 0
    again = json.loads((out / "results" / f"{run}.json").read_text())
    assert again["settings"]["lr"] == 1e-3 and again["steps"] == first["steps"]
    assert again["loss_topk"] != first["loss_topk"]  # trained again, at the new rate
    assert json.loads((out / "runs" / run / "run.json").read_text())["lr"] == 1e-3
    with open(out / "runs.csv") as f:
        assert [float(r["loss_topk"]) for r in csv.DictReader(f)] == [again["loss_topk"]]


def test_killed_sweep_resumes_without_retraining(tmp_path, corpus, monkeypatch):
    """Kill a sweep while its second run trains; the rerun reuses the first, resumes the second from its
    checkpoint (kept as it was, with the metrics logged up to it), and the table equals an uninterrupted
    sweep's."""
    budget = "6e9"  # ~300 steps of the smallest model: a wide window to kill the second run in
    args = [a if a != "1.5e9" else budget for a in ARGS] + ["--data", str(corpus), "--decode-tokens", "0",
                                                            "--evals", "6"]
    out = tmp_path / "killed"
    env = {**os.environ, "MIXDEPTH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mixdepth", "sweep", "--out", str(out), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first, second = f"dense-d2-b{budget}-s0", f"{MAIN_MOD}-d2-b{budget}-s0"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if (out / "results" / f"{first}.json").exists() and (out / "runs" / second / "latest").exists():
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "results" / f"{second}.json").exists(), "the second run finished before the kill"
    kept = {p: p.stat().st_mtime_ns for p in (out / "runs" / first).rglob("*") if p.is_file()}
    kept[out / "results" / f"{first}.json"] = (out / "results" / f"{first}.json").stat().st_mtime_ns
    # the cut-off run: its latest checkpoint and the metrics logged up to it (their step times differ
    # from any other run's, so a run restarted from scratch cannot write these lines again)
    cut = out / "runs" / second
    ckpt = latest_checkpoint(cut)
    at = json.loads((ckpt / "trainer.json").read_text())["step"]
    files = {p.relative_to(ckpt): p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    logged = [line for line in (cut / "metrics.jsonl").read_text().splitlines()
              if line.endswith("}") and json.loads(line)["step"] <= at]
    assert at > 0 and logged and json.loads(logged[-1])["step"] == at
    resumed = []
    resume = Trainer._resume

    def spy(self, state):  # what the rerun finds when it resumes the cut-off run
        found = latest_checkpoint(self.out)
        resumed.append((found, {p.relative_to(found): p.read_bytes() for p in found.rglob("*") if p.is_file()}))
        resume(self, state)
        resumed[-1] += (self.step,)

    monkeypatch.setattr(Trainer, "_resume", spy)
    assert main(["sweep", "--out", str(out), *args]) == 0
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # the finished run was reused, not retrained
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    assert lines[: len(logged)] == logged, "the records logged before the kill were not kept"
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == sorted(set(steps)), "the resumed run repeated or lost steps"
    total = json.loads((out / "results" / f"{second}.json").read_text())["steps"]
    assert steps[len(logged)] > at and steps[-1] == total  # continued after the checkpoint, to the end
    assert len(resumed) == 1, "the cut-off run was not resumed"
    found, found_files, step = resumed[0]
    assert found == ckpt and found_files == files and step == at  # from the checkpoint of the kill, unchanged

    ref = tmp_path / "whole"
    assert main(["sweep", "--out", str(ref), *args]) == 0
    assert (out / "table.md").read_text() == (ref / "table.md").read_text()
    with open(out / "runs.csv") as f, open(ref / "runs.csv") as g:
        a, b = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert [r["loss_topk"] for r in a] == [r["loss_topk"] for r in b]


def test_workers_give_the_table_of_one_process(tmp_path, corpus):
    """-j 2: worker processes (one thread each), one progress view, the same losses as in-process."""
    one = run_sweep(tiny(tmp_path, corpus, name="one", decode_tokens=0, threads=1))
    two = run_sweep(tiny(tmp_path, corpus, name="two", decode_tokens=0, jobs=2, threads=1))
    for a, b in zip(one["results"], two["results"]):
        assert a["run"] == b["run"] and a["steps"] == b["steps"]
        assert a["loss_topk"] == pytest.approx(b["loss_topk"], abs=1e-4)
    assert (tmp_path / "two" / "logs" / "dense-d2-b1.5e9-s0.log").exists()


@pytest.mark.parametrize("flags, message", [
    (["--variants", "dense,mod-12.5-e2,moon"], "unknown variant 'moon'"),
    (["--budgets", "1e6"], "less than one optimizer step"),
    (["--seq-len", "64", "--max-seq-len", "32"], "does not fit the size family's max_seq_len"),
    (["--depths", "1"], "routes no layer at depth 1"),
    (["--aspect", "12"], "not a multiple of --head-dim"),
])
def test_bad_sweeps_stop_before_training(tmp_path, corpus, capsys, flags, message):
    out = tmp_path / "bad"
    args = [a for a in ARGS]
    for flag, value in zip(flags[::2], flags[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--out", str(out), "--data", str(corpus), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (out / "runs").exists()  # nothing trained
