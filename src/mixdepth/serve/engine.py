"""The serving engine: continuous batching over a fixed pool of KV-cache rows (issue 29).

One thread owns the model and every piece of per-call state: a `KVCache` of `max_batch` rows
(the pool), the waiting queue and the running requests. Other threads only `submit` and `cancel`;
results come back through each request's `on_event` callback, called from the engine thread.
The engine knows nothing of HTTP (`mixdepth.serve.api` maps its exceptions to status codes).

The scheduler follows nano-vllm's: each step is either a prefill or a decode step, and a prefill
step is followed by a decode step whenever rows are decoding (so arrivals never starve them).
- Prefill: waiting requests take free rows, first come first served, up to `max_prefill_tokens`
  prompt tokens per step; they are prefilled in a small cache of their own, and each row is copied
  into the pool (`KVCache.copy_row_from`). The prefill's logits give each request its first token:
  it has joined the running batch. A prompt longer than `chunk_size` is prefilled alone, one chunk
  per step between decode steps, so a long prompt delays the running rows by one chunk at a time.
- Decode: one token for every running row (`mixdepth.generate.decode_one`; rows not in use are
  masked: they write nothing and run no routed block). In a routed layer only the rows whose token
  chose the block run it, which is where a MoD model turns skipped layers into throughput.
- A request that ends (stop token or string, `max_tokens`, context full), is cancelled (its client
  went away) or fails has its row reset (`KVCache.reset_row`) and the row goes back to the pool at
  the next step: the pool never grows or shrinks.

A request carries its own sampling generator (seeded from `seed`), so the same seed gives the same
text whatever else is in the batch, and its own routed fraction (`KVCache.set_fraction`: the
routing layer holds the row at it). A failure inside one request (its prefill, its text, its
callback) fails that request alone; a decode step that raises fails the rows it was running (they
share the step) and the engine goes on.

Dimensions: B pool rows, n requests prefilled together, T prompt tokens, V vocabulary, R routed layers.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..generate import _held_back, decode_one, prefill, sample
from ..model.dial import DEFAULT_RULE, RULES

log = logging.getLogger("mixdepth")


RATE_WINDOW_S = 10.0
"""Seconds over which `Engine.stats()` counts the tokens made for its tokens/s."""


class QueueFull(RuntimeError):
    """`max_waiting` requests wait for a row already (HTTP 429)."""


class EngineStopped(RuntimeError):
    """The engine is shutting down or has stopped: it takes no new request (HTTP 503)."""


@dataclass(kw_only=True)
class SamplingParams:
    """How one request samples and when it ends."""

    max_tokens: int = 16
    """New tokens at most (a stop token counts)."""
    temperature: float = 1.0
    """0 is greedy."""
    top_p: float | None = None
    """Sample from the smallest set of tokens holding this much probability (None or 1: all)."""
    seed: int | None = None
    """Seed of this request's own sampling generator (None: a random one)."""
    stop: list[str] = field(default_factory=list)
    """The request ends once its text contains one of these; the text ends before it."""
    fraction: float | None = None
    """Routed fraction of this request's row (`KVCache.set_fraction`); None: the calibrated threshold."""
    fraction_rule: str | None = None
    """How `fraction` is reached: `hold` (held on any text) or `threshold` (`mixdepth.model.dial`);
    None: the engine's default."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("a stop string is empty")
        if self.fraction is not None and not 0 <= self.fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")
        if self.fraction_rule is not None and self.fraction_rule not in RULES:
            raise ValueError(f"fraction_rule must be one of {', '.join(RULES)}, got {self.fraction_rule!r}")


@dataclass
class Event:
    """What the engine tells a request's owner: new text, then one last event with `finish_reason`
    (`stop`, `length`, `abort`) or `error`."""

    text: str = ""
    """New text, final (never taken back)."""
    token_ids: list[int] = field(default_factory=list)
    """New tokens since the last event (a held-back token shows here before its text does)."""
    routed_layers: list[int] = field(default_factory=list)
    """Per new token: how many routed layers the step that made it ran for this row."""
    finish_reason: str | None = None
    error: str | None = None
    stopped: bool = False
    """The request was ended before it started because the engine is stopping (as `EngineStopped`)."""
    request: Request | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None


_ids = itertools.count()


class Request:
    """One generation: a prompt, its sampling parameters, and what it has produced so far.

    Made by `Engine.submit`; only the engine thread changes it, except `cancel()`.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[Event], None],
                 n_routed: int, device) -> None:
        self.id = next(_ids)
        self.prompt_ids, self.params, self.on_event = prompt_ids, params, on_event
        self.rule = params.fraction_rule  # the engine fills in its default
        self.row: int | None = None
        self.cancelled = False
        self.out_ids: list[int] = []
        self.text = ""
        self.shown = 0  # characters of `text` already sent
        self.sent_tokens = 0  # tokens of `out_ids` already sent
        self.routed_layers: list[int] = []  # per new token (see Event.routed_layers)
        self.routed = [0] * n_routed  # per routed layer: fed tokens (prompt and generated) that entered it
        self.fed = 0
        self.decode_routed = [0] * n_routed  # the same over the generated tokens fed
        self.decode_fed = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.t_done: float | None = None
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()).item())
            self.generator.manual_seed(seed)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def stats(self, routed_layer_ids: Sequence[int]) -> dict:
        """Usage and routing statistics of the request so far."""
        per_layer = {str(lid): n / self.fed if self.fed else 0.0 for lid, n in zip(routed_layer_ids, self.routed)}
        dec = {str(lid): n / self.decode_fed if self.decode_fed else 0.0
               for lid, n in zip(routed_layer_ids, self.decode_routed)}
        R = len(routed_layer_ids)
        end = self.t_done or time.perf_counter()
        gen_s = end - self.t_first if self.t_first else 0.0
        return {
            "prompt_tokens": len(self.prompt_ids),
            "completion_tokens": len(self.out_ids),
            "n_routed_layers": R,
            "routed_fraction": sum(self.routed) / (R * self.fed) if R and self.fed else None,
            "routed_fraction_per_layer": per_layer,
            "decode_routed_fraction": sum(self.decode_routed) / (R * self.decode_fed) if R and self.decode_fed
            else None,
            "decode_routed_fraction_per_layer": dec,
            "fraction": self.params.fraction,
            "fraction_rule": self.rule if self.params.fraction is not None else None,
            "time_to_first_token_s": self.t_first - self.t_submit if self.t_first else None,
            "tokens_per_s": (len(self.out_ids) - 1) / gen_s if gen_s > 0 and len(self.out_ids) > 1 else None,
        }


