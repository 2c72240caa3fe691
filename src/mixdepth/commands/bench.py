"""`mixdepth bench`: the cases of `mixdepth.bench` on one model config, as a table (and JSON)."""

from __future__ import annotations

import argparse
import json
import platform

import torch

from .. import bench
from ..config import ModelConfig
from ..flags import CLIError, add_device_args, add_model_args, model_config_from_args, number_list
from ..runtime import resolve_device, steady_allocator, torch_dtype


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", nargs="?", default="all",
                        choices=["train", "prefill", "decode", "memory", "capacities", "moe", "serve", "all"],
                        help="which benchmark to run (default: all = train, prefill, decode, memory; moe = train "
                             "and decode of MoE, staged and integrated MoDE vs dense of the same active size; serve "
                             "= a MoD checkpoint and its dense twin behind `mixdepth serve` under load, "
                             "mixdepth.serve.loadgen)")
    add_model_args(parser, default_preset="bench")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step for train/prefill/memory")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence for train/prefill/memory")
    parser.add_argument("--decode-batches", default="1,8,32", help="comma-separated decode batch sizes")
    parser.add_argument("--context", type=int, default=512, help="tokens in the cache before decoding")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps timed per round")
    parser.add_argument("--rounds", type=int, default=7, help="decode: timed rounds per model (median)")
    parser.add_argument("--capacities", default="1.0,0.5,0.25,0.125", help="capacities: comma-separated capacities")
    parser.add_argument("--route-every", default="1,2", help="capacities: comma-separated route_every values")
    parser.add_argument("--iters", type=int, default=5, help="timed training or prefill iterations per model (median)")
    add_device_args(parser)
    parser.add_argument("--compile", action="store_true",
                        help="train and prefill: torch.compile each block; decode: static-shape steps for both "
                             "models, captured as a CUDA graph on a GPU, torch.compile on a CPU (compile time "
                             "reported apart)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the records as a JSON list")
    serve = parser.add_argument_group("serve", "bench serve: output tokens/s, TTFT and per-token latency against "
                                      "concurrency (--new-tokens new tokens per request)")
    serve.add_argument("--checkpoint", default=None, metavar="DIR",
                       help="the MoD checkpoint (its dense twin is made from it); default: a random pair of the "
                            "model flags, calibrated to route the capacity")
    serve.add_argument("--concurrency", default="1,4,8,16",
                       help="comma-separated concurrent requests (default: 1,4,8,16)")
    serve.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default: 32)")
    serve.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request (default: 64)")
    serve.add_argument("--max-seconds", type=float, default=300.0,
                       help="no new request after this many seconds in a level (default: 300)")
    serve.add_argument("--max-batch", type=int, default=None,
                       help="each server's --max-batch (default: the largest --concurrency)")
    serve.add_argument("--serve-threads", type=int, default=None,
                       help="torch threads of each server (default: torch's)")
    serve.add_argument("--out", default="runs/bench-serve", metavar="DIR",
                       help="folder for bench-serve.json/.md/.png and the server logs "
                            "(default: runs/bench-serve)")


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
    if "mod_peak_bytes" in rec:
        s += f", peak {rec['dense_peak_bytes'] / 2**30:.2f}/{rec['mod_peak_bytes'] / 2**30:.2f} GiB"
    if "mod_compile_s" in rec:
        s += f", compile {rec['dense_compile_s']:.1f}/{rec['mod_compile_s']:.1f} s"
    return s


def run(args: argparse.Namespace) -> int:
    cfg = model_config_from_args(args)
    if args.what == "serve":
        return _run_serve(args, cfg)
    steady_allocator()
    if not cfg.routed_layer_ids and args.what != "moe":
        raise CLIError("bench compares a routed model with its dense twin, and this config routes no layer "
                       f"(router {cfg.routing.router}, routed layers {cfg.routing.routed_layers})")
    dev = resolve_device(args.device)
    dtype = torch_dtype(args.dtype, dev)
    need = max(args.seq_len, args.context + args.new_tokens)
    if need > cfg.max_seq_len:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "max_seq_len": need})
    batches = number_list(args.decode_batches, int, "--decode-batches")
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
            recs = [bench.bench_train(cfg, args.batch_size, args.seq_len, iters=args.iters, compile=args.compile, **kw)]
        elif w == "prefill":
            recs = [bench.bench_prefill(cfg, args.batch_size, args.seq_len, iters=max(args.iters, 3),
                                        compile=args.compile, **kw)]
        elif w == "capacities":
            recs = bench.bench_capacities(cfg, args.batch_size, args.seq_len,
                                     number_list(args.capacities, float, "--capacities"),
                                     number_list(args.route_every, int, "--route-every"), iters=args.iters, **kw)
        elif w == "moe":
            recs = bench.bench_moe(cfg, args.batch_size, args.seq_len, batches, args.context, args.new_tokens,
                                   iters=args.iters, rounds=args.rounds, **kw)
        elif w == "decode":
            recs = [bench.bench_decode(cfg, b, args.context, args.new_tokens, rounds=args.rounds,
                                       compile=args.compile, **kw) for b in batches]
        else:
            recs = [bench.bench_memory(cfg, args.batch_size, args.seq_len, **kw)]
        for r in recs:
            r["device"] = dev_name
            print(_fmt(r), flush=True)
        records += recs
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)
    return 0


def _run_serve(args: argparse.Namespace, cfg: ModelConfig) -> int:
    from ..serve.loadgen import bench_serve

    if args.checkpoint is None and not cfg.routed_layer_ids:
        raise CLIError("bench serve compares a routed model with its dense twin, and this config routes no layer")
    need = args.prompt_len + args.new_tokens
    if args.checkpoint is None and need > cfg.max_seq_len:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "max_seq_len": need})
    levels = number_list(args.concurrency, int, "--concurrency")
    bench_serve(args.out, checkpoint=args.checkpoint, cfg=cfg, concurrency=tuple(levels), requests=args.requests,
                max_tokens=args.new_tokens, prompt_len=args.prompt_len, max_seconds=args.max_seconds,
                threads=args.serve_threads, max_batch=args.max_batch)
    print(open(f"{args.out}/bench-serve.md").read(), end="")
    print(f"wrote {args.out}/bench-serve.json, bench-serve.md, bench-serve.png")
    return 0
