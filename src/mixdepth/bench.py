"""Speed and memory of MoD against dense at the same dimensions, measured in one process.

Every case builds the MoD model and its dense twin (same dimensions, `router="none"`), warms both
up, then times them in alternation (dense, MoD, dense, MoD, ...) so drifts in machine speed hit
both alike, and reports the median. Each record carries the ideal ratio from `mixdepth.flops` and
the efficiency (measured ratio / ideal ratio).

Cases:
- `train`: forward + backward + AdamW step on `batch x seq_len` tokens (`topk` routing).
- `prefill`: a forward pass without gradients on the same tokens (`topk` routing).
- `decode-bN`: one-token decode steps with N rows and `context` tokens already cached, causal
  routing with the threshold calibrated so that `capacity` of the tokens route.
- `memory`: bytes of activations saved for the backward pass of one training step, and bytes of
  KV cache in use after a decode run (device independent: counted, not sampled).

Weights are random: speed does not depend on their values, only on how many tokens route, which
the calibration fixes (the measured fraction is part of each decode record).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable

import torch

from . import flops
from .config import ModelConfig

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


def compile_blocks(model) -> None:
    """torch.compile each block in place (torchtitan style): static shapes in topk mode, so one graph
    per block; the model object stays the same for saving and evaluation."""
    for layer in model.layers:
        layer.compile()


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


def bench_sweep(cfg: ModelConfig, batch_size: int, seq_len: int, capacities: list[float], route_every: list[int],
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


def steady_allocator() -> None:
    """Keep freed memory in glibc's heap instead of returning it to the OS after every step.

    Otherwise every large activation is a fresh mmap whose pages fault in on first touch, a cost
    that falls unevenly on models whose tensors differ in size and adds run-to-run noise.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD: its largest allowed value
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


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
                 rounds: int = 3) -> dict:
    """Decode `new_tokens` steps after a `context`-token prefill; median over `rounds` alternations."""
    dense, mod = build_pair(cfg, device, dtype)
    g = torch.Generator().manual_seed(1)
    # Decode steps are fed a fixed random token stream (teacher forcing) rather than the argmax of a
    # random model, whose greedy output degenerates into repeats. The causal thresholds are
    # calibrated on that same stream so that `capacity` of its tokens route: with random weights the
    # routed fraction varies a lot from one random text to another, and speed at the configured
    # capacity is what is measured. The fraction actually routed while decoding is reported.
    stream = torch.randint(0, cfg.vocab_size, (batch_size, context + new_tokens), generator=g).to(device)
    mod.calibrate_causal(stream, cfg.routing.capacity)
    prompt = stream[:, :context]
    S = context + new_tokens
    for m in (dense, mod):
        m.setup_cache(batch_size, S, dtype=dtype, device=device)

    states = {}
    for name, m in (("dense", dense), ("mod", mod)):  # prefill once; each round decodes from there
        m(prompt, mode="causal", input_pos=torch.zeros(batch_size, dtype=torch.long), last_only=True)
        states[name] = m.kv_cache.fill_state()

    def run(name: str, m) -> float:
        m.kv_cache.restore_fill(states[name])
        B = batch_size
        _sync(device)
        t0 = time.perf_counter()
        for i in range(new_tokens):
            out = m(stream[:, context + i : context + i + 1], mode="causal",
                    input_pos=torch.full((B,), context + i, dtype=torch.long))
            out.logits[:, -1].argmax(-1)
        _sync(device)
        return time.perf_counter() - t0

    run("dense", dense), run("mod", mod)  # warm-up
    times: dict[str, list[float]] = {"dense": [], "mod": []}
    for _ in range(rounds):
        times["dense"].append(run("dense", dense))
        times["mod"].append(run("mod", mod))
    td, tm = statistics.median(times["dense"]), statistics.median(times["mod"])
    cache, dense_cache = mod.kv_cache, dense.kv_cache
    kv_ratio = cache.bytes_in_use() / dense_cache.bytes_in_use()
    kv_alloc = cache.bytes_allocated() / dense_cache.bytes_allocated()
    decoded = batch_size * new_tokens
    n_routed = len(cfg.routed_layer_ids)
    routed = sum(int(c.sum()) for c in cache.routed_counts().values())
    # fraction routed among the decoded tokens only (the prefill is not timed)
    routed_ids = set(cfg.routed_layer_ids)
    prefill_routed = sum(int(st.sum()) for i, st in enumerate(states["mod"][:-1]) if i in routed_ids)
    frac_decode = (routed - prefill_routed) / (n_routed * decoded)
    ctx = context + new_tokens // 2
    ideal = flops.decode_flops_per_token(flops.dense_twin(cfg), ctx) / \
        flops.decode_flops_per_token(cfg, ctx, routed_fraction=frac_decode)
    return _record(
        f"decode-b{batch_size}", td, tm, decoded, ideal, kv_bytes_ratio=kv_ratio, kv_alloc_ratio=kv_alloc,
        routed_frac_decode=frac_decode,
        settings=_settings(cfg, batch_size=batch_size, context=context, new_tokens=new_tokens, dtype=str(dtype)),
    )


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


