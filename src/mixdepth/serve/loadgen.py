"""`mixdepth bench serve`: a MoD checkpoint and its dense twin under load, each behind `mixdepth serve`.

Both servers run at once on 127.0.0.1 (ports picked free), started here as subprocesses with the
same flags, so the load generator (asyncio + httpx, streaming completions) never shares a Python
interpreter with a model. For each concurrency (1, 4, 8, 16 by default) each server gets the same
`requests` prompts, at most `concurrency` in flight, dense then MoD, level by level, so a drift
in machine speed hits both alike. Bounded: `requests` per level, `max_tokens` per request, and no
new request after `max_seconds` in a level.

Per level and model: output tokens/s (all new tokens / the level's wall time), time to first token
(p50, p99 over requests) and per-token latency (p50, p99 over every token after a request's first:
the gap since the previous token, as vLLM's inter-token latency). Tokens are counted from each
chunk's `mixdepth.routed_layers` (one entry per new token), so a token whose text is held back
(an incomplete character) still counts when it arrives.

The dense twin is `mixdepth.flops.dense_twin` of the checkpoint's config with the checkpoint's
weights (routers dropped); without a checkpoint both come from `mixdepth.bench.build_pair` (random
weights, the MoD model calibrated to route `capacity` of a random stream, as `bench decode` does).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger("mixdepth")


# ---- the two checkpoints ---------------------------------------------------------------------------
def prepare_pair(out: Path, checkpoint: str | Path | None = None, cfg=None, seed: int = 0) -> dict[str, Path]:
    """Checkpoint folders {"dense": ..., "mod": ...}: the given MoD checkpoint and its dense twin
    written under `out`, or (no checkpoint) a random pair from `cfg` written there."""
    from ..checkpoint import load_checkpoint_tokenizer, load_model, resolve_checkpoint, save_checkpoint
    from ..data import ByteTokenizer
    from ..flops import dense_twin
    from ..model import MoDTransformer

    out.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None:
        ckpt = resolve_checkpoint(checkpoint)
        mod = load_model(ckpt)
        if not mod.routed_layers:
            raise ValueError(f"{ckpt} routes no layer: bench serve wants a MoD checkpoint (it makes the dense twin)")
        dense = MoDTransformer(dense_twin(mod.cfg))
        dense.load_state_dict(mod.state_dict(), strict=False)
        return {"dense": save_checkpoint(out / "dense", dense, tokenizer=load_checkpoint_tokenizer(ckpt)), "mod": ckpt}
    from ..bench import build_pair

    if cfg.vocab_size < 256:
        raise ValueError(f"a random pair is served with the byte tokenizer, which needs vocab_size >= 256, got "
                         f"{cfg.vocab_size}")
    dense, mod = build_pair(cfg, torch.device("cpu"), torch.float32, seed=seed)
    stream = torch.randint(0, 256, (8, min(cfg.max_seq_len, 512)), generator=torch.Generator().manual_seed(seed + 1))
    mod.calibrate_causal(stream, cfg.routing.capacity)
    return {name: save_checkpoint(out / name, m, tokenizer=ByteTokenizer()) for name, m in
            (("dense", dense), ("mod", mod))}


# ---- the servers -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`mixdepth serve CKPT` on a free port of 127.0.0.1, in a subprocess."""

    def __init__(self, ckpt: Path, name: str, max_batch: int, log_path: Path, threads: int | None = None) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.name = name
        cmd = [sys.executable, "-m", "mixdepth", "serve", str(ckpt), "--port", str(self.port), "--max-batch",
               str(max_batch), "--served-model-name", name, "--max-waiting", "4096"]
        if threads:
            cmd += ["--threads", str(threads)]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ValueError(f"mixdepth serve for {self.name} exited with status {self.proc.returncode} "
                                 f"(see {self.log.name})")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise ValueError(f"mixdepth serve for {self.name} not ready after {timeout:.0f} s (see {self.log.name})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


# ---- one load level ----------------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


async def _one(client, base: str, body: dict) -> dict:
    t0 = time.perf_counter()
    first, last, gaps, n = None, None, [], 0
    async with client.stream("POST", base + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise ValueError(f"HTTP {resp.status_code} from {base}: {(await resp.aread())[:200]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:  # the request failed mid-stream: its figures would be wrong
                raise ValueError(f"a stream from {base} failed: {chunk['error'].get('message')}")
            k = len((chunk.get("mixdepth") or {}).get("routed_layers") or [])
            if not k:
                continue
            now = time.perf_counter()
            if first is None:  # the first token's wait is the TTFT, not a per-token latency
                first = now
            else:
                gaps += [(now - last) / k] * k
            last = now
            n += k
    return {"ttft": (first - t0) if first is not None else float("nan"), "gaps": gaps, "tokens": n}


async def _level(base: str, model: str, prompts: list[list[int]], concurrency: int, max_tokens: int,
                 max_seconds: float, temperature: float) -> dict:
    import httpx

    todo = list(enumerate(prompts))
    results: list[dict] = []
    t0 = time.perf_counter()

    async def worker(client):
        while todo and time.perf_counter() - t0 < max_seconds:
            i, p = todo.pop(0)
            body = {"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": temperature, "seed": i,
                    "stream": True}
            results.append(await _one(client, base, body))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    return {"requests": len(results), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_p50_ms": 1e3 * _pct(ttft, 50), "ttft_p99_ms": 1e3 * _pct(ttft, 99),
            "itl_p50_ms": 1e3 * _pct(gaps, 50), "itl_p99_ms": 1e3 * _pct(gaps, 99),
            "tpot_mean_ms": 1e3 * statistics.fmean(gaps) if gaps else float("nan")}


def _metrics(base: str) -> dict[str, float]:
    """mixdepth_routed_fraction per layer and the KV ratio from a server's /metrics."""
    import httpx

    text = httpx.get(base + "/metrics", timeout=10).text
    routed = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("mixdepth_routed_fraction{")]
    return {"routed_fraction": statistics.fmean(routed) if routed else 1.0}


# ---- the benchmark ---------------------------------------------------------------------------------
def bench_serve(out: str | Path, *, checkpoint: str | Path | None = None, cfg=None,
                concurrency: tuple[int, ...] = (1, 4, 8, 16), requests: int = 32, max_tokens: int = 64,
                prompt_len: int = 64, max_seconds: float = 300.0, temperature: float = 0.8, threads: int | None = None,
                seed: int = 0, max_batch: int | None = None) -> list[dict]:
    """Run the benchmark; writes `bench-serve.json`, `bench-serve.md`, `bench-serve.png` and the servers'
    logs in `out` (the checkpoints served go to a temporary folder). Each server's pool has `max_batch`
    rows (default: the largest concurrency).

    Returns one record per (concurrency, model) with tok/s, TTFT and per-token latency percentiles,
    and for MoD the ratios against dense at the same concurrency.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    tmp = Path(tempfile.mkdtemp(prefix="mixdepth-bench-serve-"))  # the checkpoints written here, removed after
    try:
        return _bench_serve(out, tmp, checkpoint, cfg, concurrency, requests, max_tokens, prompt_len, max_seconds,
                            temperature, threads, seed, max_batch or max(concurrency))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bench_serve(out, tmp, checkpoint, cfg, concurrency, requests, max_tokens, prompt_len, max_seconds, temperature,
                 threads, seed, max_batch) -> list[dict]:
    ckpts = prepare_pair(tmp, checkpoint, cfg, seed)
    from ..checkpoint import load_config

    vocab = load_config(ckpts["mod"]).vocab_size
    g = torch.Generator().manual_seed(seed)
    # token-id prompts: the same for both models and any tokenizer (ids below 256 are bytes for the byte one)
    prompts = torch.randint(0, min(vocab, 256), (max(requests, max(concurrency)), prompt_len), generator=g).tolist()
    servers = {name: ServerProcess(ck, name, max_batch, out / f"serve-{name}.log", threads)
               for name, ck in ckpts.items()}
    records: list[dict] = []
    try:
        for s in servers.values():
            s.wait_ready()
        for s in servers.values():  # warm-up: first-call costs out of the timed levels
            asyncio.run(_level(s.base, s.name, prompts[:2], 2, 4, max_seconds, temperature))
        for c in concurrency:
            n = max(requests, c)
            level: dict[str, dict] = {}
            for name in ("dense", "mod"):
                level[name] = asyncio.run(_level(servers[name].base, name, prompts[:n], c, max_tokens, max_seconds,
                                                 temperature))
                level[name].update(model=name, concurrency=c)
                log.info("c=%d %s: %.1f tok/s, TTFT p50 %.0f ms, per-token p50/p99 %.1f/%.1f ms", c, name,
                         level[name]["tok_s"], level[name]["ttft_p50_ms"], level[name]["itl_p50_ms"],
                         level[name]["itl_p99_ms"])
            level["mod"]["tok_s_ratio"] = level["mod"]["tok_s"] / level["dense"]["tok_s"]
            level["mod"]["itl_p99_ratio"] = level["mod"]["itl_p99_ms"] / level["dense"]["itl_p99_ms"]
            records += [level["dense"], level["mod"]]
        routed = _metrics(servers["mod"].base)["routed_fraction"]
    finally:
        for s in servers.values():
            s.stop()
    settings = {"checkpoint": str(checkpoint) if checkpoint else None, "concurrency": list(concurrency),
                "requests": requests, "max_tokens": max_tokens, "prompt_len": prompt_len, "temperature": temperature,
                "max_seconds": max_seconds, "max_batch": max_batch, "routed_fraction_mod": routed,
                "cpu_count": os.cpu_count(), "torch": torch.__version__}
    (out / "bench-serve.json").write_text(json.dumps({"settings": settings, "records": records}, indent=2))
    (out / "bench-serve.md").write_text(format_table(records, settings))
    plot_curve(records, out / "bench-serve.png")
    return records


def format_table(records: list[dict], settings: dict) -> str:
    """The markdown table of a run: one row per concurrency, dense and MoD side by side."""
    by = {(r["concurrency"], r["model"]): r for r in records}
    lines = [
        f"requests per level {settings['requests']}, {settings['max_tokens']} new tokens each, prompts of "
        f"{settings['prompt_len']} tokens, temperature {settings['temperature']}, --max-batch "
        f"{settings['max_batch']}; MoD routed fraction "
        f"{settings['routed_fraction_mod']:.3f} (decode, per routed layer, mean)",
        "",
        "| concurrency | dense tok/s | MoD tok/s | MoD/dense | TTFT p50/p99 dense (ms) | TTFT p50/p99 MoD (ms) "
        "| per-token p50/p99 dense (ms) | per-token p50/p99 MoD (ms) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in settings["concurrency"]:
        d, m = by[(c, "dense")], by[(c, "mod")]
        ttft = " | ".join(f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f}" for r in (d, m))
        itl = " | ".join(f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f}" for r in (d, m))
        lines.append(f"| {c} | {d['tok_s']:.1f} | {m['tok_s']:.1f} | {m['tok_s_ratio']:.2f}x | {ttft} | {itl} |")
    return "\n".join(lines) + "\n"


def plot_curve(records: list[dict], out_png: Path) -> Path:
    """Output tokens/s and p99 per-token latency against concurrency, dense and MoD."""
    from ..plots import _pyplot, _save

    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in (("dense", "o-"), ("mod", "s-")):
        rs = sorted((r for r in records if r["model"] == name), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in rs]
        label = "MoD" if name == "mod" else "dense twin"
        a.plot(xs, [r["tok_s"] for r in rs], style, label=label)
        b.plot(xs, [r["itl_p99_ms"] for r in rs], style, label=label)
    levels = sorted({r["concurrency"] for r in records})
    for ax, title in ((a, "output tokens/s"), (b, "per-token latency p99 (ms)")):
        ax.set_xlabel("concurrent requests")
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("mixdepth serve: MoD vs its dense twin")
    return _save(fig, out_png)
