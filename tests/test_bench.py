"""The benchmark harness produces well-formed records (speed itself is never asserted in tests:
numbers come from `mixdepth bench` runs, not from timed unit tests)."""

import json

import pytest
import torch

from mixdepth import ModelConfig, bench, flops
from mixdepth.cli import main

KEYS = {"case", "dense_tok_s", "mod_tok_s", "ratio", "ideal_ratio", "efficiency", "settings"}
CPU = dict(device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture
def cfg():
    return ModelConfig.from_name("debug", max_seq_len=64)


def test_train_and_prefill_records(cfg):
    for rec in (bench.bench_train(cfg, 2, 64, iters=1, **CPU), bench.bench_prefill(cfg, 2, 64, iters=1, **CPU)):
        assert KEYS <= rec.keys()
        assert rec["ratio"] == pytest.approx(rec["dense_step_s"] / rec["mod_step_s"])
        assert rec["efficiency"] == pytest.approx(rec["ratio"] / rec["ideal_ratio"])
    assert rec["ideal_ratio"] == pytest.approx(flops.ideal_speedup(cfg, 64, "prefill"))


def test_decode_record_counts_routed_fraction_and_kv(cfg):
    rec = bench.bench_decode(cfg, 3, 32, 8, rounds=1, **CPU)
    assert rec["case"] == "decode-b3"
    # calibrated to the capacity on random tokens, fed random tokens: the fraction is near it
    assert 0.0 < rec["routed_frac_decode"] < 0.5
    n_routed = len(cfg.routed_layer_ids)
    expected_kv = (cfg.n_layers - n_routed + n_routed * rec["routed_frac_decode"]) / cfg.n_layers
    assert 0 < rec["kv_bytes_ratio"] < 1
    # prefill tokens route too, so only a loose check against the decode-time fraction
    assert rec["kv_bytes_ratio"] == pytest.approx(expected_kv, abs=0.15)


def test_memory_counts_fewer_saved_activations(cfg):
    rec = bench.bench_memory(cfg, 2, 64, **CPU)
    assert 0 < rec["mod_activation_bytes"] < rec["dense_activation_bytes"]


def test_capacities_has_one_record_per_variant(cfg):
    recs = bench.bench_capacities(cfg, 1, 32, [1.0, 0.25], [1, 2], iters=1, **CPU)
    assert [r["case"] for r in recs] == ["train-C1-every1", "train-C0.25-every1", "train-C1-every2",
                                         "train-C0.25-every2"]
    ideal = {r["case"]: r["ideal_ratio"] for r in recs}
    assert ideal["train-C0.25-every1"] > ideal["train-C0.25-every2"] > 1 > ideal["train-C1-every1"]


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    code = main(["bench", "train", "--preset", "debug", "--seq-len", "32", "--batch-size", "1", "--iters", "1",
                 "--json", str(out)])
    assert code == 0
    recs = json.loads(out.read_text())
    assert recs[0]["case"] == "train" and KEYS <= recs[0].keys()
    assert "train" in capsys.readouterr().out


def test_cli_refuses_dense_only(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "train", "--preset", "debug", "--routing.router", "none"])
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag, value", [("--decode-batches", "1,x"), ("--capacities", "0.5,abc"),
                                         ("--route-every", "0")])
def test_cli_bad_number_lists_name_the_flag(capsys, flag, value):
    what = "decode" if flag == "--decode-batches" else "capacities"
    with pytest.raises(SystemExit) as e:
        main(["bench", what, "--preset", "debug", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]
