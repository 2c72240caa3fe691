"""Training: schedule, budgets (equal FLOPs), exact resume after SIGKILL, NaN stop, one-line errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mixdepth import flops
from mixdepth.checkpoint import list_checkpoints, load_model, resolve_checkpoint
from mixdepth.cli import main
from mixdepth.config import ModelConfig
from mixdepth.model import MoDTransformer
from mixdepth.train import TrainConfig, lr_at, make_optimizer, run_train

SONNETS = Path(__file__).parent / "data" / "sonnets.txt"
SMALL = dict(seq_len=32, batch_size=2, eval_batches=2, warmup_steps=3, log_every=1)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(SMALL, data=str(SONNETS), cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "run"),
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule_warmup_then_cosine_to_min_lr(tmp_path):
    cfg = _cfg(tmp_path, lr=1e-2, min_lr=1e-3, warmup_steps=10, max_steps=100)
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine falls
    assert lr_at(100, cfg, 100) == pytest.approx(1e-3)
    assert lr_at(55, cfg, 100) == pytest.approx(1e-3 + 0.5 * 9e-3)  # halfway through the decay


def test_optimizer_decays_matrices_only(debug_cfg, tmp_path):
    model = MoDTransformer(debug_cfg())
    opt = make_optimizer(model, _cfg(tmp_path, weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_train_config_validation_is_one_line(tmp_path):
    for kw, needle in [(dict(max_steps=5, max_flops=1e9), "one budget"), (dict(lr=-1.0), "train.lr"),
                       (dict(batch_size=0), "train.batch_size"), (dict(seq_len=10_000), "max_seq_len"),
                       (dict(tokenizer="words"), "train.tokenizer"), (dict(max_tokens=0), "train.max_tokens")]:
        with pytest.raises(ValueError) as e:
            _cfg(tmp_path, **kw)
        assert needle in str(e.value) and "\n" not in str(e.value)
    c = _cfg(tmp_path, max_tokens=1000, grad_accum=2)
    assert c.tokens_per_step == 128 and c.total_steps() == math.ceil(1000 / 128)
    assert _cfg(tmp_path).total_steps() == 1000  # no budget given: the default
    again = TrainConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c


def test_equal_flop_budgets_give_the_steps_flops_predicts(tmp_path):
    """Dense and MoD trained on one FLOP budget take the steps `flops.steps_for_budget` says."""
    mod = ModelConfig.from_name("debug")
    dense = mod.with_routing(router="none")
    budget = 8 * flops.train_step_flops(dense, 32, 2)
    runs = {}
    for name, m in (("dense", dense), ("mod", mod)):
        cfg = _cfg(tmp_path, model=m, max_flops=budget, out_dir=str(tmp_path / name), eval_every=0,
                   ckpt_every=0)
        predicted = flops.steps_for_budget(m, budget, 32, 2)
        assert cfg.total_steps() == predicted
        summary = run_train(cfg)
        runs[name] = summary
        assert summary["steps"] == predicted
        step_flops = flops.train_step_flops(m, 32, 2)
        assert summary["flops"] == pytest.approx(predicted * step_flops)
        assert summary["flops"] <= budget < summary["flops"] + step_flops
        last = _metrics(Path(cfg.out_dir))[-1]
        assert last["step"] == predicted and last["flops"] == pytest.approx(summary["flops"])
    assert runs["dense"]["steps"] == 8
    assert runs["mod"]["steps"] > runs["dense"]["steps"]  # MoD steps are cheaper


def test_metrics_record_and_final_calibration(tmp_path):
    cfg = _cfg(tmp_path, max_steps=6, eval_every=3, ckpt_every=3, log_every=2)
    summary = run_train(cfg)
    rows = _metrics(Path(cfg.out_dir))
    assert [r["step"] for r in rows] == [2, 3, 4, 6]  # log steps plus the eval step 3
    full = rows[0]
    for key in ("step", "tokens", "flops", "loss", "lm_loss", "aux_loss", "predictor_loss", "lr", "grad_norm",
                "routed_frac", "causal_acc", "step_time"):
        assert key in full, key
    assert len(full["routed_frac"]) == len(cfg.model.routed_layer_ids) == len(full["causal_acc"])
    assert full["tokens"] == 2 * cfg.tokens_per_step
    assert "val_loss" in rows[1] and "val_loss" in rows[-1]
    assert summary["val_loss"] == rows[-1]["val_loss"] and summary["steps"] == 6
    run = json.loads((Path(cfg.out_dir) / "run.json").read_text())
    assert run["total_steps"] == 6 and run["model"]["dim"] == cfg.model.dim
    # the final checkpoint is calibrated: its causal thresholds moved off their initial 0
    model = load_model(cfg.out_dir)
    assert all(float(layer.causal_threshold) != 0.0 for layer in model.routed_layers)
    assert [p.name for p in list_checkpoints(cfg.out_dir)] == ["step-000003", "step-000006"]
    assert summary["train_lm_loss"] == rows[-1]["lm_loss"]
    # resuming a finished run does no step and reports the same figures
    again = run_train(_cfg(tmp_path, max_steps=6, eval_every=3, ckpt_every=3, log_every=2, resume=True))
    assert (again["steps"], again["val_loss"], again["train_lm_loss"]) == (6, summary["val_loss"],
                                                                         summary["train_lm_loss"])
    assert _metrics(Path(cfg.out_dir)) == rows


def test_nan_loss_stops_with_one_line_and_keeps_checkpoints(tmp_path, monkeypatch):
    calls = {"n": 0}
    orig = MoDTransformer.forward

    def poisoned(self, *a, **k):
        out = orig(self, *a, **k)
        if self.training:
            calls["n"] += 1
            if calls["n"] >= 5 and out.loss is not None:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MoDTransformer, "forward", poisoned)
    cfg = _cfg(tmp_path, max_steps=10, ckpt_every=2, eval_every=0)
    with pytest.raises(ValueError) as e:
        run_train(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "nan" in msg and "step 5" in msg and "step-000004" in msg
    assert resolve_checkpoint(cfg.out_dir).name == "step-000004"
    monkeypatch.setattr(MoDTransformer, "forward", orig)
    load_model(cfg.out_dir)  # the earlier checkpoint is intact


def _cli(args: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _train_args(tmp_path, out: Path, *extra: str) -> list[str]:
    return ["train", "--train.data", str(SONNETS), "--train.seq_len", "32", "--train.batch_size", "2",
            "--train.eval_batches", "1", "--train.cache_dir", str(tmp_path / "cache"), "--out", str(out),
            "--no-progress", *extra]


@pytest.mark.parametrize("case", ["empty", "missing", "binary", "vocab"])
def test_cli_bad_data_is_one_line_exit_2(tmp_path, capsys, case):
    data = tmp_path / "corpus.txt"
    extra = []
    if case == "empty":
        data.write_text("")
    elif case == "binary":
        data.write_bytes(bytes(range(256)) * 4)
    elif case == "vocab":  # byte tokens up to 'y' (121) cannot be embedded in a vocabulary of 64
        data.write_text(SONNETS.read_text())
        extra = ["--model.vocab_size", "64"]
    args = _train_args(tmp_path, tmp_path / "run", "--train.max_steps", "2", *extra)
    args[args.index("--train.data") + 1] = str(data)
    code, err = _cli(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mixdepth train: error:"), err
    needle = {"empty": "empty", "missing": "not found", "binary": "binary", "vocab": "out of range"}[case]
    assert needle in lines[0]
    assert not list_checkpoints(tmp_path / "run")


def test_cli_resume_guards(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    code, err = _cli(_train_args(tmp_path, out, "--train.max_steps", "2"), capsys)
    assert code == 0, err
    # a second run into the same folder without --resume would clobber it
    code, err = _cli(_train_args(tmp_path, out, "--train.max_steps", "2"), capsys)
    assert code == 2 and "--resume" in err and len(err.strip().splitlines()) == 1
    # resuming with another model config
    code, err = _cli(_train_args(tmp_path, out, "--resume", "--routing.capacity", "0.25"), capsys)
    assert code == 2 and "routing.capacity" in err and len(err.strip().splitlines()) == 1, err
    # resuming with another budget (the schedule depends on it)
    code, err = _cli(_train_args(tmp_path, out, "--resume", "--train.max_steps", "4"), capsys)
    assert code == 2 and "budget" in err, err
    # other training settings are allowed, with a warning that the trajectory changes
    code, err = _cli(_train_args(tmp_path, out, "--resume", "--train.lr", "0.01"), capsys)
    assert code == 0 and "changed settings (lr 0.001 -> 0.01)" in caplog.text, err
    # nothing to resume
    code, err = _cli(_train_args(tmp_path, tmp_path / "fresh", "--resume"), capsys)
    assert code == 2 and "nothing to resume" in err


def test_resume_with_a_train_only_config_file_keeps_the_run_model(tmp_path):
    from mixdepth.cli import build_parser
    from mixdepth.commands.train import config_from_args

    out = tmp_path / "run"
    out.mkdir()
    run_cfg = _cfg(tmp_path, model=ModelConfig.from_name("debug", dim=96), max_steps=2)
    (out / "run.json").write_text(json.dumps(run_cfg.to_dict()))
    cfg_file = tmp_path / "train.json"
    cfg_file.write_text(json.dumps({"train": {"lr": 5e-4}}))
    args = build_parser().parse_args(["train", "--out", str(out), "--resume", "--config", str(cfg_file)])
    got = config_from_args(args)
    assert got.model == run_cfg.model and got.lr == 5e-4
    cfg_file.write_text(json.dumps({"model": {"dim": 128}}))  # a file that sets the model still does
    args = build_parser().parse_args(["train", "--out", str(out), "--resume", "--config", str(cfg_file)])
    assert config_from_args(args).model.dim == 128


# ---- exact resume after SIGKILL -------------------------------------------------------------------
STEPS = 40


def _cmd(out: Path, cache: Path, router: str) -> list[str]:
    return [sys.executable, "-m", "mixdepth", "train", "--train.data", str(SONNETS), "--train.seq_len", "32",
            "--train.batch_size", "2", "--train.max_steps", str(STEPS), "--train.log_every", "1",
            "--train.ckpt_every", "5", "--train.keep_last", "2", "--train.eval_every", "10",
            "--train.eval_batches", "1", "--train.warmup_steps", "5", "--train.cache_dir", str(cache),
            "--routing.router", router, "--out", str(out), "--no-progress"]


def _env() -> dict[str, str]:
    # one intra-op thread: the same reduction order in every process (and fair on 2 shared cores)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _latest_step(out: Path) -> int:
    try:
        return int((out / "latest").read_text().strip().rsplit("-", 1)[1])
    except (FileNotFoundError, IndexError, ValueError):
        return -1


def _last_logged(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else -1
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


@pytest.mark.parametrize("router", ["expert_choice", "random"])
def test_resume_after_sigkill_is_bit_identical(tmp_path, router):
    """Kill a training subprocess between checkpoints, resume it, and compare with a run never killed.

    `random` routing draws from torch's global RNG inside the forward pass, so it also checks that
    the RNG state is saved and restored (and that evaluation does not consume it).
    """
    cache = tmp_path / "cache"
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    proc = subprocess.Popen(_cmd(killed, cache, router), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300  # generous: the 2 CPU cores may be shared
    try:
        # kill once a checkpoint >= 10 exists and some steps after it are done (work to redo)
        while not (_latest_step(killed) >= 10 and _last_logged(killed) > _latest_step(killed)):
            if proc.poll() is not None:
                pytest.fail(f"training ended before it could be killed: {proc.stderr.read().decode()[-500:]}")
            assert time.monotonic() < deadline, "training made no progress"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    ckpt_step = _latest_step(killed)
    assert proc.returncode == -signal.SIGKILL
    assert 10 <= ckpt_step < STEPS, ckpt_step

    resumed = subprocess.run(_cmd(killed, cache, router) + ["--resume"], env=_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-1000:]
    assert f"resuming {killed} from step-{ckpt_step:06d}" in resumed.stderr
    full = subprocess.run(_cmd(ref, cache, router), env=_env(), capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-1000:]

    a, b = _metrics(killed), _metrics(ref)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    keys = ("loss", "lm_loss", "aux_loss", "predictor_loss", "lr", "grad_norm", "routed_frac", "causal_acc",
            "tokens", "flops", "val_loss")
    for ra, rb in zip(a, b):
        for k in keys:
            assert ra.get(k) == rb.get(k), (ra["step"], k, ra.get(k), rb.get(k))
    # the steps after the checkpoint were really recomputed by the resumed process, and the
    # final weights agree bit for bit
    ma, mb = load_model(killed), load_model(ref)
    for (n, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, equal_nan=True, msg=n)  # NaN: uncalibrated random
    assert [p.name for p in list_checkpoints(killed)] == [f"step-{STEPS - 5:06d}", f"step-{STEPS:06d}"]


def test_bpe_run_saves_its_tokenizer_and_sizes_the_vocabulary(tmp_path):
    from mixdepth.data import BPETokenizer, load_tokenizer
    from mixdepth.evaluate import run_eval

    cfg = _cfg(tmp_path, tokenizer="bpe", bpe_vocab_size=320, max_steps=3, eval_every=0)
    summary = run_train(cfg)
    ckpt = Path(summary["checkpoint"])
    tok = load_tokenizer(ckpt)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 320
    assert load_model(ckpt).cfg.vocab_size == 320  # the model follows the tokenizer
    r = run_eval(ckpt, batches=1, batch_size=2, cache_dir=str(tmp_path / "cache"))
    assert r["tokens"] == 2 * 32 and math.isfinite(r["loss_topk"]) and r["loss_topk"] < math.log(320) + 1


def test_grad_accumulation_averages_micro_batches(tmp_path, monkeypatch):
    """With the same micro-batch repeated, accumulating 3 of them must equal one step on it."""
    from mixdepth.data import TokenData

    g = torch.Generator().manual_seed(0)
    fixed = torch.randint(0, 256, (2, 33), generator=g)

    def same_batch(self, split, starts, seq_len, device="cpu"):
        return fixed[:, :-1].clone(), fixed[:, 1:].clone()

    monkeypatch.setattr(TokenData, "batch_at", same_batch)
    rows = {}
    for accum in (1, 3):
        cfg = _cfg(tmp_path, max_steps=2, grad_accum=accum, eval_every=0, out_dir=str(tmp_path / f"a{accum}"))
        run_train(cfg)
        rows[accum] = _metrics(Path(cfg.out_dir))
    for a, b in zip(rows[1], rows[3]):
        assert b["tokens"] == 3 * a["tokens"]
        for k in ("loss", "lm_loss", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-5), k


# ---- experiment trackers --------------------------------------------------------------------------
def test_tensorboard_tracker_logs_what_metrics_jsonl_holds(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, max_steps=3, eval_every=3, log_to="tensorboard")
    run_train(cfg)
    rows = _metrics(Path(cfg.out_dir))
    acc = EventAccumulator(str(Path(cfg.out_dir) / "tensorboard"))
    acc.Reload()
    for key in ("lm_loss", "predictor_loss", "grad_norm", "val_loss", "routed_frac/0"):
        assert key in acc.Tags()["scalars"], key
    got = [(e.step, e.value) for e in acc.Scalars("lm_loss")]
    assert got == [(r["step"], pytest.approx(r["lm_loss"])) for r in rows]


def test_wandb_tracker_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(tmp_path, max_steps=3, eval_every=3, log_to="wandb")
    run_train(cfg)
    rows = _metrics(Path(cfg.out_dir))
    runs_ = sorted((Path(cfg.out_dir) / "wandb").glob("offline-run-*"))
    assert len(runs_) == 1 and list(runs_[0].glob("*.wandb")), list((Path(cfg.out_dir) / "wandb").iterdir())
    # the run's record file holds each logged key and value (values as JSON text, the step's own)
    data = next(runs_[0].glob("*.wandb")).read_bytes()
    for key in ("lm_loss", "predictor_loss", "grad_norm", "val_loss", "routed_frac/0"):
        assert key.encode() in data, key
    for r in rows:
        assert json.dumps(r["lm_loss"]).encode() in data, r["lm_loss"]


def test_unknown_tracker_is_refused(tmp_path):
    with pytest.raises(ValueError, match="train.log_to"):
        _cfg(tmp_path, log_to="mlflow")


def test_a_run_json_is_a_config_file(tmp_path):
    """`train --config <run>/run.json` repeats a run: its settings, model included, are read."""
    from mixdepth.cli import build_parser
    from mixdepth.commands.train import config_from_args

    cfg = _cfg(tmp_path, model=ModelConfig.from_name("debug", dim=96, routing=dict(capacity=0.25)), max_steps=2,
               lr=3e-3)
    run_train(cfg)
    args = build_parser().parse_args(["train", "--config", str(Path(cfg.out_dir) / "run.json"),
                                      "--out", str(tmp_path / "again")])
    got = config_from_args(args)
    assert got.model == cfg.model and got.lr == 3e-3 and got.max_steps == 2
    assert got.out_dir == str(tmp_path / "again")
