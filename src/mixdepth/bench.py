"""Speed and memory of MoD against dense at the same dimensions, measured in one process.

Every case builds the MoD model and its dense twin (same dimensions, `router="none"`), warms both
up, then times them in alternation (dense, MoD, dense, MoD, ...) so drifts in machine speed hit
both alike, and reports the median. Each record carries the ideal ratio from `mixdepth.flops` and
the efficiency (measured ratio / ideal ratio).

Cases:
- `train`: forward + backward + AdamW step on `batch x seq_len` tokens (`topk` routing).
- `prefill`: a forward pass without gradients on the same tokens (`topk` routing).
- `decode-bN`: one-token decode steps with N rows and `context` tokens already cached, causal
  routing with the threshold calibrated so that `capacity` of the tokens route. With `compile`,
  both models run static-shape steps (`mixdepth.static`); on CUDA each record also holds each
  model's peak memory: its weights and KV cache plus what its steps allocate (or, captured, what
  the capture reserved).
- `memory`: bytes of activations saved for the backward pass of one training step, and bytes of
  KV cache in use after a decode run (device independent: counted, not sampled).
- `moe`: `train` and `decode-bN` for MoE, staged MoDE and integrated MoDE, each against the dense
  model of the same active size; integrated MoDE's no-op share is fixed at `noop_fraction` on the
  decode stream, as MoD's causal thresholds are.

Weights are random: speed does not depend on their values, only on how many tokens route, which
the calibration fixes (the measured fraction is part of each decode record).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Callable

import torch

from . import flops
from .config import ModelConfig
from .runtime import compile_blocks
from .static import StaticDecoder

log = logging.getLogger("mixdepth")

# dense bf16 peak FLOP/s by device name fragment, for MFU (nanochat/torchtitan style)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timeit(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _alternate(fns: dict[str, Callable[[], None]], device, warmup: int, iters: int) -> dict[str, float]:
    """Median seconds per call of each fn, timed in alternation after `warmup` calls each."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            times[k].append(_timeit(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def build_pair(cfg: ModelConfig, device, dtype, seed: int = 0):
    """The MoD model and its dense twin, with the same weights where they share names."""
    from .model import MoDTransformer

    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: a 1B-parameter init on the host takes minutes
        mod = MoDTransformer(cfg).to(dtype=dtype)
        dense = MoDTransformer(flops.dense_twin(cfg)).to(dtype=dtype)
    dense.load_state_dict(mod.state_dict(), strict=False)
    return dense, mod


def _settings(cfg: ModelConfig, **kw) -> dict:
    r = cfg.routing
    return dict(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, ffn_dim=cfg.ffn_dim, vocab=cfg.vocab_size,
                router=r.router, capacity=r.capacity, routed_layers=cfg.routed_layer_ids, **kw)


def _record(case: str, dense_s: float, mod_s: float, tokens: int, ideal: float, **extra) -> dict:
    ratio = dense_s / mod_s
    rec = dict(case=case, dense_tok_s=tokens / dense_s, mod_tok_s=tokens / mod_s, dense_step_s=dense_s,
               mod_step_s=mod_s, ratio=ratio, ideal_ratio=ideal, efficiency=ratio / ideal)
    rec.update(extra)
    return rec


