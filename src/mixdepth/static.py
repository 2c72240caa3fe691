"""Static-shape decode steps: one graph for every routing outcome, with no host sync (issue 20).

The eager decode step (`generate.decode_one`) runs a routed block for the rows that chose it,
gathered by index: its shapes depend on the routing, so each routed layer asks the host how many
rows chose it. On a GPU at batch 8 or more that sync, and the kernel launches of a one-token step,
cost more than the routed layers save. This step has the same shapes whatever the routing:

- every row runs the routed unit and keeps its output only if it chose it (`MoDBlock.run_static`);
  a row that did not choose, is finished, or is batch padding writes its key and value to a
  spare slot that no other query reads (`kvcache.StaticCache`);
- a layer that no row chose is skipped on the device: its weights are not read (`when`: a CUDA
  graph conditional node when captured, `torch.cond` when traced, a plain `if` on the CPU);
- fill lengths and positions live on the device; buffers are sized before the step (routed ones
  with headroom, grown between steps when a host-side bound runs out), so the step never
  reallocates.

`StaticDecoder` runs it: batches are padded to a few bucket sizes, prefill stays with the eager
path (`generate.prefill`), and with `compile` the step is captured as a CUDA graph per bucket on a
GPU (replayed each step; no launch or sync on the host but the replay), or compiled with
`torch.compile` on a CPU. Rows, logits and routing decisions equal the eager cached path's.

Dimensions: B batch (padded), R routed layers, V vocabulary, D model width.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch

from .kvcache import KVCache, StaticCache

log = logging.getLogger("mixdepth")

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Batch sizes a static step is built for: a batch runs in the smallest that holds it."""


def bucket(batch_size: int) -> int:
    """The padded batch size of a batch of `batch_size` rows."""
    for b in BUCKETS:
        if b >= batch_size:
            return b
    return 2 ** math.ceil(math.log2(batch_size))


# ---- skipping a layer that no row chose --------------------------------------------------------------
# when(pred, fn, operands) -> fn(*operands) if pred else operands[0], pred a 0-d bool tensor.
def when_always(pred, fn, operands):
    """Run the unit whoever chose (its output is kept per row anyway): the weights are always read."""
    return fn(*operands)


def when_host(pred, fn, operands):
    """Ask the host (free on a CPU, where the tensor is already there)."""
    return fn(*operands) if bool(pred) else operands[0]


def when_cond(pred, fn, operands):
    """`torch.cond`: one traced graph with both branches (torch.compile, fullgraph)."""
    return torch.cond(pred, fn, lambda x, *_: x.clone(), tuple(operands))


def when_graph_node(pred, fn, operands):
    """Inside a CUDA graph capture: the unit becomes a conditional node, run by the device only when
    `pred` holds at replay. Its result is written into the residual stream in place."""
    from torch._higher_order_ops.cudagraph_conditional_nodes import _if_body

    x = operands[0]
    with _if_body(pred):
        x.copy_(fn(*operands))
    return x


def conditional_nodes_available() -> bool:
    """Whether this torch build can capture CUDA graph conditional nodes (CUDA >= 12.4)."""
    try:
        from torch._higher_order_ops.cudagraph_conditional_nodes import _if_body  # noqa: F401
    except ImportError:
        return False
    if torch.version.hip is not None or torch.version.cuda is None:
        return False
    if tuple(int(v) for v in torch.version.cuda.split(".")[:2]) < (12, 4):
        return False
    graph = torch.cuda.CUDAGraph
    return all(hasattr(graph, name) for name in ("begin_capture_to_if_node", "get_currently_capturing_graph",
                                                  "end_capture_to_conditional_node"))


