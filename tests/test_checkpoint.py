"""Checkpoints: exact round trip (tied and untied), no pickle, atomic writes, clear errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from mixdepth.checkpoint import (
    list_checkpoints,
    load_checkpoint_tokenizer,
    load_model,
    load_training_state,
    resolve_checkpoint,
    save_checkpoint,
)
from mixdepth.data import BPETokenizer, ByteTokenizer, load_tokenizer
from mixdepth.model import MoDTransformer


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, f"error is not one line: {msg!r}"
    return msg


def _trained(model: MoDTransformer, steps: int = 3) -> torch.optim.AdamW:
    """A few AdamW steps so weights and optimizer state are non-trivial."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=g)
        model(x, x.roll(-1, 1)).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("tie", [True, False])
def test_checkpoint_round_trip_exact_logits_and_no_pickle(tmp_path, debug_cfg, monkeypatch, tie):
    model = MoDTransformer(debug_cfg(tie_embeddings=tie))
    _trained(model)
    model.calibrate_causal(torch.randint(0, 256, (4, 32)))  # non-default routing buffers must survive
    ckpt = save_checkpoint(tmp_path / "ck", model, tokenizer=ByteTokenizer())

    # loading must never unpickle: make every pickle entry point explode
    def boom(*a, **k):
        raise AssertionError("checkpoint loading unpickled something")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    loaded = load_model(ckpt)

    x = torch.randint(0, 256, (3, 40))
    model.eval()
    for mode in ("topk", "causal", "dense"):
        assert torch.equal(model(x, mode=mode).logits, loaded(x, mode=mode).logits), mode
    for a, b in zip(model.routed_layers, loaded.routed_layers):
        assert torch.equal(a.causal_threshold, b.causal_threshold)
    if tie:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    else:
        assert loaded.lm_head.weight.data_ptr() != loaded.embed_tokens.weight.data_ptr()
        assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    for f in ckpt.iterdir():  # no pickle stream (protocol 2+ starts with 0x80) nor torch zip
        head = f.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f.name
    assert isinstance(load_tokenizer(ckpt), ByteTokenizer)


def test_bpe_tokenizer_saved_beside_checkpoint(tmp_path, debug_cfg):
    tok = BPETokenizer.train(["the quick brown fox jumps over the lazy dog " * 50], 300)
    model = MoDTransformer(debug_cfg(vocab_size=tok.vocab_size))
    ckpt = save_checkpoint(tmp_path / "ck", model, tokenizer=tok)
    assert (ckpt / "tokenizer.json").exists()
    again = load_tokenizer(ckpt)
    assert again.encode("the lazy fox") == tok.encode("the lazy fox")


def test_checkpoint_tokenizer_found_from_the_run_folder(tmp_path, debug_cfg):
    # the tokenizer lives in the checkpoint folder, not the run folder: `plot routing --checkpoint RUN`
    # once fell back to bytes for a BPE run
    tok = BPETokenizer.train(["the quick brown fox jumps over the lazy dog " * 50], 300)
    model = MoDTransformer(debug_cfg(vocab_size=tok.vocab_size))
    run = tmp_path / "run"
    ckpt = save_checkpoint(run / "checkpoints" / "step-000001", model, tokenizer=tok)
    for path in (run, ckpt):
        found = load_checkpoint_tokenizer(path)
        assert isinstance(found, BPETokenizer) and found.encode("the lazy fox") == tok.encode("the lazy fox")
    byte_ckpt = save_checkpoint(tmp_path / "bytes", model, tokenizer=ByteTokenizer())
    assert isinstance(load_checkpoint_tokenizer(byte_ckpt), ByteTokenizer)


