"""Tests of the routed fraction an entry point asks for (`mixdepth.model.dial`), the one decision
for uncalibrated routers, and the KV cache's rows for a server's pool (issues 28, 29).

The `hold` rule must be causal (a prompt decided in one call equals it decided token by token, and
cached generation equals full forwards), hold each row's routed fraction on text unlike the
calibration text (where the calibrated threshold drifts), and move with a row copied into a pool.
"""

from __future__ import annotations

import pytest
import torch

from mixdepth import ModelConfig, MoDTransformer
from mixdepth.generate import decode_one, generate, prefill
from mixdepth.model.dial import SLACK, SLACK_FRACTION
from mixdepth.static import StaticDecoder


def make_model(fraction: float | None = 0.5, low: bool = False) -> MoDTransformer:
    """The debug preset with 3 routed layers of 4; calibrated on random ids (only ids < 64 with `low`)."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("debug", n_layers=6, tie_embeddings=False, init_std=0.1,
                                routing={"capacity": 0.5})
    model = MoDTransformer(cfg).eval()
    if fraction is not None:
        g = torch.Generator().manual_seed(1)
        model.calibrate_causal(torch.randint(0, 64 if low else cfg.vocab_size, (4, 96), generator=g), fraction)
    return model


def unlike_text(B: int, T: int) -> torch.Tensor:
    """Token ids the low-calibrated model never saw in calibration (>= 128)."""
    return torch.randint(128, 256, (B, T), generator=torch.Generator().manual_seed(5))


# ---- uncalibrated routers --------------------------------------------------------------------------
def test_an_uncalibrated_model_routes_every_token_in_every_entry_point(tmp_path):
    from mixdepth.checkpoint import load_model, save_checkpoint

    model = make_model(fraction=None)
    assert not model.calibrated
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    causal = model(x, mode="causal", return_routing=True)
    assert all(bool(m.all()) for m in causal.routing.values())
    torch.testing.assert_close(causal.logits, model(x, mode="dense").logits, rtol=0, atol=0)
    res = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=5).run()
    assert all(f == 1.0 for f in res.routed_fraction.values())
    assert res.tokens == generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=5, fraction=1.0).run().tokens
    # a checkpoint written before this rule holds the placeholder threshold 0 beside an empty table
    for layer in model.routed_layers:
        layer.causal_threshold.fill_(0.0)
    save_checkpoint(tmp_path / "old", model)
    loaded = load_model(tmp_path / "old")
    assert all(float(layer.causal_threshold) == float("-inf") for layer in loaded.routed_layers)
    assert all(bool(m.all()) for m in loaded(x, mode="causal", return_routing=True).routing.values())


# ---- the hold rule -----------------------------------------------------------------------------------
def test_hold_decides_a_prompt_alike_in_one_call_in_chunks_and_token_by_token():
    model = make_model()
    B, T, f = 3, 40, 0.3
    x = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(3))
    full = model(x, mode="causal", dial=model.make_dial(B, f), return_routing=True)
    for chunk in (1, 7, T):
        cache = model.make_cache(B)
        cache.set_fraction(None, f, "hold")
        logits, masks = prefill(model, cache, x, chunk_size=chunk)
        for lid, m in masks.items():
            assert torch.equal(m, full.routing[lid]), (chunk, lid)
        torch.testing.assert_close(logits, full.logits[:, -1], rtol=1e-5, atol=1e-5)
    # the rule really decides: the fractions are held near f, not the calibrated 0.5
    for lid, m in full.routing.items():
        assert (m.float().mean(1) - f).abs().max() <= max(SLACK_FRACTION, (SLACK + 1) / T) + 1 / T, lid


def test_greedy_generation_held_at_a_fraction_equals_full_forwards():
    model = make_model()
    f, n = 0.3, 10
    prompts = [[10, 20, 30, 40, 50, 60, 70], [5, 6, 7]]
    res = generate(model, prompts, max_new_tokens=n, fraction=f, fraction_rule="hold").run()
    for b, p in enumerate(prompts):
        ids = list(p)
        for _ in range(n):
            out = model(torch.tensor([ids]), mode="causal", dial=model.make_dial(1, f), return_routing=True)
            ids.append(int(out.logits[0, -1].argmax()))
        assert res.tokens[b] == ids[len(p):]
        fed = torch.stack([out.routing[lid][0, : len(ids) - 1] for lid in res.routed_layers])
        assert torch.equal(res.routing[b], fed)


@pytest.mark.parametrize("f", [0.25, 0.5, 0.75])
def test_the_dial_holds_on_text_unlike_the_calibration_text(f):
    uncalibrated = make_model(fraction=None)  # ranks its own scores: no threshold to start from
    for m in uncalibrated(unlike_text(3, 80), mode="causal", dial=uncalibrated.make_dial(3, f),
                          return_routing=True).routing.values():
        assert (m.float().mean(1) - f).abs().max() <= 0.05
    model = make_model(fraction=0.5, low=True)
    x = unlike_text(4, 100)
    held = model(x, mode="causal", dial=model.make_dial(4, f), return_routing=True).routing
    by_threshold = model(x, mode="causal", thresholds=model.causal_thresholds(f), return_routing=True).routing
    for lid, m in held.items():
        per_row = m.float().mean(1)
        assert (per_row - f).abs().max() <= 0.05, (lid, per_row)
    # what the rule fixes: the calibrated threshold does not transfer to this text
    drift = max(float((m.float().mean() - f).abs()) for m in by_threshold.values())
    assert drift > 0.05, drift
    # in generation too: each row's routed fraction over prompt and new tokens
    prompts = [unlike_text(1, 30)[0].tolist(), unlike_text(1, 12)[0].flip(0).tolist()]
    res = generate(model, prompts, max_new_tokens=60, fraction=f, fraction_rule="hold", temperature=1.0, seed=0).run()
    for r in res.routing:
        assert (r.float().mean(1) - f).abs().max() <= 0.05, r.float().mean(1)


def test_the_threshold_rule_and_the_errors():
    model = make_model()
    cache = model.make_cache(2)
    with pytest.raises(ValueError, match=r"routed fraction must be in \[0, 1\]"):
        cache.set_fraction(0, 1.5)
    with pytest.raises(ValueError, match="fraction_rule must be one of"):
        generate(model, [[1, 2]], fraction=0.3, fraction_rule="nearest")
    with pytest.raises(ValueError, match="static decode steps"):
        generate(model, [[1, 2]], fraction=0.3, fraction_rule="hold", decoder=StaticDecoder(model))
    cache = model.make_cache(1)
    cache.set_fraction(0, 0.5)
    with pytest.raises(ValueError, match="static decode steps"):
        StaticDecoder(model).start(cache)
    with pytest.raises(ValueError, match="never calibrated"):
        make_model(fraction=None).make_cache(1).set_fraction(0, 0.3, "threshold")
    # rows of one cache, each at its own fraction and rule
    x = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(6)).repeat(3, 1)
    cache = model.make_cache(3)
    cache.set_fraction(0, 0.3, "threshold")
    cache.set_fraction(1, 0.3, "hold")
    _, masks = prefill(model, cache, x)
    at = model(x[:1], mode="causal", thresholds=model.causal_thresholds(0.3), return_routing=True).routing
    calibrated = model(x[:1], mode="causal", return_routing=True).routing
    held = model(x[:1], mode="causal", dial=model.make_dial(1, 0.3), return_routing=True).routing
    for lid, m in masks.items():
        assert torch.equal(m[0], at[lid][0]) and torch.equal(m[2], calibrated[lid][0])
        assert torch.equal(m[1], held[lid][0])
    # the default rule is the calibration table's threshold, as before the hold rule
    a = generate(model, [[1, 2, 3]], max_new_tokens=6, fraction=0.3).run()
    x = torch.tensor([[1, 2, 3] + a.tokens[0][:-1]])
    want = model(x, mode="causal", thresholds=model.causal_thresholds(0.3), return_routing=True).routing
    assert torch.equal(a.routing[0], torch.stack([want[lid][0] for lid in a.routed_layers]))


# ---- rows of a pool ----------------------------------------------------------------------------------
def test_a_row_prefilled_alone_and_copied_into_a_pool_decodes_as_alone():
    model = make_model()
    prompt = torch.tensor([[9, 8, 7, 6, 5, 4, 3, 2, 1]])
    steps = [11, 12, 13, 14, 15, 16]
    # alone, held at 0.3
    alone = model.make_cache(1, max_seq_len=32)
    alone.set_fraction(0, 0.3, "hold")
    prefill(model, alone, prompt)
    want = [decode_one(model, alone, torch.tensor([t])) for t in steps]
    # a pool of 3 rows, busy with other sequences; row 1 is reset and takes the prompt
    pool = model.make_cache(3, max_seq_len=32)
    pool.set_fraction(0, 0.8, "threshold")
    prefill(model, pool, torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(4)))
    before = [layer.lengths.clone() for layer in pool.layers]
    pool.reset_row(1)
    assert all(int(layer.lengths[1]) == 0 for layer in pool.layers) and int(pool.seq_lengths[1]) == 0
    own = model.make_cache(1, max_seq_len=32)
    own.set_fraction(0, 0.3, "hold")
    prefill(model, own, prompt)
    pool.copy_row_from(own, 0, 1)
    assert all(int(a.lengths[1]) == int(b.lengths[0]) for a, b in zip(pool.layers, own.layers))
    assert all(torch.equal(a.lengths[[0, 2]], b[[0, 2]]) for a, b in zip(pool.layers, before))
    for t, (logits, masks) in zip(steps, want):
        got, got_masks = decode_one(model, pool, torch.tensor([3, t, 5]))
        torch.testing.assert_close(got[1], logits[0], rtol=1e-5, atol=1e-5)
        assert all(bool(got_masks[lid][1]) == bool(m[0]) for lid, m in masks.items())
    # the routed layers hold only the tokens that entered them
    routed = [i for i, layer in enumerate(pool.layers) if layer.routed]
    assert any(int(pool.layers[i].lengths[1]) < int(pool.seq_lengths[1]) for i in routed)


def test_decoding_a_prefix_of_the_pool_equals_decoding_the_whole_pool():
    """A server decodes over its busy rows only (`KVCache.prefix`); what the view changes, buffers it
    grows included, comes back with `merge_prefix`."""
    model = make_model()
    x = torch.randint(0, 256, (4, 10), generator=torch.Generator().manual_seed(8))
    whole, part = (model.make_cache(4, max_seq_len=64, routed_fraction=0.1) for _ in range(2))
    for cache in (whole, part):
        cache.set_fraction(0, 1.0, "hold")  # row 0 enters every routed block: its buffers must grow
        cache.set_fraction(1, 0.3, "hold")
        prefill(model, cache, x)
        cache.reset_row(2)
        cache.reset_row(3)
    capacity = [layer.capacity for layer in part.layers]
    active = torch.tensor([True, True])
    for step in range(40):
        tok = torch.tensor([step % 200 + 1, step % 100 + 3])
        want, want_masks = decode_one(model, whole, torch.cat([tok, torch.zeros(2, dtype=torch.long)]),
                                      torch.tensor([True, True, False, False]))
        view = part.prefix(2)
        got, got_masks = decode_one(model, view, tok, active)
        part.merge_prefix(view)
        torch.testing.assert_close(got, want[:2], rtol=1e-5, atol=1e-5)
        assert all(torch.equal(got_masks[lid], want_masks[lid][:2]) for lid in got_masks)
    assert any(layer.capacity > c for layer, c in zip(part.layers, capacity))  # a view grew a buffer
    for a, b in zip(whole.layers, part.layers):
        assert torch.equal(a.lengths, b.lengths)
        n = int(a.lengths.max())
        torch.testing.assert_close(a.k[:2, :, :n], b.k[:2, :, :n])
    assert torch.equal(whole.seq_lengths, part.seq_lengths)
    assert all((a.seen == b.seen).all() and (a.routed == b.routed).all()
               for a, b in zip(whole.dial.layers.values(), part.dial.layers.values()))


def test_eval_compare_rules_measures_both_rules_on_the_same_windows(tmp_path, capsys):
    import json

    from mixdepth.checkpoint import save_checkpoint
    from mixdepth.cli import main

    model = make_model(fraction=0.5, low=True)
    save_checkpoint(tmp_path / "ck", model)
    text = tmp_path / "text.txt"
    text.write_text("".join(chr(0x400 + i % 97) for i in range(4000)))  # UTF-8 bytes >= 128: unlike calibration
    code = main(["eval", "--checkpoint", str(tmp_path / "ck"), "--data", str(text), "--compare-rules", "0.25,0.5",
                 "--batches", "2", "--batch-size", "2", "--seq-len", "64", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0 and "| 0.25 |" in out and "| 0.5 |" in out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["windows"] == 4 and [row["fraction"] for row in r["rows"]] == [0.25, 0.5]
    for row in r["rows"]:
        assert row["diff"] == pytest.approx(row["hold"]["loss"] - row["threshold"]["loss"], abs=1e-6)
        assert row["hold"]["off_max"] <= 0.05 + 1 / 64
    assert max(row["threshold"]["off_max"] for row in r["rows"]) > 0.05  # the threshold drifts on this text