# ---- the step ---------------------------------------------------------------------------------------
def static_step(model, cache: StaticCache, tokens: torch.Tensor, active: torch.Tensor,
                thresholds: torch.Tensor | None = None, when: Callable = when_host,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step with static shapes: one token per row at its next position.

    Args:
        model: a `MoDTransformer` (dense or MoD, no MoE layer).
        cache: its `StaticCache`, B rows; row b continues at `cache.seq_lengths[b]`.
        tokens: (B,) token ids on the model's device.
        active: (B,) bool on the device: inactive rows (finished, padding) write nothing, route
            nothing and do not advance.
        thresholds: (R,) causal thresholds of the routed layers (default: the calibrated ones).
        when: how a layer that no row chose is skipped (`when_*`).

    Returns:
        logits (B, V) and chosen (R, B) bool: which rows entered each routed layer's block.
    """
    # a row at the end of the cache can only be inactive (the caller keeps active rows inside it):
    # clamped, its RoPE lookup stays in the table
    pos = cache.seq_lengths.clamp(max=cache.max_seq_len - 1)[:, None]  # (B, 1)
    x = model.embed_tokens(tokens)[:, None]  # (B, 1, D)
    cos, sin = model.rope(pos)
    chosen, j = [], 0
    for layer in model.layers:
        if not layer.routed:
            x = layer.decode_static(x, cos, sin, cache, active)
            continue
        t = None if thresholds is None else thresholds[j]
        x, r, c = layer.decide_static(x, cos, sin, cache, active, t)
        x = when(c.any(), lambda x, r, c, layer=layer: layer.run_static(x, r, c, cos, sin, cache), (x, r, c))
        x = layer.finish_static(x)
        chosen.append(c)
        j += 1
    cache.seq_lengths.add_(active.long())
    logits = model.lm_head(model.norm(x))[:, 0]  # (B, V)
    return logits, torch.stack(chosen) if chosen else active.new_zeros(0, active.shape[0])


# ---- the runner -------------------------------------------------------------------------------------
class StaticDecoder:
    """Runs `static_step` for one model: padded batches, optional CUDA graphs or torch.compile.

    Made per generation or kept and reused (`generate(..., decoder=...)`): it owns a static cache per
    batch bucket and, on a GPU with `compile`, the CUDA graph captured for it. It decodes one batch at
    a time: `start` hands it a new one, and steps of a batch started before then are refused.
    Active rows must stay inside the cache (`generate` stops a row when its context is full).

    Args:
        model: a `MoDTransformer` that can decode causally and has no MoE layer.
        compile: on CUDA, capture each bucket's step as a CUDA graph (a layer no row chose is a
            conditional node the device skips, where torch supports them); on CPU, compile the
            step with `torch.compile` (`backend`).
        backend: the `torch.compile` backend on CPU (default inductor).
    """

    def __init__(self, model, *, compile: bool = False, backend: str | None = None):
        if getattr(model, "moe_layers", None):
            raise ValueError("static decoding supports dense and MoD models; MoE layers pick experts with "
                             "host-side shapes (decode without --compile)")
        if not model.can_decode_causally:
            raise ValueError(f"a model with {model.cfg.routing.router} routing cannot decode causally")
        if model.cfg.local_window:
            raise ValueError("static decoding does not window the non-routed layers' attention "
                             "(model.local_window): decode without --compile")
        if model.needs_ids:
            raise ValueError(f"static decoding does not pass token ids to the {model.cfg.routing.router} router "
                             "(decode without --compile)")
        self.model = model
        self.device = model.embed_tokens.weight.device
        self.compile = compile
        self.graphs = compile and self.device.type == "cuda"
        self.skip = "graph" if self.graphs and conditional_nodes_available() else "host"
        if self.graphs and self.skip != "graph":
            log.warning("this torch build has no CUDA graph conditional nodes: routed layers that no row "
                        "chose run anyway (masked) inside the captured step")
        self._fn = static_step
        if compile and not self.graphs:
            compiled = torch.compile(static_step, fullgraph=True, dynamic=False, backend=backend or "inductor")

            def run(*args):
                # each bucket, model and buffer size is one more compiled variant of static_step, and
                # with fullgraph dynamo fails past its recompile limit (8) instead of falling back
                with torch._dynamo.config.patch(recompile_limit=1024):
                    return compiled(*args)

            self._fn = run
        self._caches: dict[int, StaticCache] = {}
        self._graph: dict[int, _Captured] = {}
        self.cache: StaticCache | None = None
        self.thresholds: torch.Tensor | None = None
        self.captures = 0
        """CUDA graphs captured so far (one per bucket, again after a routed buffer grew)."""
        self.compile_s = 0.0
        """Seconds spent in steps that compiled or captured (a new bucket or buffer size)."""
        self.started = 0
        """Batches started so far; `step(started=...)` checks that its batch is still the current one."""
        self._seen: set[tuple] = set()

    def _when(self, capturing: bool) -> Callable:
        if self.graphs:
            return when_graph_node if capturing and self.skip == "graph" else when_always
        if self.compile:
            return when_cond  # traced whole; on a CPU inductor reads the predicate on the host
        return when_host if self.device.type == "cpu" else when_always

    def start(self, cache: KVCache, *, headroom: int | None = None, fraction: float | None = None,
              thresholds: dict[int, torch.Tensor] | None = None) -> StaticCache:
        """Take over a prefilled cache: copy it into the bucket's static cache (made, or grown, as
        needed) and set the causal thresholds of this generation.

        `headroom`: token slots per row beyond what the routed layers hold (default: what the
        expected routed fraction, `fraction` or the capacity, needs for the rest of the context,
        with a margin); the buffers grow between steps if a row routes more.
        """
        cfg = self.model.cfg
        if cache.dial is not None and cache.dial.active:
            raise ValueError("static decode steps decide by thresholds; rows held at a fraction by the `hold` "
                             "rule decode eagerly (fraction_rule='threshold' to decode them statically)")
        B = bucket(cache.batch_size)
        frac = cfg.routing.capacity if fraction is None else fraction
        if headroom is None:
            left = cache.max_seq_len - int(cache.seq_lengths.min())
            headroom = min(left, math.ceil(1.25 * frac * left) + 32)
        self.headroom = max(1, headroom)
        static = self._caches.get(B)
        if static is None or static.max_seq_len < cache.max_seq_len:
            static = StaticCache(cfg, B, cache.max_seq_len, 1, cache.layers[0].k.dtype, self.device)
            self._caches[B] = static
            self._graph.pop(B, None)
        before = [layer.k for layer in static.layers]
        static.load(cache, self.headroom)
        if any(a is not layer.k for a, layer in zip(before, static.layers)):
            self._graph.pop(B, None)  # buffers reallocated: the captured graph reads the old ones
        routed = self.model.routed_layers
        values = [thresholds[layer.layer_id] if thresholds else layer.causal_threshold for layer in routed]
        t = torch.stack([v.reshape(()).float() for v in values]).to(self.device) if routed else None
        if self.thresholds is None or t is None or self.thresholds.shape != t.shape:
            self.thresholds = t
        else:
            self.thresholds.copy_(t)  # in place: a captured graph reads this buffer
        self.cache, self.rows = static, cache.batch_size
        self.started += 1
        return static

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, active: torch.Tensor | None = None, *,
             started: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step of the started batch: tokens (n,), active (n,) bool (default all).
        `started`: the value of `self.started` after this batch's `start` (checked when given).
        Returns logits (n, V) and chosen (R, n), views of the step's outputs (valid until the next step)."""
        static = self.cache
        if static is None:
            raise ValueError("StaticDecoder.step before start(): give it a prefilled cache first")
        if started is not None and started != self.started:
            raise ValueError("this decoder was started on another batch since: one decoder decodes one "
                             "generation at a time")
        n, B = self.rows, static.batch_size
        if static.reserve(self.headroom):
            self._graph.pop(B, None)
        shapes = (B, *(layer.spare for layer in static.layers))
        first = self.compile and (shapes not in self._seen or (self.graphs and B not in self._graph))
        if first:
            self._seen.add(shapes)
            t0 = time.perf_counter()
        if self.graphs:
            g = self._graph.get(B)
            if g is None:
                g = self._graph[B] = _Captured(self, static)
                self.captures += 1
            logits, chosen = g.run(tokens, active, n)
        else:
            tok = tokens.new_zeros(B)
            act = torch.zeros(B, dtype=torch.bool, device=self.device)
            _pad_into(tok, act, tokens, active, n)
            logits, chosen = self._fn(self.model, static, tok, act, self.thresholds, self._when(False))
        static.step_taken()
        if first:
            if self.graphs:
                torch.cuda.synchronize(self.device)
            self.compile_s += time.perf_counter() - t0
        return logits[:n], chosen[:, :n]