def _run_with_two_checkpoints(tmp_path, debug_cfg) -> tuple[Path, MoDTransformer]:
    model = MoDTransformer(debug_cfg())
    opt = _trained(model, 1)
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "step-000001", model, opt, {"step": 1})
    first = MoDTransformer(debug_cfg())
    first.load_state_dict(model.state_dict())
    _trained(model, 1)
    save_checkpoint(run / "checkpoints" / "step-000002", model, opt, {"step": 2})
    return run, first


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.safetensors", "config.json"])
def test_truncated_checkpoint_is_refused_and_previous_still_loads(tmp_path, debug_cfg, victim):
    run, first = _run_with_two_checkpoints(tmp_path, debug_cfg)
    assert resolve_checkpoint(run).name == "step-000002"
    bad = run / "checkpoints" / "step-000002" / victim
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as e:
        load_model(run)
    msg = _one_line(e)
    assert str(bad) in msg and "truncated" in msg
    prev = load_model(run / "checkpoints" / "step-000001")
    x = torch.randint(0, 256, (2, 16))
    first.eval()
    assert torch.equal(prev(x).logits, first(x).logits)


def test_truncated_safetensors_without_manifest_still_named(tmp_path, debug_cfg):
    run, _ = _run_with_two_checkpoints(tmp_path, debug_cfg)
    ck = run / "checkpoints" / "step-000002"
    (ck / "manifest.json").unlink()  # the safetensors reader itself must catch it
    f = ck / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError) as e:
        load_model(ck)
    assert str(f) in _one_line(e)


def test_foreign_checkpoints_give_one_line_errors(tmp_path, debug_cfg):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2}))
    with pytest.raises(ValueError) as e:
        load_model(hf)
    assert "config.json" in _one_line(e)

    # a config that parses but weights that belong to another model
    from safetensors.torch import save_file

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(debug_cfg().to_dict()))
    save_file({"model.embed_tokens.weight": torch.zeros(256, 64)}, other / "model.safetensors")
    with pytest.raises(ValueError) as e:
        load_model(other)
    assert "model.safetensors" in _one_line(e)

    (other / "model.safetensors").write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ValueError) as e:
        load_model(other)
    assert "model.safetensors" in _one_line(e)

    with pytest.raises(ValueError) as e:
        load_model(tmp_path / "nowhere")
    assert "not found" in _one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError) as e:
        load_model(tmp_path / "empty")
    assert "no checkpoint" in _one_line(e)


def test_keep_last_latest_pointer_and_stale_tmp(tmp_path, debug_cfg):
    model = MoDTransformer(debug_cfg())
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000009.tmp").mkdir(parents=True)  # a crash mid-write left this
    for step in range(1, 6):
        save_checkpoint(run / "checkpoints" / f"step-{step:06d}", model, keep_last=2)
    assert [p.name for p in list_checkpoints(run)] == ["step-000004", "step-000005"]
    assert (run / "latest").read_text().strip() == "checkpoints/step-000005"
    assert resolve_checkpoint(run).name == "step-000005"
    # a pointer to a deleted folder falls back to the newest finished checkpoint
    (run / "latest").write_text("checkpoints/step-000099\n")
    assert resolve_checkpoint(run).name == "step-000005"
    # re-saving an existing step replaces it whole
    save_checkpoint(run / "checkpoints" / "step-000005", model, trainer_state={"step": 5})
    assert json.loads((run / "checkpoints" / "step-000005" / "trainer.json").read_text()) == {"step": 5}


def test_optimizer_state_round_trip_continues_identically(tmp_path, debug_cfg):
    cfg = debug_cfg(tie_embeddings=False)
    a = MoDTransformer(cfg)
    opt_a = _trained(a, 2)
    save_checkpoint(tmp_path / "ck", a, opt_a, {"step": 2})
    b = MoDTransformer(cfg)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    state = load_training_state(tmp_path / "ck", b, opt_b)
    assert state == {"step": 2}
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    for m, o in ((a, opt_a), (b, opt_b)):
        m(x, x.roll(-1, 1)).loss.backward()
        o.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n


def test_resume_state_into_a_different_config_is_refused(tmp_path, debug_cfg):
    a = MoDTransformer(debug_cfg())
    save_checkpoint(tmp_path / "ck", a)
    b = MoDTransformer(debug_cfg(capacity=0.25))
    with pytest.raises(ValueError) as e:
        load_training_state(tmp_path / "ck", b)
    msg = _one_line(e)
    assert "routing.capacity" in msg and "0.125" in msg and "0.25" in msg
