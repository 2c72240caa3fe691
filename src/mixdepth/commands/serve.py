"""`mixdepth serve`: a checkpoint behind the OpenAI API (issue 29).

Wiring only: the engine is `mixdepth.serve.engine`, the HTTP layer `mixdepth.serve.api`, served by
uvicorn. On SIGTERM (or Ctrl-C) the server takes no new request, lets the running ones finish for
`--shutdown-timeout` seconds, ends the rest, and exits.
"""

from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path

from ..flags import add_device_args
from ..model.dial import DEFAULT_RULE, RULES

log = logging.getLogger("mixdepth")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder or run folder")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="cache rows in the pool: requests decoded together at most (default: 8)")
    parser.add_argument("--max-waiting", type=int, default=256,
                        help="requests that may wait for a row; more get HTTP 429 (default: 256)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on /v1/* (the page, /health and /metrics stay open)")
    parser.add_argument("--served-model-name", default=None, metavar="NAME",
                        help="model id in /v1/models and requests (default: the checkpoint folder's name)")
    parser.add_argument("--chunk-size", type=int, default=512, help="prompt tokens per prefill step (default: 512)")
    parser.add_argument("--fraction-rule", choices=RULES, default=None,
                        help="how a request's {\"mixdepth\": {\"fraction\": f}} is reached unless it names a rule: "
                             f"hold (held on any text) or threshold (the calibration table's); default {DEFAULT_RULE}")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20,
                        help="larger request bodies get HTTP 413 (default: 1 MiB)")
    parser.add_argument("--shutdown-timeout", type=float, default=5.0,
                        help="seconds running requests may take to finish on SIGTERM (default: 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    add_device_args(parser, dtype=False)


def run(args: argparse.Namespace) -> int:
    import torch

    try:
        import uvicorn

        from ..serve.api import create_app
    except ImportError as e:
        raise ValueError(f"mixdepth serve needs the serve extra (pip install 'mixdepth[serve]'): {e}") from None
    from ..checkpoint import load_checkpoint_tokenizer, load_model, resolve_checkpoint
    from ..runtime import resolve_device
    from ..serve.engine import Engine

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = resolve_checkpoint(args.checkpoint)
    model = load_model(ckpt, device=resolve_device(args.device))
    tokenizer = load_checkpoint_tokenizer(ckpt)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_waiting=args.max_waiting,
                    chunk_size=args.chunk_size, fraction_rule=args.fraction_rule)
    name = args.served_model_name or Path(args.checkpoint).resolve().name
    app = create_app(engine, name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                     shutdown_timeout=args.shutdown_timeout)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # SIGTERM/SIGINT: refuse new requests at once; running ones get --shutdown-timeout seconds, then
            # the engine ends them (their streams close with a last chunk and [DONE]) while uvicorn drains
            if not self.should_exit:
                engine.begin_shutdown()
                threading.Thread(target=engine.shutdown, args=(args.shutdown_timeout,), daemon=True).start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=int(args.shutdown_timeout) + 3)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("warning: serving on %s without --api-key: anyone who reaches this port can generate", args.host)
    log.info("serving %s as '%s' on http://%s:%d (max batch %d)%s", ckpt, name, args.host, args.port,
             args.max_batch, ", API key required on /v1" if args.api_key else "")
    Server(config).run()
    return 0