def _pad_into(tok: torch.Tensor, act: torch.Tensor, tokens: torch.Tensor, active: torch.Tensor | None, n: int) -> None:
    """Write n rows' tokens and active flags (default all) into the bucket's (B,) buffers, in place;
    the padding rows get token 0 and are never active."""
    tok[:n].copy_(tokens.reshape(-1))
    tok[n:].zero_()
    if active is None:
        act[:n].fill_(True)
    else:
        act[:n].copy_(active)
    act[n:].fill_(False)


class _Captured:
    """One bucket's step captured as a CUDA graph: static input buffers, replayed each step."""

    def __init__(self, decoder: StaticDecoder, static: StaticCache):
        model, dev, B = decoder.model, decoder.device, static.batch_size
        self.tokens = torch.zeros(B, dtype=torch.long, device=dev)
        self.active = torch.zeros(B, dtype=torch.bool, device=dev)  # all inactive: warm-up writes only spare slots

        def run(when):
            return static_step(model, static, self.tokens, self.active, decoder.thresholds, when)

        # warm up on a side stream (cuBLAS handles, lazy inits) with every row inactive: the step
        # then changes nothing but the spare slots, so the cache is as it was
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                run(when_always)
        torch.cuda.current_stream(dev).wait_stream(side)
        if decoder.skip == "graph":
            # the conditional nodes' first use inside a strict capture can fail on lazy setup: one
            # capture in relaxed mode first, thrown away (a capture runs no kernel, so no side effect),
            # as torch does for torch.cond in graphs; if conditional nodes fail here, none are used
            try:
                with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=torch.cuda.Stream(dev),
                                      capture_error_mode="relaxed"):
                    run(when_graph_node)
            except RuntimeError as e:
                log.warning("CUDA graph conditional nodes failed (%s): routed layers that no row chose run "
                            "anyway (masked) inside the captured step", str(e).splitlines()[0])
                decoder.skip = "host"
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, self.chosen = run(decoder._when(True))

    def run(self, tokens, active, n):
        _pad_into(self.tokens, self.active, tokens, active, n)
        self.graph.replay()
        return self.logits, self.chosen