class Engine:
    """Continuous batching over a pool of `max_batch` cache rows; see the module docstring.

    Args:
        model: a `MoDTransformer` in eval mode (only read).
        tokenizer: `encode`/`decode`, and optionally `stop_ids` (end-of-sequence ids) and `chat_ids`.
        max_batch: rows of the pool, i.e. requests decoded together at most.
        max_waiting: requests allowed to wait for a row (no row free); one more raises `QueueFull`.
        chunk_size: prompt tokens per prefill forward call; a longer prompt is prefilled one chunk per
            step, between decode steps.
        max_prefill_tokens: prompt tokens of short prompts prefilled together in one step at most
            (default: `chunk_size`).
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_waiting: int = 256, chunk_size: int = 512,
                 max_prefill_tokens: int | None = None, fraction_rule: str | None = None) -> None:
        max_prefill_tokens = chunk_size if max_prefill_tokens is None else max_prefill_tokens
        if max_batch < 1 or max_waiting < 0 or chunk_size < 1 or max_prefill_tokens < 1:
            raise ValueError(f"max_batch, chunk_size and max_prefill_tokens must be >= 1 and max_waiting >= 0, got "
                             f"{max_batch}, {chunk_size}, {max_prefill_tokens} and {max_waiting}")
        if not model.can_decode_causally:
            raise ValueError(f"a model with {model.cfg.routing.router} routing cannot decode causally: it cannot "
                             "be served")
        self.model, self.tokenizer = model, tokenizer
        self.cfg = model.cfg
        self.fraction_rule = DEFAULT_RULE if fraction_rule is None else fraction_rule
        if self.fraction_rule not in RULES:
            raise ValueError(f"fraction_rule must be one of {', '.join(RULES)}, got {fraction_rule!r}")
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.chunk_size, self.max_prefill_tokens = chunk_size, max_prefill_tokens
        self.device = model.embed_tokens.weight.device
        self.context = self.cfg.max_seq_len
        self.routed_layer_ids = [layer.layer_id for layer in model.routed_layers]
        self.eos = {int(t) for t in getattr(tokenizer, "stop_ids", ()) if 0 <= int(t) < self.cfg.vocab_size}
        self.cache = model.make_cache(max_batch, max_seq_len=self.context)  # the pool
        # free rows as a min-heap: a new request takes the lowest, so the busy rows stay the pool's
        # first ones and a decode step runs over that prefix only (`KVCache.prefix`)
        self.free_rows: list[int] = list(range(max_batch))
        self.running: dict[int, Request] = {}  # row -> request
        self.waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._long: tuple | None = None  # (request, its cache, tokens prefilled, routing masks) of a long prompt
        self._last_prefill = False
        # statistics, read by other threads through `stats()`
        self._generated = 0
        self._prompt_tokens = 0
        self._finished: dict[str, int] = {}
        self._decode_fed = 0
        self._decode_routed = [0] * len(self.routed_layer_ids)
        self._recent: deque[float] = deque()  # when each token of the last RATE_WINDOW_S seconds was made
        self._kv = (0, 0, 0)  # in use, allocated, dense
        self.steps = 0

    # ---- other threads ------------------------------------------------------------------------
    def start(self) -> Engine:
        """Run the step loop in a thread of its own (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mixdepth-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- text, for the API layer (which never sees the tokenizer) -------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt text."""
        if not text:
            raise ValueError("the prompt is empty")
        return list(self.tokenizer.encode(text))

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation rendered by the checkpoint's chat template, ending with the
        assistant's generation prompt. Raises ValueError if the tokenizer has no chat template."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            kind = getattr(self.tokenizer, "kind", type(self.tokenizer).__name__)
            raise ValueError(f"this checkpoint's {kind} tokenizer has no chat template: use /v1/completions")
        return list(self.tokenizer.chat_ids(messages))

    def check_prompt(self, prompt_ids: Sequence[int], max_tokens: int) -> None:
        """Raise ValueError if the prompt is empty, holds ids outside the vocabulary, or leaves no room
        for `max_tokens` new tokens in the context."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (vocab_size {self.cfg.vocab_size})")
        if len(prompt_ids) + max_tokens > self.context:
            raise ValueError(f"this model's maximum context length is {self.context} tokens; the request asks for "
                             f"{len(prompt_ids) + max_tokens} ({len(prompt_ids)} in the prompt, {max_tokens} in "
                             "the completion): reduce the prompt or max_tokens")

    def _dial(self, params: SamplingParams) -> tuple[float | None, str]:
        """(fraction, rule) of a request's row, checked against this model (a rule of `threshold`
        needs a calibrated model)."""
        rule = params.fraction_rule or self.fraction_rule
        if params.fraction is not None and rule == "threshold" and params.fraction not in (0, 1) \
                and not self.model.calibrated:
            raise ValueError("this model's routers were never calibrated: a fraction needs the hold rule "
                             "(\"fraction_rule\": \"hold\")")
        return params.fraction, rule

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               on_event: Callable[[Event], None]) -> Request:
        """Queue a request; `on_event` is then called from the engine thread with each `Event`.

        Raises:
            ValueError: a bad prompt or parameters (`check_prompt`).
            QueueFull: `max_waiting` requests wait for a row already.
            EngineStopped: the engine is shutting down.
        """
        prompt_ids = [int(t) for t in prompt_ids]
        self.check_prompt(prompt_ids, params.max_tokens)
        _, rule = self._dial(params)  # a fraction this model cannot reach by its rule fails here, not in the engine
        req = Request(prompt_ids, params, on_event, len(self.routed_layer_ids), self.device)
        req.rule = rule
        with self._cond:
            if not self._accepting or self._stop:
                raise EngineStopped("the server is shutting down")
            # the queue also holds requests that free rows take at the next step: they wait for no row
            queued = len(self.waiting) - len(self.free_rows)
            if queued >= self.max_waiting:
                raise QueueFull(f"{queued} requests are waiting for a row already (--max-waiting "
                                f"{self.max_waiting}): try again later")
            self.waiting.append(req)
            self._cond.notify()
        return req

    def cancel(self, req: Request) -> None:
        """End a request (its client went away): its row is freed at the next step."""
        with self._cond:
            req.cancelled = True
            self._cond.notify()

    def stats(self) -> dict:
        """A snapshot for metrics: queue sizes, token counters, tokens/s, routed fractions, KV bytes."""
        with self._cond:
            now = time.perf_counter()
            self._forget_old_tokens(now)
            span = now - self._recent[0] if self._recent else 0.0
            made = len(self._recent)
            routed = {lid: n / self._decode_fed if self._decode_fed else 0.0
                      for lid, n in zip(self.routed_layer_ids, self._decode_routed)}
            return {
                "running": len(self.running), "waiting": len(self.waiting), "max_batch": self.max_batch,
                "generated_tokens": self._generated, "prompt_tokens": self._prompt_tokens,
                "finished": dict(self._finished), "tokens_per_s": made / max(span, 1.0) if made else 0.0,
                "decode_routed_fraction": routed, "kv_bytes_in_use": self._kv[0], "kv_bytes_allocated": self._kv[1],
                "kv_bytes_dense": self._kv[2], "steps": self.steps, "accepting": self._accepting and not self._stop,
            }

    def _forget_old_tokens(self, now: float) -> None:
        """Drop the token times older than RATE_WINDOW_S (under the lock): the record stays bounded
        whether or not anyone reads `stats()`."""
        while self._recent and now - self._recent[0] > RATE_WINDOW_S:
            self._recent.popleft()

    def begin_shutdown(self) -> None:
        """Take no new request and end the waiting ones (`error`); running ones go on."""
        with self._cond:
            self._accepting = False
            waiting, self.waiting = list(self.waiting), deque()
            self._cond.notify()
        for req in waiting:
            self._end(req, error="the server is shutting down", stopped=True)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop: no new request, running ones may finish for `timeout` seconds, then the rest end
        (`abort`) and the thread exits."""
        self.begin_shutdown()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.running and self.alive and time.monotonic() < deadline:
                self._cond.wait(0.05)
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, deadline - time.monotonic() + 1.0))
        if not self.alive:  # the thread is gone (or never ran): end what is left here
            for row in list(self.running):
                self._release(row, finish_reason="abort")

    # ---- the engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self.waiting and not self.running:
                    self._cond.wait()
                if self._stop:
                    break
            try:
                self.step()
            except Exception as e:  # a failure the step did not handle itself: keep serving
                log.exception("engine step failed")
                self._fail_running(f"engine step failed: {type(e).__name__}: {e}")
        for row in list(self.running):
            self._release(row, finish_reason="abort")
        with self._cond:
            self._cond.notify_all()

    def _fail_running(self, error: str) -> None:
        """End every running request with `error`: after a step that failed where it did not expect
        to, what their rows hold is unknown, and a request left running would never end."""
        self._long = None
        for row in list(self.running):
            self._release(row, error=error)
        self._publish()

    def step(self) -> bool:
        """One scheduling step; returns whether it ran the model.

        First the rows of cancelled requests are freed. Then, after a prefill step, a decode step if
        rows are decoding (so a stream of new requests never starves the running ones); else the next
        chunk of a long prompt being prefilled; else a prefill of waiting requests if a row is free;
        else a decode step.
        """
        with self._cond:
            gone = [r for r in self.waiting if r.cancelled]
            for r in gone:
                self.waiting.remove(r)
        for r in gone:
            self._end(r, finish_reason="abort")
        for row, r in list(self.running.items()):
            if r.cancelled:
                self._release(row, finish_reason="abort")
        if self._long is not None and self._long[0].row is None:  # its request ended while prefilling
            self._long = None
        decoding = any(r.out_ids for r in self.running.values())
        action = None
        if self._last_prefill and decoding:
            action = "decode"
        elif self._long is not None:
            action = "long"
        else:
            admit, long = self._admit()
            if long is not None:
                self._start_long(long)
                action = "long"
            elif admit:
                action = "prefill"
            elif decoding:
                action = "decode"
        if action == "decode":
            self._decode()
        elif action == "long":
            self._prefill_long_chunk()
        elif action == "prefill":
            self._prefill(admit)
        self._last_prefill = action in ("long", "prefill")
        self.steps += action is not None
        self._publish()
        return action is not None

    def _admit(self) -> tuple[list[Request], Request | None]:
        """Waiting requests that take a row now, first come first served: prompts of up to `chunk_size`
        tokens together, up to `max_prefill_tokens` in all; or one longer prompt alone, prefilled one
        chunk per step (`_prefill_long_chunk`), so that decoding rows never wait for more than a chunk."""
        admit: list[Request] = []
        with self._cond:
            budget = self.max_prefill_tokens
            while self.waiting and len(admit) < len(self.free_rows):
                n = len(self.waiting[0].prompt_ids)
                if n > self.chunk_size:
                    return admit, (None if admit else self.waiting.popleft())
                if admit and n > budget:
                    break
                admit.append(self.waiting.popleft())
                budget -= n
        return admit, None

    def _start_long(self, r: Request) -> None:
        r.row = heapq.heappop(self.free_rows)
        self.running[r.row] = r
        small = self.model.make_cache(1, max_seq_len=len(r.prompt_ids))
        small.set_fraction(0, *self._dial(r.params))
        self._long = (r, small, 0, [])

    def _prefill_long_chunk(self) -> None:
        """The next chunk of the long prompt being prefilled; after its last, its row joins the batch."""
        r, small, s, masks = self._long
        n = len(r.prompt_ids)
        try:
            part = torch.tensor([r.prompt_ids[s : s + self.chunk_size]], device=self.device)  # (1, Tc)
            logits, m = prefill(self.model, small, part)  # continues what the small cache holds
            masks.append(torch.stack([m[lid][0].cpu() for lid in self.routed_layer_ids]) if self.routed_layer_ids
                         else torch.zeros(0, part.shape[1], dtype=torch.bool))  # (R, Tc)
            s += part.shape[1]
            if s < n:
                self._long = (r, small, s, masks)
                return
            self._long = None
            chosen = torch.cat(masks, dim=1)  # (R, T)
            self.cache.reset_row(r.row)
            self.cache.copy_row_from(small, 0, r.row)
            tok = self._sample(logits, [r])[0]
        except Exception as e:
            self._long = None
            log.warning("request %d failed in prefill: %s", r.id, e)
            if r.row is not None:
                self._release(r.row, error=f"prefill failed: {e}")
            return
        self._joined(r, tok, chosen)

    def _prefill(self, reqs: list[Request]) -> None:
        for r in reqs:
            r.row = heapq.heappop(self.free_rows)
            self.running[r.row] = r
        try:
            self._prefill_batch(reqs)
        except Exception as e:
            if len(reqs) == 1:
                log.warning("request %d failed in prefill: %s", reqs[0].id, e)
                self._release(reqs[0].row, error=f"prefill failed: {e}")
                return
            for r in reqs:  # find the request that failed: each alone
                if r.row in self.running and not r.out_ids:
                    self.cache.reset_row(r.row)
                    try:
                        self._prefill_batch([r])
                    except Exception as e1:
                        log.warning("request %d failed in prefill: %s", r.id, e1)
                        self._release(r.row, error=f"prefill failed: {e1}")

    def _prefill_batch(self, reqs: list[Request]) -> None:
        n = len(reqs)
        lens = [len(r.prompt_ids) for r in reqs]
        tokens = torch.zeros(n, max(lens), dtype=torch.long)  # (n, T) right-padded
        for i, r in enumerate(reqs):
            tokens[i, : lens[i]] = torch.tensor(r.prompt_ids)
        small = self.model.make_cache(n, max_seq_len=max(lens))
        for i, r in enumerate(reqs):
            small.set_fraction(i, *self._dial(r.params))
        logits, masks = prefill(self.model, small, tokens.to(self.device), lens, self.chunk_size)  # (n, V)
        # (R, n, T) host: which prompt tokens entered each routed layer
        chosen = torch.stack([masks[lid].cpu() for lid in self.routed_layer_ids]) if self.routed_layer_ids \
            else torch.zeros(0, n, max(lens), dtype=torch.bool)
        for i, r in enumerate(reqs):
            self.cache.reset_row(r.row)
            self.cache.copy_row_from(small, i, r.row)
        toks = self._sample(logits, reqs)
        for i, r in enumerate(reqs):
            self._joined(r, toks[i], chosen[:, i, : lens[i]])

    def _joined(self, r: Request, tok: int, chosen: torch.Tensor) -> None:
        """A prefilled request's first token; `chosen` (R, T) host: which prompt tokens entered each routed layer."""
        T = len(r.prompt_ids)
        r.fed += T
        r.routed = [a + b for a, b in zip(r.routed, chosen.sum(1).tolist())]
        r.t_first = time.perf_counter()
        with self._cond:
            self._prompt_tokens += T
        self._accept(r, tok, int(chosen[:, T - 1].sum()))

    def _decode(self) -> None:
        rows = sorted(b for b, r in self.running.items() if r.out_ids)  # not a long prompt still prefilling
        reqs = [self.running[b] for b in rows]
        n = rows[-1] + 1  # the step runs over the pool's first n rows; idle rows among them are padding
        feed = torch.zeros(n, dtype=torch.long)  # (n,)
        active = torch.zeros(n, dtype=torch.bool)  # (n,) host
        for b, r in zip(rows, reqs):
            feed[b] = r.out_ids[-1]
            active[b] = True
        cache = self.cache.prefix(n) if n < self.max_batch else self.cache
        failed = None
        try:
            logits, masks = decode_one(self.model, cache, feed.to(self.device), active)  # (n, V)
        except Exception as e:
            log.exception("decode step failed")
            failed = e
        if cache is not self.cache:
            self.cache.merge_prefix(cache)
        if failed is not None:  # the rows shared the step: they fail together
            for b in rows:
                self._release(b, error=f"decode step failed: {failed}")
            return
        chosen = torch.stack([masks[lid] for lid in self.routed_layer_ids]).cpu() if self.routed_layer_ids \
            else torch.zeros(0, n, dtype=torch.bool)  # (R, n)
        toks = self._sample(logits[rows], reqs)
        counts = chosen[:, rows].sum(0).tolist()  # (n,) routed layers each row's token went through
        per_layer = chosen[:, rows].sum(1).tolist()  # (R,)
        with self._cond:
            self._decode_fed += len(rows)
            self._decode_routed = [a + b for a, b in zip(self._decode_routed, per_layer)]
        for j, (b, r) in enumerate(zip(rows, reqs)):
            col = chosen[:, b].tolist()
            r.fed += 1
            r.decode_fed += 1
            r.routed = [a + int(c) for a, c in zip(r.routed, col)]
            r.decode_routed = [a + int(c) for a, c in zip(r.decode_routed, col)]
            self._accept(r, toks[j], counts[j])

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        """Next token of each request from (n, V) logits: greedy rows together, the others each with
        its own generator (so a request's draws do not depend on its neighbours)."""
        out = logits.argmax(dim=-1).tolist()
        for i, r in enumerate(reqs):
            if r.params.temperature > 0:
                out[i] = int(sample(logits[i : i + 1], temperature=r.params.temperature, top_p=r.params.top_p,
                                    generator=r.generator)[0])
        return out

    def _accept(self, r: Request, tok: int, routed_layers: int) -> None:
        """Take a request's new token: text, stop checks, event; ends the request if it is done."""
        if r.done or r.row is None:
            return
        try:
            r.out_ids.append(tok)
            r.routed_layers.append(routed_layers)
            with self._cond:
                self._generated += 1
                now = time.perf_counter()
                self._recent.append(now)
                self._forget_old_tokens(now)
            reason = None
            if tok in self.eos:  # an end-of-sequence token ends the request and is not shown
                reason = "stop"
            else:
                text = self.tokenizer.decode([t for t in r.out_ids if t not in self.eos])
                cut = min((text.find(s) for s in r.params.stop if s in text), default=-1)
                if cut >= 0:
                    text, reason = text[:cut], "stop"
                r.text = text
            if reason is None and len(r.out_ids) >= r.params.max_tokens:
                reason = "length"
            if reason is None and len(r.prompt_ids) + len(r.out_ids) >= self.context:
                reason = "length"
            upto = len(r.text) if reason else len(r.text) - _held_back(r.text, r.params.stop)
            if reason is not None:
                self._release(r.row, finish_reason=reason)
            elif upto > r.shown:
                ev = Event(text=r.text[r.shown : upto], token_ids=r.out_ids[r.sent_tokens :],
                           routed_layers=r.routed_layers[r.sent_tokens :], request=r)
                r.shown, r.sent_tokens = upto, len(r.out_ids)
                self._emit(r, ev)
        except Exception as e:
            log.warning("request %d failed: %s", r.id, e)
            if r.row is not None:
                self._release(r.row, error=f"{type(e).__name__}: {e}")

    def _emit(self, r: Request, ev: Event) -> None:
        try:
            r.on_event(ev)
        except Exception as e:  # the owner cannot take it (e.g. its event loop is gone): drop the request
            log.warning("request %d dropped, its callback failed: %s", r.id, e)
            r.cancelled = True

    def _release(self, row: int, *, finish_reason: str | None = None, error: str | None = None) -> None:
        """End the request on `row` and give the row back to the pool, emptied."""
        r = self.running.pop(row)
        self.cache.reset_row(row)
        heapq.heappush(self.free_rows, row)
        r.row = None
        self._end(r, finish_reason=finish_reason, error=error)

    def _end(self, r: Request, *, finish_reason: str | None = None, error: str | None = None,
             stopped: bool = False) -> None:
        if r.done:
            return
        r.t_done = time.perf_counter()
        text = r.text[r.shown :] if error is None else ""
        r.finish_reason, r.error = (finish_reason if error is None else None), error
        with self._cond:
            key = error and "error" or finish_reason
            self._finished[key] = self._finished.get(key, 0) + 1
            self._cond.notify_all()
        ev = Event(text=text, token_ids=r.out_ids[r.sent_tokens :], routed_layers=r.routed_layers[r.sent_tokens :],
                   finish_reason=r.finish_reason, error=error, stopped=stopped, request=r)
        r.shown, r.sent_tokens = len(r.text), len(r.out_ids)
        self._emit(r, ev)

    def _publish(self) -> None:
        c = self.cache
        kv = (c.bytes_in_use(), c.bytes_allocated(), c.dense_bytes())
        with self._cond:
            self._kv = kv
            self._cond.notify_all()