def bench_train(cfg: ModelConfig, batch_size: int, seq_len: int, *, device, dtype, warmup=1, iters=3,
                compile=False) -> dict:
    dense, mod = build_pair(cfg, device, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), generator=g).to(device)
    inp, tgt = x[:, :-1], x[:, 1:]

    def make_step(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
        if compile:
            compile_blocks(model)
        fwd = model

        def step():
            loss = fwd(inp, tgt, mode="topk").loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    t = _alternate({"dense": make_step(dense), "mod": make_step(mod)}, device, warmup, iters)
    ideal = flops.ideal_speedup(cfg, seq_len, "train")
    rec = _record("train", t["dense"], t["mod"], batch_size * seq_len, ideal,
                  settings=_settings(cfg, batch_size=batch_size, seq_len=seq_len, dtype=str(dtype), compile=compile))
    pk = peak_flops(device)
    if pk:
        rec["mfu_dense"] = flops.train_step_flops(flops.dense_twin(cfg), seq_len, batch_size) / t["dense"] / pk
        rec["mfu_mod"] = flops.train_step_flops(cfg, seq_len, batch_size) / t["mod"] / pk
    return rec


def bench_capacities(cfg: ModelConfig, batch_size: int, seq_len: int, capacities: list[float], route_every: list[int],
                *, device, dtype, warmup=1, iters=3) -> list[dict]:
    """Training-step speed for each (capacity, route_every), each timed in alternation with the
    dense twin (re-timed for every variant, so each ratio comes from one paired measurement)."""
    recs = []
    for re_ in route_every:
        for c in capacities:
            variant = cfg.with_routing(capacity=c, route_every=re_, routed_layers=None)
            rec = bench_train(variant, batch_size, seq_len, device=device, dtype=dtype, warmup=warmup, iters=iters)
            rec["case"] = f"train-C{c:g}-every{re_}"
            rec["settings"]["route_every"] = re_
            recs.append(rec)
    return recs


@torch.no_grad()
def bench_prefill(cfg: ModelConfig, batch_size: int, seq_len: int, *, device, dtype, warmup=1, iters=5,
                  compile=False) -> dict:
    dense, mod = build_pair(cfg, device, dtype)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    fns = {}
    for name, m in (("dense", dense), ("mod", mod)):
        if compile:
            compile_blocks(m)
        fns[name] = lambda m=m: m(x, mode="topk")
    t = _alternate(fns, device, warmup, iters)
    return _record("prefill", t["dense"], t["mod"], batch_size * seq_len, flops.ideal_speedup(cfg, seq_len, "prefill"),
                   settings=_settings(cfg, batch_size=batch_size, seq_len=seq_len, dtype=str(dtype)))


@torch.no_grad()
def bench_decode(cfg: ModelConfig, batch_size: int, context: int, new_tokens: int, *, device, dtype,
                 rounds: int = 3, pair=None, stream: torch.Tensor | None = None, compile: bool = False,
                 backend: str | None = None) -> dict:
    """Decode `new_tokens` steps after a `context`-token prefill; median over `rounds` alternations.

    `pair` (dense, mod) and `stream` (batch x (context + new_tokens) token ids) time given models on
    given text, e.g. a trained model at its own calibrated thresholds (the sweep); by default a random
    pair is built and calibrated on a random stream to route `capacity`.

    With `compile`, both models decode with static-shape steps (`mixdepth.static.StaticDecoder`: a
    CUDA graph per model on a GPU, torch.compile with `backend` on a CPU); the first step of each
    (compilation or capture) is timed apart, as `compile_s`.
    """
    kw = dict(device=device, dtype=dtype, rounds=rounds, compile=compile, backend=backend)
    if pair is not None:
        dense, mod = pair
        return _time_decode(cfg, dense, mod, stream, batch_size, context, new_tokens, **kw)
    dense, mod = build_pair(cfg, device, dtype)
    g = torch.Generator().manual_seed(1)
    # Decode steps are fed a fixed random token stream (teacher forcing) rather than the argmax of a
    # random model, whose greedy output degenerates into repeats. The causal thresholds are
    # calibrated on that same stream so that `capacity` of its tokens route: with random weights the
    # routed fraction varies a lot from one random text to another, and speed at the configured
    # capacity is what is measured. The fraction actually routed while decoding is reported.
    stream = torch.randint(0, cfg.vocab_size, (batch_size, context + new_tokens), generator=g).to(device)
    mod.calibrate_causal(stream, cfg.routing.capacity)
    if cfg.moe.noop:  # integrated MoDE: the no-op share fixed the same way
        mod.calibrate_noop(stream)
    return _time_decode(cfg, dense, mod, stream, batch_size, context, new_tokens, **kw)


@torch.no_grad()
def _time_decode(cfg: ModelConfig, dense, mod, stream: torch.Tensor, batch_size: int, context: int, new_tokens: int,
                 *, device, dtype, rounds: int, compile: bool = False, backend: str | None = None) -> dict:
    if cfg.routed_layer_ids and not cfg.kv_routed_layer_ids:  # before any work
        raise ValueError("bench decode reads the routed fraction off the KV cache, which MLP-only routing "
                         "(routing.unit mlp) fills for every token: use unit block or attn")
    prompt = stream[:, :context]
    S = context + new_tokens
    models = {"dense": dense, "mod": mod}
    caches = {name: m.make_cache(batch_size, S, dtype=dtype, device=device) for name, m in models.items()}
    states = {}
    for name, m in models.items():  # prefill once; each round decodes from there
        m(prompt, mode="causal", cache=caches[name], last_only=True)
        states[name] = caches[name].fill_state()
    decoders = {name: StaticDecoder(m, compile=True, backend=backend) for name, m in models.items()} if compile else {}
    final = dict(caches)  # the cache each model's decoding fills, for the KV figures
    compile_s: dict[str, float] = {}
    pools: dict[str, int] = {}  # memory a captured step keeps reserved (its graph's pool)
    peak: dict[str, int] = {}

    def run(name: str) -> float:
        cache, m = caches[name], models[name]
        cache.restore_fill(states[name])
        dec = decoders.get(name)
        if dec is not None:
            final[name] = dec.start(cache, fraction=cfg.routing.capacity)  # a copy, not timed
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            own = sum(p.numel() * p.element_size() for p in m.parameters()) + final[name].bytes_allocated()
        _sync(device)
        t0 = time.perf_counter()
        for i in range(new_tokens):
            token = stream[:, context + i]
            if dec is not None:
                logits = dec.step(token)[0]
            else:
                logits = m(token[:, None], mode="causal", cache=cache).logits[:, -1]
            logits.argmax(-1)
        _sync(device)
        elapsed = time.perf_counter() - t0
        if device.type == "cuda":  # both models are resident: count this one's weights and cache as the
            # run began, and what its steps allocated on top (activations, a growing cache) or, for a
            # captured step, what its capture reserved
            step = max(torch.cuda.max_memory_allocated(device) - base, pools.get(name, 0))
            peak[name] = max(peak.get(name, 0), own + step)
        return elapsed

    for name in models:  # warm-up; with static steps, the first step compiles or captures
        if name in decoders:
            caches[name].restore_fill(states[name])
            decoders[name].start(caches[name], fraction=cfg.routing.capacity)
            _sync(device)
            reserved = torch.cuda.memory_reserved(device) if device.type == "cuda" else 0
            t0 = time.perf_counter()
            decoders[name].step(stream[:, context])
            _sync(device)
            compile_s[name] = time.perf_counter() - t0
            if device.type == "cuda":
                pools[name] = torch.cuda.memory_reserved(device) - reserved
        run(name)
    times: dict[str, list[float]] = {"dense": [], "mod": []}
    for _ in range(rounds):
        times["dense"].append(run("dense"))
        times["mod"].append(run("mod"))
    td, tm = statistics.median(times["dense"]), statistics.median(times["mod"])
    cache, dense_cache = final["mod"], final["dense"]
    kv_ratio = cache.bytes_in_use() / dense_cache.bytes_in_use()
    kv_alloc = cache.bytes_allocated() / dense_cache.bytes_allocated()
    decoded = batch_size * new_tokens
    n_routed = len(cfg.routed_layer_ids)
    routed = sum(int(c.sum()) for c in cache.routed_counts().values())
    # fraction routed among the decoded tokens only (the prefill is not timed)
    routed_ids = set(cfg.routed_layer_ids)
    prefill_routed = sum(int(st.sum()) for i, st in enumerate(states["mod"][:-1]) if i in routed_ids)
    frac_decode = (routed - prefill_routed) / (n_routed * decoded) if n_routed else 1.0
    ctx = context + new_tokens // 2
    ideal = flops.decode_flops_per_token(flops.dense_twin(cfg), ctx) / \
        flops.decode_flops_per_token(cfg, ctx, routed_fraction=frac_decode)
    extra = {}
    if compile:
        extra = dict(dense_compile_s=compile_s["dense"], mod_compile_s=compile_s["mod"],
                     captures=sum(d.captures for d in decoders.values()))
    if peak:
        extra.update(dense_peak_bytes=peak["dense"], mod_peak_bytes=peak["mod"])
    return _record(
        f"decode-b{batch_size}", td, tm, decoded, ideal, kv_bytes_ratio=kv_ratio, kv_alloc_ratio=kv_alloc,
        routed_frac_decode=frac_decode, **extra,
        settings=_settings(cfg, batch_size=batch_size, context=context, new_tokens=new_tokens, dtype=str(dtype),
                           compile=compile),
    )


def moe_variants(cfg: ModelConfig, n_experts: int = 0) -> dict[str, ModelConfig]:
    """MoE, staged MoDE and integrated MoDE built on `cfg` (its dimensions, MoD routing and MoE
    settings; `n_experts` default 8 where `cfg` has none)."""
    moe = dataclasses.replace(cfg.moe, n_experts=n_experts or cfg.moe.n_experts or 8, noop=False)
    none = dataclasses.replace(cfg.routing, router="none")
    mod_routing = cfg.routing if cfg.routing.router != "none" else dataclasses.replace(cfg.routing,
                                                                                       router="expert_choice")
    return {
        "moe": dataclasses.replace(cfg, routing=none, moe=moe),
        "staged-mode": dataclasses.replace(cfg, routing=mod_routing, moe=moe),
        "integrated-mode": dataclasses.replace(cfg, routing=none, moe=dataclasses.replace(moe, noop=True, top_k=1)),
    }


def bench_moe(cfg: ModelConfig, batch_size: int, seq_len: int, decode_batches: list[int], context: int,
              new_tokens: int, *, device, dtype, iters=3, rounds=3, n_experts: int = 0) -> list[dict]:
    """Training step and decode speed of MoE, staged and integrated MoDE against the dense model of
    the same active size (`flops.dense_twin`); cases `train-<variant>` and `decode-bN-<variant>`."""
    records = []
    for name, c in moe_variants(cfg, n_experts).items():
        recs = [bench_train(c, batch_size, seq_len, device=device, dtype=dtype, iters=iters)]
        recs += [bench_decode(c, b, context, new_tokens, device=device, dtype=dtype, rounds=rounds)
                 for b in decode_batches]
        for r in recs:
            r["case"] = f"{r['case']}-{name}"
            r["settings"]["moe"] = c.moe.to_dict()
        records += recs
    return records


def bench_memory(cfg: ModelConfig, batch_size: int, seq_len: int, *, device, dtype) -> dict:
    """Activation bytes saved for backward in one training step, MoD vs dense (counted by hooks)."""
    dense, mod = build_pair(cfg, device, dtype)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    res = {}
    for name, m in (("dense", dense), ("mod", mod)):
        seen: dict[int, int] = {}

        def pack(t, seen=seen):
            # count each storage once (views of one tensor share it)
            try:
                key = t.untyped_storage().data_ptr()
                seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
            except (RuntimeError, NotImplementedError):
                pass
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = m(x[:, :-1], x[:, 1:], mode="topk").loss
        params = {p.untyped_storage().data_ptr() for p in m.parameters()}
        res[name] = sum(v for k, v in seen.items() if k not in params)
        loss.backward()
    rec = dict(case="memory", dense_activation_bytes=res["dense"], mod_activation_bytes=res["mod"],
               activation_ratio=res["mod"] / res["dense"],
               settings=_settings(cfg, batch_size=batch_size, seq_len=seq_len, dtype=str(dtype)))
    if device.type == "cuda":
        for name, m in (("dense", dense), ("mod", mod)):
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            m(x[:, :-1], x[:, 1:], mode="topk").loss.backward()
            rec[f"{name}_peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        rec["peak_ratio"] = rec["mod_peak_bytes"] / rec["dense_peak_bytes"]
    return rec
