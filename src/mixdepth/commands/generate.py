"""`mixdepth generate`: sample text from a checkpoint with the KV cache and print statistics.

The generation is `mixdepth.generate.generate_text`; the routing maps are
`mixdepth.plots.routing_maps_from_generation`.
"""

from __future__ import annotations

import argparse
import sys

from ..checkpoint import load_checkpoint_tokenizer, load_model, resolve_checkpoint
from ..data import read_prompts
from ..flags import add_device_args
from ..generate import encode_prompts, format_stats, generate_text, is_uncalibrated
from ..model.dial import DEFAULT_RULE, RULES
from ..plots import routing_maps_from_generation
from ..runtime import resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint folder or run folder")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompts-file", metavar="FILE", help="a text file with one prompt per line, run as one batch")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt at most (default: 128)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    parser.add_argument("--top-p", type=float, default=None, help="sample from the nucleus holding this much mass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default: 0)")
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="stop a row once its text contains TEXT (repeatable; '\\n' means a newline)")
    parser.add_argument("--fraction", type=float, default=None,
                        help="fraction of tokens routed through each routed block (default: the calibrated one; "
                             "every token for a model never calibrated, e.g. freshly converted)")
    parser.add_argument("--fraction-rule", choices=RULES, default=None,
                        help=f"how --fraction is reached: hold (each row held at it, on any text) or threshold "
                             f"(the calibration table's threshold for it); default {DEFAULT_RULE}")
    parser.add_argument("--chat", action="store_true",
                        help="wrap each prompt as a user message in the tokenizer's chat template (a converted "
                             "model's Hugging Face tokenizer) and stop at its end-of-turn token")
    parser.add_argument("--chunk-size", type=int, default=512, help="prompt tokens per prefill step (default: 512)")
    parser.add_argument("--compile", action="store_true",
                        help="decode with static-shape steps: a CUDA graph per batch bucket on a GPU (layers no "
                             "row chose are skipped on the device), torch.compile on a CPU; same tokens as without")
    parser.add_argument("--routing-map", default=None, metavar="OUT.png",
                        help="save the routing map of what was generated (one per prompt), with the decisions "
                             "as .npz beside it")
    add_device_args(parser, dtype=False)


def run(args: argparse.Namespace) -> int:
    if args.prompt is not None and not args.prompt:
        raise ValueError("the prompt is empty")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts_file)
    ckpt = resolve_checkpoint(args.checkpoint)  # a run folder -> its latest checkpoint
    if args.fraction is not None and not 0 <= args.fraction <= 1:
        raise ValueError(f"--fraction must be in [0, 1], got {args.fraction}")
    device = resolve_device(args.device)
    model = load_model(ckpt, device=device)
    model.eval()
    tokenizer = load_checkpoint_tokenizer(ckpt)
    if args.chat and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"--chat needs a tokenizer with a chat template; the checkpoint's {tokenizer.kind} "
                         "tokenizer has none")
    fraction = args.fraction
    if fraction is None and model.routed_layers and model.can_decode_causally and is_uncalibrated(model):
        print("note: the routed layers were never calibrated: every token enters every block (pass --fraction "
              "to hold a routed fraction)", file=sys.stderr)
    stops = [s.replace("\\n", "\n") for s in args.stop or []]
    single = len(prompts) == 1
    sep = "\n" if args.chat else ""  # a chat reply is a new turn, not a continuation of the prompt
    if single:
        print(prompts[0], end=sep, flush=True)
    texts, res = generate_text(
        model, tokenizer, prompts, stop_strings=stops, chat=args.chat,
        on_text=(lambda b, piece: print(piece, end="", flush=True)) if single else None,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, fraction=fraction, fraction_rule=args.fraction_rule,
        chunk_size=args.chunk_size, compile=args.compile,
    )
    if single:
        print()
    else:
        for b, (p, t) in enumerate(zip(prompts, texts)):
            print(f"--- prompt {b} ({res.finish_reasons[b]}) ---\n{p}{sep}{t}")
    print("---")
    print(format_stats(res))
    if args.routing_map:
        encoded = encode_prompts(tokenizer, prompts, model.cfg.vocab_size, chat=args.chat)
        for path in routing_maps_from_generation(res, tokenizer, encoded, args.routing_map):
            print(f"routing map: {path}")
    return 0
