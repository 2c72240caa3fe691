"""KV-cache parity, the core correctness test (DESIGN section 3, STYLE section 17).

In `causal` mode a full forward pass and cached decoding (token by token, or chunked prefill then
decode) must give the same logits, for a batch whose rows route differently; a routed layer's cache
holds exactly the tokens that entered its block, at their original positions, and nothing else.
"""

from __future__ import annotations

import pytest
import torch

from mixdepth.model import MoDTransformer

B, T, VOCAB = 3, 24, 256
ATOL = 1e-5
ROUTERS = [("expert_choice", "predictor"), ("expert_choice", "aux_loss"), ("token_choice", "predictor")]


def _ids(B: int = B, T: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _model(debug_cfg, router="expert_choice", method="predictor", fraction=0.3, **kw):
    """A debug MoD model calibrated so that about `fraction` of tokens route in causal mode."""
    model = MoDTransformer(debug_cfg(router=router, causal_method=method, capacity=0.25, **kw))
    model.calibrate_causal(_ids(4, 48, seed=7), fraction)
    return model


def _pos(p: int) -> torch.Tensor:
    return torch.full((B,), p, dtype=torch.long)


def _cached(model, ids, chunks, mode="causal", max_len=32):
    """Feed `ids` through a new cache in chunks of the given sizes; return the concatenated logits
    and the cache."""
    cache = model.make_cache(ids.shape[0], max_len)
    pos, logits = 0, []
    for c in chunks:
        out = model(ids[:, pos : pos + c], mode=mode, cache=cache, input_pos=torch.full((ids.shape[0],), pos))
        logits.append(out.logits)
        pos += c
    assert pos == ids.shape[1]
    return torch.cat(logits, 1), cache


def _rows_route_differently(routing: dict) -> bool:
    return any(len(set(m.sum(1).tolist())) > 1 for m in routing.values())


@pytest.mark.parametrize("router, method", ROUTERS)
def test_token_by_token_decode_equals_full_forward(debug_cfg, router, method):
    model = _model(debug_cfg, router, method)
    ids = _ids()
    full = model(ids, mode="causal", return_routing=True)
    assert _rows_route_differently(full.routing)
    for m in full.routing.values():
        assert m.any() and not m.all()
    cache = model.make_cache(B, 32)
    partial_steps = 0
    for t in range(T):
        out = model(ids[:, t : t + 1], mode="causal", cache=cache, input_pos=torch.full((B,), t), return_routing=True)
        torch.testing.assert_close(out.logits[:, 0], full.logits[:, t], atol=ATOL, rtol=ATOL)
        for i, m in out.routing.items():
            assert torch.equal(m[:, 0], full.routing[i][:, t])
            partial_steps += int(m.any() and not m.all())
    assert partial_steps > 0  # some steps had rows that routed beside rows that skipped


@pytest.mark.parametrize("router, method", ROUTERS)
@pytest.mark.parametrize("chunks", [[T], [5] * 4 + [1] * 4, [3, 8, 13], [1, 23], [7, 7, 7, 1, 1, 1]])
def test_chunked_prefill_then_decode_equals_full_forward(debug_cfg, router, method, chunks):
    model = _model(debug_cfg, router, method)
    ids = _ids()
    full = model(ids, mode="causal")
    torch.testing.assert_close(_cached(model, ids, chunks)[0], full.logits, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("router, method", ROUTERS)
def test_cache_holds_exactly_the_routed_tokens(debug_cfg, router, method):
    model = _model(debug_cfg, router, method)
    ids = _ids()
    full = model(ids, mode="causal", return_routing=True)
    _, cache = _cached(model, ids, [6, 1, 9, 1, 7])
    counts = cache.routed_counts()
    assert sorted(counts) == model.cfg.routed_layer_ids
    for i, layer in enumerate(cache.layers):
        if i in counts:
            mask = full.routing[i]
            assert torch.equal(counts[i], mask.sum(1))
            assert torch.equal(layer.lengths, mask.sum(1))
            for b in range(B):
                n = int(mask[b].sum())
                # original position ids of the tokens that entered, in order (slots past the fill length
                # may hold padding of a chunk, by design: they are never attended)
                assert layer.positions[b, :n].tolist() == mask[b].nonzero().squeeze(1).tolist()
        else:
            assert layer.lengths.tolist() == [T] * B
    assert torch.equal(cache.seq_lengths, torch.full((B,), T))


@pytest.mark.parametrize("chunk", [1, 3])
def test_skipping_row_leaves_routed_cache_untouched(debug_cfg, chunk):
    model = _model(debug_cfg)
    ids = _ids()
    cache = model.make_cache(B, 32)
    model(ids[:, :3], mode="causal", cache=cache, input_pos=torch.zeros(B, dtype=torch.long))
    # only the rows with a token that chose the block may run it (an index, not compute-and-discard)
    ran: dict[int, int] = {}
    for i in model.cfg.routed_layer_ids:
        model.layers[i].self_attn.q_proj.register_forward_hook(lambda m, a, o, i=i: ran.__setitem__(i, a[0].shape[0]))
    checked_skip = checked_write = 0
    for t in range(3, T, chunk):
        before = {i: (cache.layers[i].k.clone(), cache.layers[i].v.clone(),
                      cache.layers[i].lengths.clone()) for i in model.cfg.routed_layer_ids}
        ran.clear()
        out = model(ids[:, t : t + chunk], mode="causal", cache=cache, input_pos=torch.full((B,), t),
                    return_routing=True)
        for i, (k0, v0, n0) in before.items():
            layer = cache.layers[i]
            S = k0.shape[2]  # buffers may have grown; the old part must be as it was
            routed_rows = out.routing[i].any(1)
            assert ran.get(i, 0) == int(routed_rows.sum())
            for b in range(B):
                n_new = int(out.routing[i][b].sum())
                assert int(layer.lengths[b]) == int(n0[b]) + n_new
                if n_new:
                    slot = int(n0[b])
                    # earlier entries are kept; the new ones are appended at the fill length
                    assert torch.equal(layer.k[b, :, :slot], k0[b, :, :slot])
                    assert torch.equal(layer.v[b, :, :slot], v0[b, :, :slot])
                    assert not torch.equal(layer.k[b, :, slot], k0[b, :, slot])
                    checked_write += 1
                else:
                    # bitwise untouched, past the fill length too: the row did not run the block
                    assert torch.equal(layer.k[b, :, :S], k0[b]) and torch.equal(layer.v[b, :, :S], v0[b])
                    checked_skip += 1
    assert checked_skip > 0 and checked_write > 0


def test_right_padded_prompts_match_rows_run_alone(debug_cfg):
    model = _model(debug_cfg)
    ids = _ids()
    lengths = torch.tensor([T - 4, 11, 5])
    prompt = ids[:, : T - 4].clone()
    for b in range(B):
        prompt[b, lengths[b]:] = 0  # right padding
    cache = model.make_cache(B, 32)
    out = model(prompt, mode="causal", cache=cache, input_pos=torch.zeros(B, dtype=torch.long), valid_lengths=lengths)
    last = model(prompt, mode="causal", valid_lengths=lengths, last_only=True)  # no cache
    assert torch.equal(cache.seq_lengths, lengths)
    # then decode 4 more tokens, each row at its own position
    steps = []
    for s in range(4):
        pos = lengths + s
        tok = ids[torch.arange(B), pos][:, None]  # (B, 1): each row's own next token
        steps.append(model(tok, mode="causal", cache=cache, input_pos=pos).logits[:, 0])
    for b in range(B):
        n = int(lengths[b])
        alone = model(ids[b : b + 1, : n + 4], mode="causal").logits[0]  # (n+4, V)
        torch.testing.assert_close(out.logits[b, :n], alone[:n], atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(last.logits[b, 0], alone[n - 1], atol=ATOL, rtol=ATOL)
        for s in range(4):
            torch.testing.assert_close(steps[s][b], alone[n + s], atol=ATOL, rtol=ATOL)
    # padding never enters a routed cache: fill lengths equal the routed real tokens of each row alone
    for i, n_cached in cache.routed_counts().items():
        for b in range(B):
            alone = model(ids[b : b + 1, : int(lengths[b]) + 4], mode="causal", return_routing=True)
            assert int(n_cached[b]) == int(alone.routing[i].sum())


@pytest.mark.parametrize("router", ["expert_choice", "none"])
def test_dense_mode_cached_equals_uncached(debug_cfg, router):
    model = MoDTransformer(debug_cfg(router=router))
    ids = _ids()
    full = model(ids, mode="dense")
    torch.testing.assert_close(_cached(model, ids, [1] * T, mode="dense")[0], full.logits, atol=ATOL, rtol=ATOL)
    logits, cache = _cached(model, ids, [10, 1, 13], mode="dense")
    torch.testing.assert_close(logits, full.logits, atol=ATOL, rtol=ATOL)
    if router != "none":
        # every token entered every routed block
        assert all(c.tolist() == [T] * B for c in cache.routed_counts().values())


def test_bytes_in_use_below_dense(debug_cfg):
    model = _model(debug_cfg)
    ids = _ids()
    _, cache = _cached(model, ids, [T])
    routed = sum(int(c.sum()) for c in cache.routed_counts().values())
    per_token = 2 * model.cfg.n_kv_heads * model.cfg.head_dim * 4  # K and V, fp32
    n_dense = model.cfg.n_layers - len(model.cfg.routed_layer_ids)
    assert cache.bytes_in_use() == (n_dense * B * T + routed) * per_token
    assert cache.dense_bytes() == model.cfg.n_layers * B * T * per_token
    assert cache.bytes_in_use() < cache.dense_bytes()


def test_unused_cache_slots_are_never_attended(debug_cfg):
    model = _model(debug_cfg)
    ids = _ids()
    cache = model.make_cache(B, 32)
    lengths = torch.tensor([T - 6, 9, 14])
    model(ids[:, : T - 6], mode="causal", cache=cache, input_pos=torch.zeros(B, dtype=torch.long),
          valid_lengths=lengths)
    # poison every slot past each row's fill length, in every layer: if any were read, logits would explode
    for layer in cache.layers:
        for b in range(B):
            n = int(layer.lengths[b])
            layer.k[b, :, n:] = 1e4
            layer.v[b, :, n:] = 1e30
    for s in range(6):
        pos = lengths + s
        got = model(ids[torch.arange(B), pos][:, None], mode="causal", cache=cache, input_pos=pos).logits[:, 0]
        assert torch.isfinite(got).all()
        for b in range(B):
            alone = model(ids[b : b + 1, : int(pos[b]) + 1], mode="causal").logits[0, -1]
            torch.testing.assert_close(got[b], alone, atol=ATOL, rtol=ATOL)


def test_prefill_has_no_topk_lookahead(debug_cfg):
    # the prefill top-k bug: choosing a prompt's routed tokens by top-k lets a later token change earlier ones
    model = _model(debug_cfg)
    ids = _ids()
    p = 10
    ids2 = ids.clone()
    ids2[:, p:] = _ids(seed=5)[:, p:]
    a, cache = _cached(model, ids, [T])
    cached_a = {i: (L.positions.clone(), L.lengths.clone()) for i, L in enumerate(cache.layers) if L.routed}
    b, cache = _cached(model, ids2, [T])
    torch.testing.assert_close(a[:, :p], b[:, :p], atol=ATOL, rtol=ATOL)
    assert not torch.allclose(a[:, p:], b[:, p:])
    # and the first p tokens routed the same way: the cached positions before p agree
    for i, (pos_a, len_a) in cached_a.items():
        layer = cache.layers[i]
        for r in range(B):
            before_a = [q for q in pos_a[r, : len_a[r]].tolist() if q < p]
            before_b = [q for q in layer.positions[r, : layer.lengths[r]].tolist() if q < p]
            assert before_a == before_b


def test_routed_buffers_grow_when_more_tokens_route(debug_cfg):
    model = _model(debug_cfg, fraction=0.7)
    ids = _ids(B, 40)
    full = model(ids, mode="causal")
    cache = model.make_cache(B, 64, routed_fraction=0.01)  # starts with room for far fewer routed tokens
    start = {i: cache.layers[i].capacity for i in model.cfg.routed_layer_ids}
    pos, logits = 0, []
    for c in [3, 1, 1, 10, 1, 20, 4]:
        logits.append(model(ids[:, pos : pos + c], mode="causal", cache=cache, input_pos=torch.full((B,), pos)).logits)
        pos += c
    torch.testing.assert_close(torch.cat(logits, 1), full.logits, atol=ATOL, rtol=ATOL)
    for i, n in cache.routed_counts().items():
        assert int(n.max()) > start[i]  # it had to grow
        assert cache.layers[i].capacity >= int(n.max())


def test_reset_cache_starts_over(debug_cfg):
    model = _model(debug_cfg)
    ids = _ids()
    first, cache = _cached(model, ids, [8, 16])
    cache.reset()
    assert cache.seq_lengths.tolist() == [0] * B
    assert all(c.tolist() == [0] * B for c in cache.routed_counts().values())
    again = torch.cat([model(ids[:, :8], mode="causal", cache=cache, input_pos=_pos(0)).logits,
                       model(ids[:, 8:], mode="causal", cache=cache, input_pos=_pos(8)).logits], 1)
    torch.testing.assert_close(again, first, atol=ATOL, rtol=ATOL)


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def test_input_pos_without_cache_is_clear_error(debug_cfg):
    model = _model(debug_cfg)
    with pytest.raises(ValueError) as excinfo:
        model(_ids(B, 4), mode="causal", input_pos=_pos(0))
    assert "make_cache" in _one_line(excinfo)


def test_topk_mode_with_cache_raises(debug_cfg):
    model = _model(debug_cfg)
    cache = model.make_cache(B, 32)
    with pytest.raises(ValueError) as excinfo:
        model(_ids(B, 4), mode="topk", cache=cache, input_pos=_pos(0))
    assert "topk" in _one_line(excinfo)


def test_random_router_cannot_decode(debug_cfg):
    model = MoDTransformer(debug_cfg(router="random"))
    cache = model.make_cache(B, 32)
    with pytest.raises(ValueError) as excinfo:
        model(_ids(B, 4), mode="causal", cache=cache, input_pos=_pos(0))
    assert "random" in _one_line(excinfo)


def test_wrong_input_pos_and_overflow_are_clear_errors(debug_cfg):
    model = _model(debug_cfg)
    cache = model.make_cache(B, 16)
    model(_ids(B, 4), mode="causal", cache=cache, input_pos=_pos(0))
    with pytest.raises(ValueError) as excinfo:
        model(_ids(B, 1), mode="causal", cache=cache, input_pos=_pos(3))  # the cache holds 4 tokens per row
    assert "input_pos" in _one_line(excinfo)
    with pytest.raises(ValueError) as excinfo:
        model(_ids(B, 13), mode="causal", cache=cache, input_pos=_pos(4))  # 17 > 16
    assert "max_seq_len" in _one_line(excinfo)


def test_cache_buffers_are_not_in_state_dict(debug_cfg):
    model = _model(debug_cfg)
    keys = set(model.state_dict())
    model.make_cache(B, 32)
    assert set(model.state_dict()) == keys
    assert not hasattr(model, "kv_cache")  # the model keeps no generation state


def test_restore_fill_decodes_again_identically():
    """Rolling the cache back to the state after the prompt and decoding again gives the same logits."""
    from mixdepth import ModelConfig, MoDTransformer

    torch.manual_seed(0)
    cfg = ModelConfig.from_name("debug")
    model = MoDTransformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        model.calibrate_causal(ids, 0.4)
        cache = model.make_cache(2, 32)
        model(ids[:, :16], mode="causal", cache=cache, input_pos=torch.zeros(2, dtype=torch.long))
        state = cache.fill_state()
        runs = []
        for _ in range(2):
            cache.restore_fill(state)
            runs.append(torch.cat([model(ids[:, t:t + 1], mode="causal", cache=cache,
                                         input_pos=torch.full((2,), t)).logits
                                   for t in range(16, 24)], 1))
            assert cache.seq_lengths.tolist() == [24, 24]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
