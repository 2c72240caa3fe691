"""`mixdepth convert SRC --out DIR`: a Hugging Face folder or GGUF file -> a MoD checkpoint (`mixdepth.hf`)."""

from __future__ import annotations

import argparse

from ..config import RoutingConfig
from ..flags import add_dataclass_args, overrides_from_args, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="a local Hugging Face model folder or a .gguf file (never the hub)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the checkpoint folder to write (new or empty)")
    parser.add_argument("--max-seq-len", type=positive_int, default=None,
                        help="cap the context (default: the source's max_position_embeddings or sliding window)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "auto"), default="fp32",
                        help="weights' dtype: fp32 (default), bf16, or auto (the source's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new routers' initialisation")
    parser.add_argument("--verify", action="store_true",
                        help="load the source with transformers too and compare: logits on a prompt, greedy tokens, "
                             "decode tokens/s (needs a second copy of the weights in memory)")
    parser.add_argument("--verify-prompt", default="What is the capital of France?", metavar="TEXT",
                        help="the prompt of --verify (through the chat template when the tokenizer has one)")
    add_dataclass_args(parser, RoutingConfig, "routing")


def run(args: argparse.Namespace) -> int:
    from .. import hf

    routing = {**hf.CONVERT_ROUTING, **overrides_from_args(args, "routing")}
    report = hf.convert(args.src, args.out, RoutingConfig(**routing), max_seq_len=args.max_seq_len,
                        dtype=args.dtype, seed=args.seed)
    cfg = report.cfg
    r = cfg.routing
    print(f"converted {args.src} ({cfg.family}, {report.params / 1e6:.1f}M parameters, {cfg.n_layers} layers, "
          f"context {cfg.max_seq_len}) -> {report.out}")
    print(f"routing: {r.router} at capacity {r.capacity} on layers {cfg.routed_layer_ids}, gate {r.gate}")
    print(f"time {report.seconds:.1f} s, peak memory {report.peak_rss / 2**20:.0f} MiB")
    if args.verify:
        from ..checkpoint import load_checkpoint_tokenizer, load_model

        model = load_model(report.out)
        tokenizer = load_checkpoint_tokenizer(report.out)
        text = args.verify_prompt
        chat = getattr(tokenizer, "chat_template", None)
        ids = tokenizer.chat_ids([{"role": "user", "content": text}]) if chat else tokenizer.encode(text)
        res = hf.verify(model, hf.load_reference(args.src), ids)
        t = res["tokens_per_s"]
        print(f"verify: largest |logit difference| {res['max_logit_diff']:.3g} over {len(ids)} prompt tokens; "
              f"greedy {res['new_tokens']} tokens {'identical' if res['same_greedy_tokens'] else 'DIFFER'}; "
              f"generation {t['mixdepth']:.1f} tok/s (dense mode) vs transformers {t['transformers']:.1f} tok/s "
              f"({res['speed_ratio']:.2f}x, median of {res['repeats']} runs)")
        if not res["same_greedy_tokens"]:
            return 1
    return 0