# ---- CLI ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import add_model_args

    parser.add_argument("what", nargs="?", default="all",
                        choices=["train", "prefill", "decode", "memory", "sweep", "all"],
                        help="which benchmark to run (default: all = train, prefill, decode, memory)")
    add_model_args(parser, default_preset="bench")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step for train/prefill/memory")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence for train/prefill/memory")
    parser.add_argument("--decode-batches", default="1,8,32", help="comma-separated decode batch sizes")
    parser.add_argument("--context", type=int, default=512, help="tokens in the cache before decoding")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps timed per round")
    parser.add_argument("--rounds", type=int, default=7, help="decode: timed rounds per model (median)")
    parser.add_argument("--capacities", default="1.0,0.5,0.25,0.125", help="sweep: comma-separated capacities")
    parser.add_argument("--route-every", default="1,2", help="sweep: comma-separated route_every values")
    parser.add_argument("--iters", type=int, default=5, help="timed training or prefill iterations per model (median)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models (train and prefill)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the records as a JSON list")


def _fmt(rec: dict) -> str:
    if rec["case"] == "memory":
        s = f"{'memory':<18} activations saved for backward: dense {rec['dense_activation_bytes'] / 2**20:,.0f} MiB, " \
            f"MoD {rec['mod_activation_bytes'] / 2**20:,.0f} MiB ({rec['activation_ratio']:.2f}x)"
        if "peak_ratio" in rec:
            s += f"; CUDA peak {rec['peak_ratio']:.2f}x"
        return s
    s = (f"{rec['case']:<18} {rec['dense_tok_s']:>12,.0f} {rec['mod_tok_s']:>12,.0f} {rec['ratio']:>7.2f}x "
         f"{rec['ideal_ratio']:>7.2f}x {rec['efficiency']:>6.2f}")
    if "kv_bytes_ratio" in rec:
        s += f"   kv {rec['kv_bytes_ratio']:.2f}x (alloc {rec['kv_alloc_ratio']:.2f}x), " \
             f"routed {rec['routed_frac_decode']:.3f}"
    return s


def _numbers(text: str, kind: type, flag: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated {kind.__name__}s, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{flag} must list positive numbers, got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    from .cli import CLIError, model_config_from_args
    from .train import resolve_device

    cfg = model_config_from_args(args)
    steady_allocator()
    if cfg.routing.router == "none":
        raise CLIError("bench compares a routed model with its dense twin: --routing.router must not be none")
    dev = resolve_device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype) or \
        (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    need = max(args.seq_len, args.context + args.new_tokens)
    if need > cfg.max_seq_len:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "max_seq_len": need})
    batches = _numbers(args.decode_batches, int, "--decode-batches")
    what = ["train", "prefill", "decode", "memory"] if args.what == "all" else [args.what]
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"device: {dev_name}; dtype {str(dtype).replace('torch.', '')}; torch {torch.__version__}")
    print(f"model: dim={cfg.dim} layers={cfg.n_layers} heads={cfg.n_heads} ffn={cfg.ffn_dim} vocab={cfg.vocab_size}; "
          f"router={cfg.routing.router} capacity={cfg.routing.capacity} routed layers={cfg.routed_layer_ids}")
    print(f"{'case':<18} {'dense tok/s':>12} {'MoD tok/s':>12} {'ratio':>8} {'ideal':>8} {'eff.':>6}")
    records = []
    kw = dict(device=dev, dtype=dtype)
    for w in what:
        if w == "train":
            recs = [bench_train(cfg, args.batch_size, args.seq_len, iters=args.iters, compile=args.compile, **kw)]
        elif w == "prefill":
            recs = [bench_prefill(cfg, args.batch_size, args.seq_len, iters=max(args.iters, 3), compile=args.compile,
                                  **kw)]
        elif w == "sweep":
            recs = bench_sweep(cfg, args.batch_size, args.seq_len, _numbers(args.capacities, float, "--capacities"),
                               _numbers(args.route_every, int, "--route-every"), iters=args.iters, **kw)
        elif w == "decode":
            recs = [bench_decode(cfg, b, args.context, args.new_tokens, rounds=args.rounds, **kw) for b in batches]
        else:
            recs = [bench_memory(cfg, args.batch_size, args.seq_len, **kw)]
        for r in recs:
            r["device"] = dev_name
            print(_fmt(r), flush=True)
        records += recs
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)
    return 0
