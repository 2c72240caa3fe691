"""Evaluation: causal-mode loss uses no future information; run_eval's figures; the eval CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mixdepth.checkpoint import save_checkpoint
from mixdepth.cli import main
from mixdepth.data import ByteTokenizer, prepare_corpus
from mixdepth.evaluate import run_eval, token_losses
from mixdepth.model import MoDTransformer

SONNETS = Path(__file__).parent / "data" / "sonnets.txt"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXDEPTH_CACHE", str(tmp_path / "cache"))


def _checkpoint(tmp_path, model: MoDTransformer, name: str = "ck") -> Path:
    state = {"step": 0, "data": str(SONNETS), "seq_len": 32}
    return save_checkpoint(tmp_path / name, model, trainer_state=state, tokenizer=ByteTokenizer())


def _val_batch(T: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    data = prepare_corpus(SONNETS, ByteTokenizer())
    return data.batch_at("val", data.eval_offsets(T, 4), T)


def test_causal_mode_losses_ignore_future_tokens(debug_cfg):
    """Changing the last tokens of a sequence leaves causal-mode per-token losses before them unchanged;
    in topk mode (which reads future router scores) earlier losses do change: the probe is sensitive."""
    torch.manual_seed(0)
    model = MoDTransformer(debug_cfg(capacity=0.25, router_init_std=1.0)).eval()
    x, y = _val_batch()
    model.calibrate_causal(x)
    T, n = x.shape[1], 12
    x2, y2 = x.clone(), y.clone()
    x2[:, -n:] = (x2[:, -n:] * 7 + 13) % 256  # new last tokens (and the targets that see them)
    y2[:, -n - 1:-1] = x2[:, -n:]
    y2[:, -1] = (y2[:, -1] + 1) % 256
    keep = T - n - 1  # positions whose input prefix and target are untouched
    a, _ = token_losses(model, x, y, "causal")
    b, _ = token_losses(model, x2, y2, "causal")
    # equal up to float noise only: the routed token count differs, so the gathered matmuls change
    # shape and summation order (~5e-7); a leak of future information moves losses by ~1e-2
    torch.testing.assert_close(a[:, :keep], b[:, :keep], rtol=0, atol=1e-5)
    assert (a[:, keep:] - b[:, keep:]).abs().max() > 1e-3
    # the routing decisions themselves are exactly unchanged before the edit
    ra = model(x, mode="causal", return_routing=True).routing
    rb = model(x2, mode="causal", return_routing=True).routing
    assert ra.keys() == rb.keys() and len(ra) == len(model.cfg.routed_layer_ids)
    for layer in ra:
        assert torch.equal(ra[layer][:, :T - n], rb[layer][:, :T - n])
    ta, _ = token_losses(model, x, y, "topk")
    tb, _ = token_losses(model, x2, y2, "topk")
    assert (ta[:, :keep] - tb[:, :keep]).abs().max() > 1e-3


def test_token_losses_match_the_model_loss(debug_cfg):
    model = MoDTransformer(debug_cfg()).eval()
    x, y = _val_batch(32)
    for mode in ("topk", "causal"):
        losses, out = token_losses(model, x, y, mode)
        assert losses.shape == x.shape
        torch.testing.assert_close(losses.mean(), out.lm_loss)


def test_run_eval_reports_both_modes_deterministically(tmp_path, debug_cfg):
    model = MoDTransformer(debug_cfg())
    x, _ = _val_batch(32)
    model.calibrate_causal(x)
    ck = _checkpoint(tmp_path, model)
    r = run_eval(ck, batches=3, batch_size=2)
    assert r["tokens"] == 3 * 2 * 32
    assert r["ppl_topk"] == pytest.approx(math.exp(r["loss_topk"]))
    assert r["causal_gap"] == pytest.approx(r["loss_causal"] - r["loss_topk"])
    n_routed = len(model.cfg.routed_layer_ids)
    assert len(r["causal_acc"]) == len(r["routed_frac_topk"]) == len(r["routed_frac_causal"]) == n_routed
    k = model.cfg.routing.k(32)
    assert r["routed_frac_topk"] == pytest.approx([k / 32] * n_routed)  # top-k routes exactly k of T
    assert all(0 <= a <= 1 for a in r["causal_acc"])
    assert run_eval(ck, batches=3, batch_size=2) == r  # same windows, same numbers
    other = run_eval(ck, batches=3, batch_size=2, seq_len=16)
    assert other["tokens"] == 3 * 2 * 16 and other["loss_topk"] != r["loss_topk"]


def test_run_eval_dense_and_random(tmp_path, debug_cfg):
    dense = run_eval(_checkpoint(tmp_path, MoDTransformer(debug_cfg(router="none")), "dense"), batches=2)
    assert dense["loss_causal"] == dense["loss_topk"] and dense["routed_frac_topk"] == []
    rnd = run_eval(_checkpoint(tmp_path, MoDTransformer(debug_cfg(router="random")), "random"), batches=2)
    assert rnd["loss_causal"] is None and rnd["causal_gap"] is None and "random" in rnd["note"]


def test_eval_cli_prints_table_and_rejects_bad_checkpoint(tmp_path, debug_cfg, capsys):
    ck = _checkpoint(tmp_path, MoDTransformer(debug_cfg()))
    out_json = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(ck), "--batches", "2", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "topk" in printed and "causal gap" in printed
    assert json.loads(out_json.read_text())["tokens"] == 2 * 8 * 32
    with pytest.raises(SystemExit) as e:
        main(["eval", "--checkpoint", str(tmp_path / "missing")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixdepth eval: error:") and "not found" in err[0]


def test_run_eval_corrupt_trainer_json_names_the_file(tmp_path, debug_cfg):
    ck = _checkpoint(tmp_path, MoDTransformer(debug_cfg()))
    (ck / "trainer.json").write_text('{"step": 0, "data": ')
    manifest = ck / "manifest.json"
    if manifest.exists():  # the manifest records file sizes; keep it consistent with the corrupt file
        manifest.unlink()
    with pytest.raises(ValueError) as e:
        run_eval(ck, batches=1)
    msg = str(e.value)
    assert "trainer.json" in msg and "\n" not in msg


@pytest.mark.parametrize("seq_len", [0, -4])
def test_eval_refuses_a_sequence_length_below_one(tmp_path, debug_cfg, capsys, seq_len):
    """`--seq-len 0` used to fall back to the training length; now it is refused, by the CLI and by run_eval."""
    ck = _checkpoint(tmp_path, MoDTransformer(debug_cfg()))
    with pytest.raises(SystemExit) as e:
        main(["eval", "--checkpoint", str(ck), "--seq-len", str(seq_len)])
    assert e.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixdepth eval: error:") and "--seq-len" in err[0], err
    assert captured.out == ""
    with pytest.raises(ValueError, match=f"seq_len must be in .*got {seq_len}"):
        run_eval(ck, batches=1, seq_len=seq_len)
