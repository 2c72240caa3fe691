"""The `mixdepth` command in-process: help, the `flops` table, and one-line errors with exit status 2."""

from __future__ import annotations

import json

import pytest

from mixdepth import flops
from mixdepth.cli import main
from mixdepth.config import ModelConfig


def _exit_code(argv) -> int:
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    return excinfo.value.code


def _table(out: str) -> dict[str, list[str]]:
    """Rows of the printed table by model name: the lines whose first cell is a known router."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] in ("dense", "expert_choice", "token_choice", "random", "model"):
            rows[cells[0]] = cells
    return rows


def test_top_level_help(capsys):
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: mixdepth" in out and "flops" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "flops" in capsys.readouterr().out


def test_flops_help_lists_generated_flags(capsys):
    assert _exit_code(["flops", "-h"]) == 0
    out = capsys.readouterr().out
    for flag in ("--preset", "--routing.capacity", "--routing.router", "--model.dim", "--model.n_kv_heads"):
        assert flag in out
    # help text comes from the dataclass attribute docstrings
    assert "k = ceil(C*T)" in out


def test_flops_table_debug_preset(capsys):
    assert main(["flops", "--preset", "debug", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert set(rows) == {"model", "dense", "expert_choice"}
    header = rows["model"]
    cfg = ModelConfig.from_name("debug")
    want = {r["model"]: r for r in flops.flops_table(cfg, 64)}
    for name in ("dense", "expert_choice"):
        cells = dict(zip(header, rows[name]))
        assert int(cells["params"].replace(",", "")) == want[name]["params"]
        assert float(cells["train_ratio_vs_dense"]) == pytest.approx(want[name]["train_ratio_vs_dense"], abs=1e-3)
    assert float(dict(zip(header, rows["dense"]))["train_ratio_vs_dense"]) == 1.0
    assert float(dict(zip(header, rows["expert_choice"]))["train_ratio_vs_dense"]) < 1.0
    assert "k=8 tokens" in out  # ceil(0.125 * 64)


def test_flops_flags_and_config_file_precedence(tmp_path, capsys):
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps({"model": {"dim": 32}, "routing": {"capacity": 0.25, "router": "token_choice"}}))
    out_json = tmp_path / "rows.json"
    argv = ["flops", "--preset", "debug", "--config", str(cfg_file), "--routing.capacity", "0.5", "--seq-len", "40",
            "--json", str(out_json), "--budget", "1e10"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "dim=32" in out  # file over preset
    assert "capacity=0.5" in out and "k=20 tokens" in out  # flag over file
    assert "token_choice" in _table(out)
    cfg = ModelConfig.from_name("debug", dim=32, routing=dict(capacity=0.5, router="token_choice"))
    assert json.loads(out_json.read_text()) == json.loads(json.dumps(flops.flops_table(cfg, 40)))
    steps = flops.steps_for_budget(cfg, 1e10, 40, 1)
    assert f"token_choice trains {steps} steps" in out


@pytest.mark.parametrize("argv, words", [
    (["flops", "--routing.capacity", "1.5"], ["routing.capacity", "1.5"]),
    (["flops", "--routing.capacity", "-0.5"], ["routing.capacity"]),
    (["flops", "--routing.router", "moe"], ["routing.router", "moe"]),
    (["flops", "--routing.gate", "tanh"], ["routing.gate"]),
    (["flops", "--model.n_heads", "3", "--model.n_kv_heads", "1"], ["model.dim", "model.n_heads"]),
    (["flops", "--preset", "debug", "--model.n_heads", "3"], ["model.n_heads", "model.n_kv_heads"]),
    (["flops", "--preset", "debug", "--routing.routed_layers", "1,9"], ["routing.routed_layers"]),
    (["flops", "--model.dim", "abc"], ["--model.dim", "abc"]),
    (["flops", "--routing.routed_layers", "1,x"], ["--routing.routed_layers"]),
    (["flops", "--preset", "huge"], ["--preset", "huge"]),
    (["flops", "--no-such-flag"], ["--no-such-flag"]),
    (["flops", "--seq-len", "-3"], ["--seq-len"]),
    (["flops", "--seq-len", "0"], ["--seq-len"]),
    (["flops", "--preset", "debug", "--seq-len", "500"], ["--seq-len", "500", "max_seq_len 128"]),
    (["flops", "--preset", "debug", "--context", "129"], ["--context", "129", "max_seq_len 128"]),
    (["flops", "--config", "/nonexistent/run.json"], ["/nonexistent/run.json"]),
    (["bench", "--device", "gpu"], ["device", "gpu"]),
    (["frobnicate"], ["frobnicate"]),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, words):
    assert _exit_code(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "error" in lines[0] and "Traceback" not in captured.err
    for w in words:
        assert w in lines[0]
    assert captured.out == ""


def test_unwritable_output_is_one_line_and_exit_2(tmp_path, capsys):
    assert _exit_code(["flops", "--preset", "debug", "--json", str(tmp_path)]) == 2  # a folder, not a file
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and str(tmp_path) in err, err


def test_bad_config_file_contents(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    for content, word in [("{oops", "not valid JSON"), ("[1]", "JSON object"),
                          (json.dumps({"model": {"dimm": 3}}), "dimm"),
                          (json.dumps({"routing": {"capcity": 0.3}}), "capcity")]:
        bad.write_text(content)
        assert _exit_code(["flops", "--config", str(bad)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and word in lines[0], lines


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "mixdepth", "flops", "--preset", "debug", "--routing.capacity",
                          "2"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "routing.capacity" in res.stderr


@pytest.mark.parametrize("command", [["flops"], ["bench", "train"], ["train"]])
def test_config_file_with_an_unknown_section_is_refused(tmp_path, capsys, command):
    """A misspelt section used to be ignored silently; every command that reads --config refuses it."""
    bad = tmp_path / "run.json"
    bad.write_text(json.dumps({"rounting": {"capacity": 0.25}}))
    assert _exit_code([*command, "--config", str(bad), "--preset", "debug"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "'rounting'" in lines[0] and "known: model, routing, moe, train" in lines[0], lines
    assert captured.out == ""


def test_config_file_train_section_is_read_by_train_and_ignored_elsewhere(tmp_path, capsys):
    from mixdepth.cli import build_parser
    from mixdepth.commands.train import config_from_args

    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps({"routing": {"capacity": 0.25}, "train": {"lr": 5e-4}}))
    assert main(["flops", "--preset", "debug", "--config", str(cfg_file)]) == 0
    assert "capacity=0.25" in capsys.readouterr().out
    args = build_parser().parse_args(["train", "--config", str(cfg_file), "--out", str(tmp_path / "r")])
    cfg = config_from_args(args)
    assert cfg.lr == 5e-4 and cfg.model.routing.capacity == 0.25


def test_flops_refuses_a_length_beyond_max_seq_len_and_takes_max_seq_len(capsys):
    max_len = ModelConfig.from_name("debug").max_seq_len
    with pytest.raises(SystemExit) as e:
        main(["flops", "--preset", "debug", "--seq-len", str(max_len + 1)])
    assert e.value.code == 2
    assert main(["flops", "--preset", "debug", "--seq-len", str(max_len)]) == 0
    assert f"seq_len={max_len}" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["train"], ["eval", "--checkpoint", "x"], ["bench"],
                                     ["generate", "--checkpoint", "x", "--prompt", "p"]])
def test_device_flags_are_one_vocabulary(command):
    from mixdepth.cli import build_parser

    takes_dtype = command[0] in ("train", "bench")
    args = build_parser().parse_args(command)
    device = getattr(args, "train.device" if command[0] == "train" else "device")
    assert device == (None if command[0] == "train" else "auto")  # train: unset, so run.json and --config apply
    for name in ("auto", "cpu", "cuda", "cuda:1"):
        args = build_parser().parse_args([*command, "--device", name])
        assert getattr(args, "train.device" if command[0] == "train" else "device") == name
    if takes_dtype:
        for name in ("auto", "fp32", "bf16"):
            args = build_parser().parse_args([*command, "--dtype", name])
            assert getattr(args, "train.dtype" if command[0] == "train" else "dtype") == name


@pytest.mark.parametrize("argv, words", [
    (["bench", "--dtype", "float32"], ["--dtype", "float32"]),
    (["eval", "--checkpoint", "x", "--device", "cuda:x"], ["--device", "cuda:x"]),
    (["generate", "--checkpoint", "x", "--prompt", "p", "--device", "mps"], ["--device", "mps"]),
    (["train", "--device", "gpu"], ["--device", "gpu"]),
    (["train", "--dtype", "fp16"], ["--dtype", "fp16"]),
])
def test_bad_device_or_dtype_is_one_line(capsys, argv, words):
    assert _exit_code(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), lines


def test_train_device_flag_reaches_the_config(tmp_path):
    from mixdepth.cli import build_parser
    from mixdepth.commands.train import config_from_args

    for flag in ("--device", "--train.device"):
        args = build_parser().parse_args(["train", flag, "cuda:1", "--dtype", "bf16", "--out", str(tmp_path)])
        cfg = config_from_args(args)  # TrainConfig accepts cuda:N (resolving it needs CUDA, building does not)
        assert cfg.device == "cuda:1" and cfg.dtype == "bf16"
