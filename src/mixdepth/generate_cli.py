"""`mixdepth generate`: sample text from a checkpoint with the KV cache and print statistics.

The generation itself lives in `mixdepth.generate`; this module reads prompts, loads the
checkpoint and its tokenizer, streams the text and writes routing maps.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .generate import GenerationResult, encode_prompts, format_stats, generate_text

log = logging.getLogger("mixdepth")

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
                        help="fraction of tokens routed through each routed block (default: the calibrated one)")
    parser.add_argument("--chunk-size", type=int, default=512, help="prompt tokens per prefill step (default: 512)")
    parser.add_argument("--routing-map", default=None, metavar="OUT.png",
                        help="save the routing map of what was generated (one per prompt), with the decisions "
                             "as .npz beside it")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        if not args.prompt:
            raise ValueError("the prompt is empty")
        return [args.prompt]
    path = Path(args.prompts_file)
    if not path.is_file():
        raise ValueError(f"prompts file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"prompts file {path} is not UTF-8 text") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompt (one per line)")
    return prompts


def _token_text(tokenizer, t: int) -> str:
    """One token's text for a tick label; a byte of a multi-byte character or a control
    character shows as its id, e.g. <e2>."""
    s = tokenizer.decode([t])
    if "\ufffd" in s or any(not c.isprintable() and c not in " \n\t" for c in s):
        return f"<{t:02x}>" if t < 256 else f"<{t}>"
    return s


def _save_routing_maps(out: str, tokenizer, res: GenerationResult, encoded: list[list[int]]) -> list[Path]:
    from . import plots

    if not res.routed_layers:
        raise ValueError("--routing-map: the model has no routed layers (a dense model has no routing map)")
    out_path = Path(out)
    written = []
    for b, decisions in enumerate(res.routing):
        fed = (encoded[b] + res.tokens[b])[: decisions.shape[1]]
        texts = [_token_text(tokenizer, t) for t in fed]
        png = out_path if len(res.routing) == 1 else out_path.with_name(f"{out_path.stem}-{b}{out_path.suffix}")
        d = decisions.numpy()
        plots.save_decisions(png.with_suffix(".npz"), d, texts, res.routed_layers)
        written.append(plots.plot_routing_map(
            d, texts, png, layer_ids=res.routed_layers,
            title=f"causal routing while generating: prompt {b}, {d.shape[1]} tokens fed "
                  f"({100 * d.mean():.1f}% of token-layer slots chosen)"))
    return written


def run(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint_tokenizer, load_model, resolve_checkpoint
    from .train import resolve_device

    prompts = _read_prompts(args)
    ckpt = resolve_checkpoint(args.checkpoint)  # a run folder -> its latest checkpoint
    if args.fraction is not None and not 0 <= args.fraction <= 1:
        raise ValueError(f"--fraction must be in [0, 1], got {args.fraction}")
    device = resolve_device(args.device)
    model = load_model(ckpt, device=device)
    model.eval()
    tokenizer = load_checkpoint_tokenizer(ckpt)
    stops = [s.replace("\\n", "\n") for s in args.stop or []]
    single = len(prompts) == 1
    if single:
        print(prompts[0], end="", flush=True)
    texts, res = generate_text(
        model, tokenizer, prompts, stop_strings=stops,
        on_text=(lambda b, piece: print(piece, end="", flush=True)) if single else None,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, fraction=args.fraction, chunk_size=args.chunk_size,
    )
    if single:
        print()
    else:
        for b, (p, t) in enumerate(zip(prompts, texts)):
            print(f"--- prompt {b} ({res.finish_reasons[b]}) ---\n{p}{t}")
    print("---")
    print(format_stats(res))
    if args.routing_map:
        encoded = encode_prompts(tokenizer, prompts, model.cfg.vocab_size)
        for path in _save_routing_maps(args.routing_map, tokenizer, res, encoded):
            print(f"routing map: {path}")
    return 0
