"""Sampling from a Mixture-of-Depths model with the KV cache (issue 4).

At sampling time a routed layer cannot use top-k over the sequence (it reads future tokens), so
each token decides alone with the model's causal rule (predictor or router-logit threshold, paper
section 3.5). A token that skips a routed layer costs only the router's dot product there and
stores no keys or values (`mixdepth.kvcache`).

The pieces, gpt-fast style:
- `prefill(model, cache, tokens, valid_lengths, chunk_size)`: run right-padded prompts through
  the cache, in chunks so a long prompt never builds a T x T attention matrix at once;
- `decode_one(model, cache, token, active)`: one token per row; finished rows are masked out
  (they write nothing and run no routed block);
- `sample(logits, ...)`: greedy, temperature, top-k, top-p with `torch.where` masking and the
  exponential-race sampler (argmax of p / Exp(1), sync-free) driven by an explicit generator;
- `generate(model, prompts, ...)`: a stream of new token ids per step; its `result` holds the
  statistics (tokens/s, routed fraction per layer, work skipped, KV bytes against a dense model,
  routing decisions per token for routing maps);
- `generate_text(model, tokenizer, prompts, ...)` on top; the CLI is `mixdepth.commands.generate`.

With `compile` (or a `decoder`), decoding runs static-shape steps instead of `decode_one`
(`mixdepth.static`: no host sync inside a step, a CUDA graph per batch bucket on a GPU); prefill
is the same.

Generation state is per call: each generation makes its own KV cache (`model.make_cache`) and,
for a routed fraction other than the calibrated one, its own thresholds
(`model.causal_thresholds`); the model is only read, so one model can serve several generations
at once (from several threads).

Dimensions: B batch, T tokens, V vocabulary, R routed layers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .kvcache import KVCache, StaticCache
from .model.dial import DEFAULT_RULE, RULES
from .static import StaticDecoder

log = logging.getLogger("mixdepth")

FINISHED = -1
"""Token id yielded for a row that has already stopped."""


# ---- the model steps ----------------------------------------------------------------------------
@torch.no_grad()
def prefill(
    model,
    cache,
    tokens: torch.Tensor,
    valid_lengths: torch.Tensor | Sequence[int] | None = None,
    chunk_size: int | None = None,
    *,
    thresholds: dict[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run right-padded prompts through a KV cache in causal routing mode.

    Args:
        model: a `MoDTransformer`.
        cache: its KV cache (`model.make_cache(...)`); the prompts continue what it holds.
        tokens: (B, T) token ids; row b holds `valid_lengths[b]` real tokens, then padding.
        valid_lengths: (B,) real tokens per row (default: all T).
        chunk_size: tokens per forward call (default: all at once). Chunking bounds the attention
            matrix and activations for long prompts; the result does not depend on it.
        thresholds: per-call causal thresholds (`model.causal_thresholds(fraction)`).

    Returns:
        logits (B, V) at each row's last real token, and per routed layer a (B, T) bool mask of
        the tokens that entered its block (False at padding).
    """
    B, T = tokens.shape
    valid = torch.full((B,), T, dtype=torch.long) if valid_lengths is None else _host_long(valid_lengths)
    if valid.shape != (B,) or int(valid.min()) < 1 or int(valid.max()) > T:
        raise ValueError(f"valid_lengths must hold {B} values in [1, {T}], got {valid.tolist()}")
    chunk = T if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    logits = None
    masks: dict[int, list[torch.Tensor]] = {}
    for s in range(0, T, chunk):
        part = tokens[:, s : s + chunk]  # (B, Tc)
        n = (valid - s).clamp(0, part.shape[1])  # (B,) real tokens of each row in this chunk
        out = model(part, mode="causal", cache=cache, thresholds=thresholds, valid_lengths=n, last_only=True,
                    return_routing=True)
        last = out.logits[:, 0]  # (B, V)
        # each row keeps the logits of the chunk that holds its last real token
        ends = ((n > 0) & (s + n == valid)).to(last.device)[:, None]  # (B, 1)
        logits = last if logits is None else torch.where(ends, last, logits)
        for lid, m in out.routing.items():
            masks.setdefault(lid, []).append(m)
    return logits, {lid: torch.cat(ms, dim=1) for lid, ms in masks.items()}


@torch.no_grad()
def decode_one(
    model,
    cache,
    token: torch.Tensor,
    active: torch.Tensor | None = None,
    *,
    thresholds: dict[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One decoding step: feed one token per row, each at its own next position in the cache.

    Args:
        model: a `MoDTransformer`.
        cache: its KV cache; row b continues at the `cache.seq_lengths[b]` tokens it holds.
        token: (B,) or (B, 1) token ids.
        active: (B,) host bool; inactive rows (finished) write no cache entry and run no routed
            block. Default: all rows active.
        thresholds: per-call causal thresholds (`model.causal_thresholds(fraction)`).

    Returns:
        logits (B, V) for the next token, and per routed layer a (B,) bool of the rows whose token
        entered its block.
    """
    token = token.reshape(-1, 1)  # (B, 1)
    valid = None
    if active is not None and not bool(active.all()):
        valid = active.to(torch.long).cpu()
    out = model(token, mode="causal", cache=cache, thresholds=thresholds, valid_lengths=valid, last_only=True,
                return_routing=True)
    return out.logits[:, 0], {lid: m[:, 0] for lid, m in out.routing.items()}


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token of each row from (B, V) logits. Returns (B,) long.

    `temperature` 0 is greedy (argmax). Otherwise logits are divided by the temperature, the
    tokens outside the `top_k` highest and outside the smallest set holding `top_p` of the
    probability (the nucleus) are masked, and a token is drawn with the exponential race
    argmax(p / Exp(1)), which samples exactly from p without a host sync.
    """
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature  # (B, V)
    neg_inf = torch.tensor(float("-inf"), device=logits.device)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = torch.where(logits < kth, neg_inf, logits)
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        p = sorted_logits.softmax(dim=-1)
        # drop a token once the more likely ones already hold top_p of the mass: the first stays
        drop_sorted = p.cumsum(dim=-1) - p >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = torch.where(drop, neg_inf, logits)
    probs = logits.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1, generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(dim=-1)


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _host_long(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.long).cpu()


# ---- the routed fraction ------------------------------------------------------------------------
def is_uncalibrated(model) -> bool:
    """Whether some routed layer has no calibration table (e.g. a freshly converted model): its
    tokens all enter the block unless a fraction is held by the `hold` rule (`MoDBlock.reset_calibration`)."""
    return not model.calibrated


def fraction_thresholds(model, fraction: float | None, rule: str | None) -> tuple[dict | None, bool]:
    """How a generation reaches an asked routed fraction: (per-call thresholds or None, hold).

    `rule` `hold` (default: `dial.DEFAULT_RULE`) keeps each row at `fraction` with the causal rule of
    `mixdepth.model.dial` (no calibration needed); `threshold` takes the calibration table's
    threshold for it. No fraction: the calibrated thresholds (every token, uncalibrated).
    """
    rule = DEFAULT_RULE if rule is None else rule
    if rule not in RULES:
        raise ValueError(f"fraction_rule must be one of {RULES}, got {rule!r}")
    if fraction is None:
        return None, False
    if not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if rule == "hold" and model.routed_layers:
        return None, True
    if fraction not in (0, 1) and is_uncalibrated(model):
        raise ValueError("cannot set the routed fraction by threshold: the model was never calibrated "
                         "(run model.calibrate_causal on held-out text and save the checkpoint, or hold the "
                         "fraction with fraction_rule='hold')")
    return model.causal_thresholds(fraction), False


# ---- the generation loop ------------------------------------------------------------------------
@dataclass
class GenerationResult:
    """What a generation produced and what it cost."""

    tokens: list[list[int]]
    """New tokens per row (a stop token or sequence that ended a row is included)."""
    prompt_lengths: list[int]
    finish_reasons: list[str]
    """Per row: `stop` (stop token/sequence or `Generation.finish_row`), `length` (max_new_tokens)
    or `context` (the model's context is full)."""
    routed_layers: list[int]
    """Ids of the routed layers, the order of the rows of `routing`."""
    routing: list[torch.Tensor] = field(default_factory=list)
    """Per batch row, (R, n) bool: which of the n tokens fed to the model (prompt, then generated
    tokens; the last generated token is never fed) entered each routed layer's block."""
    routed_fraction: dict[int, float] = field(default_factory=dict)
    """Routed layer id -> fraction of all fed tokens (prompt and generated) that entered it."""
    decode_routed_fraction: dict[int, float] = field(default_factory=dict)
    """Routed layer id -> the same fraction over the decoding steps only."""
    skipped_fraction: float = 0.0
    """Fraction of routed-layer work skipped: 1 - (tokens that entered routed blocks) / (tokens x
    routed layers); 0 for a model with no routed layer."""
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    """Seconds to the first new token (with `compile`, the copy of the cache into the decoder too)."""
    decode_s: float = 0.0
    """Seconds of decode steps, without `compile_s`."""
    compile_s: float = 0.0
    """Seconds of the static decode steps that compiled or captured a CUDA graph (`compile`)."""
    compile_tokens: int = 0
    """Tokens those steps made: left out of `decode_tokens_per_s`, as their time is of `decode_s`."""
    decode_steps: int = 0
    kv_bytes_in_use: int = 0
    kv_bytes_allocated: int = 0
    kv_bytes_dense: int = 0
    """KV bytes a dense model of the same size would hold for the same tokens."""
    cache: KVCache | StaticCache | None = field(default=None, repr=False)
    """The generation's KV cache as the generation left it, for inspection (with static steps the
    decoder's `StaticCache`, batch padded to its bucket)."""

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of model time (prefill + decode), all rows together (compiling steps apart)."""
        t = self.prefill_s + self.decode_s
        return (self.new_tokens - self.compile_tokens) / t if t > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens made by decode steps per second of decoding (the first token comes from prefill)."""
        n = self.new_tokens - len(self.tokens) - self.compile_tokens
        return n / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def kv_ratio(self) -> float:
        """KV bytes in use relative to a dense model of the same size."""
        return self.kv_bytes_in_use / self.kv_bytes_dense if self.kv_bytes_dense else float("nan")


class Generation:
    """The stream returned by `generate`: iterate it for (B,) token ids per step.

    Rows that have already stopped show `FINISHED` (-1). When the stream ends, `result` holds the
    `GenerationResult` (it is also the `StopIteration.value`, as for a generator's return).
    `finish_row(b)` stops row b before the next step (e.g. on a stop string matched in text).
    """

    def __init__(self, run: Callable[[Generation], Iterator[torch.Tensor]]) -> None:
        self.result: GenerationResult | None = None
        self.cache: KVCache | None = None  # made at the first step
        self._finish: set[int] = set()
        self._gen = run(self)

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> torch.Tensor:
        try:
            return next(self._gen)
        except StopIteration as e:
            self.result = e.value if e.value is not None else self.result
            raise

    def finish_row(self, row: int) -> None:
        self._finish.add(int(row))

    def close(self) -> None:
        self._gen.close()

    def run(self) -> GenerationResult:
        """Consume the stream and return the result."""
        for _ in self:
            pass
        return self.result


def _normalize_stop(stop, vocab_size: int) -> list[tuple[int, ...]]:
    seqs = []
    for s in stop or ():
        seq = (int(s),) if isinstance(s, int) or (torch.is_tensor(s) and s.dim() == 0) else tuple(int(t) for t in s)
        if not seq:
            raise ValueError("a stop sequence is empty")
        bad = [t for t in seq if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"stop token id {bad[0]} out of range for vocab_size {vocab_size}")
        seqs.append(seq)
    return seqs


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stop: Sequence[int | Sequence[int]] | None = None,
    fraction: float | None = None,
    fraction_rule: str | None = None,
    chunk_size: int | None = 512,
    compile: bool = False,
    decoder=None,
) -> Generation:
    """Generate continuations of a batch of prompts with the KV cache, streaming token ids.

    Prompts of different lengths run as one batch (right padding, each row at its own positions).
    A row stops at a stop token or sequence, after `max_new_tokens`, or when the model's context
    is full; decoding ends when every row has stopped. Inputs are checked here, before the first
    step, so a bad prompt fails at the call.

    Args:
        model: a `MoDTransformer` whose routers can decide causally (not random routing). It is
            only read: the KV cache is made for this call (`Generation.cache`, `result.cache`).
        prompts: token id lists, one per batch row, each non-empty and shorter than the context;
            prompt + new tokens never exceed the context (a row that fills it stops: `context`).
        max_new_tokens: new tokens per row at most.
        temperature, top_k, top_p: sampling settings (see `sample`); temperature 0 is greedy.
        seed: seeds a new `torch.Generator` on the model's device (ignored if `generator` given).
        generator: the random source of sampling.
        stop: stop token ids, or sequences of ids; a row ends when its new tokens end with one.
        fraction: routed fraction of tokens at generation time, for this generation only (the
            model's calibrated thresholds are never changed); None: the calibrated thresholds (every
            token enters every block in a model never calibrated).
        fraction_rule: how `fraction` is reached (`fraction_thresholds`): `hold` keeps each row's
            routed fraction at it on any text (`mixdepth.model.dial`), `threshold` takes the
            calibration table's threshold for it (what routes `fraction` of the calibration text).
        chunk_size: prompt tokens per prefill forward call (None: all at once).
        compile: decode with static-shape steps (`mixdepth.static`), captured as CUDA graphs on a
            GPU or compiled on a CPU; the tokens and routing are those of the eager steps, the logits
            equal within float tolerance.
        decoder: a `StaticDecoder` of this model to decode with (kept across calls, it keeps its
            buffers and captured graphs); implies static steps.

    Returns:
        A `Generation`: iterate it for (B,) token ids per step; then `.result`.
    """
    cfg = model.cfg
    if not model.can_decode_causally:
        raise ValueError(
            f"a model with {cfg.routing.router} routing cannot decode causally (it has no per-token "
            "decision rule); generation needs expert_choice or token_choice routing, or a dense model"
        )
    if isinstance(prompts, (str, bytes)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token id lists")
    prompts = [list(map(int, p)) for p in prompts]
    ctx = cfg.max_seq_len
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if len(p) >= ctx:
            window = " (the source model's sliding window)" if cfg.sliding_window else ""
            raise ValueError(f"prompt {i} has {len(p)} tokens, which leaves no room for new tokens in the model's "
                             f"context of {ctx}{window}")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]}, outside the vocabulary (vocab_size {cfg.vocab_size})")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
    _check_sampling(temperature, top_k, top_p)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    stops = _normalize_stop(stop, cfg.vocab_size)
    thresholds, hold = fraction_thresholds(model, fraction, fraction_rule)
    if hold and (compile or decoder is not None):
        raise ValueError("static decode steps (compile) decide by thresholds: pass fraction_rule='threshold' "
                         "with a fraction, or decode eagerly")
    if decoder is None and compile:
        decoder = StaticDecoder(model, compile=True)
    if decoder is not None and decoder.model is not model:
        raise ValueError("the decoder was made for another model")
    device = model.embed_tokens.weight.device
    if generator is None and temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))

    def run(stream: Generation) -> Iterator[torch.Tensor]:
        stream.result = yield from _loop(model, prompts, stream, max_new_tokens, stops, fraction, thresholds, hold,
                                         chunk_size, dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                                          generator=generator), decoder)
        return stream.result

    return Generation(run)


def _loop(model, prompts, stream, max_new_tokens, stops, fraction, thresholds, hold, chunk_size, sampling, decoder):
    cfg = model.cfg
    device = model.embed_tokens.weight.device
    B = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)  # (B,) host
    # prompt + new tokens fit the context. A finished row still takes part in each decode call as
    # padding at its next slot (it writes nothing there: its valid length is 0), so the cache
    # and the RoPE table need room for slot n + m - 1 although the last new token is never fed
    limits = [min(max_new_tokens, cfg.max_seq_len - n) for n in lens.tolist()]
    cache_len = max(n + m for n, m in zip(lens.tolist(), limits))
    cache = stream.cache = model.make_cache(B, max_seq_len=cache_len, routed_fraction=fraction)
    if hold:
        cache.set_fraction(None, fraction, "hold")
    T = int(lens.max())
    tokens = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p)
    routed = [layer.layer_id for layer in model.routed_layers]

    t0 = time.perf_counter()
    logits, prefill_masks = prefill(model, cache, tokens.to(device), lens, chunk_size, thresholds=thresholds)
    nxt = sample(logits, **sampling)  # (B,)
    if decoder is not None:  # static steps from here: the prefilled cache is copied into the decoder's
        cache = stream.cache = decoder.start(cache, fraction=fraction, thresholds=thresholds)
        started = decoder.started
    ids = nxt.tolist()  # host sync: the timing below is honest on GPU too
    prefill_s = time.perf_counter() - t0
    pm = torch.stack([prefill_masks[i].cpu() for i in routed]) if routed else torch.zeros(0, B, T, dtype=torch.bool)

    out: list[list[int]] = [[] for _ in range(B)]
    reasons = [""] * B
    active = torch.ones(B, dtype=torch.bool)  # host
    step_masks: list[torch.Tensor] = []  # each (R, B) on the device: decisions of the step's fed tokens
    step_active: list[torch.Tensor] = []  # each (B,): which rows fed a token at that step
    decode_s, compile_s, compile_tokens, steps = 0.0, 0.0, 0, 0
    while True:
        emitted = torch.full((B,), FINISHED, dtype=torch.long)
        for b in active.nonzero().flatten().tolist():
            out[b].append(ids[b])
            emitted[b] = ids[b]
            if any(len(out[b]) >= len(s) and tuple(out[b][-len(s):]) == s for s in stops):
                reasons[b] = "stop"
            elif len(out[b]) >= limits[b]:
                reasons[b] = "length" if limits[b] == max_new_tokens else "context"
            if reasons[b]:
                active[b] = False
        yield emitted
        for b in stream._finish:
            if 0 <= b < B and active[b]:
                active[b], reasons[b] = False, "stop"
        if not active.any():
            break
        t0 = time.perf_counter()
        c0 = decoder.compile_s if decoder is not None else 0.0
        feed = torch.tensor([i if a else 0 for i, a in zip(ids, active.tolist())], device=device)
        if decoder is not None:
            logits, chosen = decoder.step(feed, active.to(device), started=started)
            chosen = chosen.clone()  # the step's output buffer is reused by the next step
        else:
            logits, masks = decode_one(model, cache, feed, active.clone(), thresholds=thresholds)
            chosen = torch.stack([masks[i] for i in routed]) if routed else torch.zeros(0, B, dtype=torch.bool)
        nxt = sample(logits, **sampling)
        ids = nxt.tolist()  # the step's one host sync: stop tokens are checked on the host
        if decoder is not None and decoder.compile_s > c0:  # this step compiled: its time and tokens apart
            compile_s += time.perf_counter() - t0
            compile_tokens += int(active.sum())
        else:
            decode_s += time.perf_counter() - t0
        steps += 1
        step_active.append(active.clone())
        step_masks.append(chosen)
    step_masks = list(torch.stack(step_masks).cpu()) if step_masks else []

    # per-row routing maps: prompt decisions, then the decisions of each fed generated token
    R = len(routed)
    routing = []
    for b in range(B):
        cols = [m[:, b : b + 1] for m, a in zip(step_masks, step_active) if a[b]]
        routing.append(torch.cat([pm[:, b, : lens[b]], *cols], dim=1) if cols else pm[:, b, : lens[b]].clone())
    fed = sum(r.shape[1] for r in routing)
    decoded = sum(int(a.sum()) for a in step_active)
    routed_fraction, decode_fraction = {}, {}
    for j, lid in enumerate(routed):
        routed_fraction[lid] = sum(int(r[j].sum()) for r in routing) / fed
        if decoded:
            decode_fraction[lid] = sum(int(m[j][a].sum()) for m, a in zip(step_masks, step_active)) / decoded
    skipped = 1.0 - sum(routed_fraction.values()) / R if R else 0.0
    return GenerationResult(
        tokens=out, prompt_lengths=lens.tolist(), finish_reasons=reasons, routed_layers=routed, routing=routing,
        routed_fraction=routed_fraction, decode_routed_fraction=decode_fraction, skipped_fraction=skipped,
        prefill_tokens=int(lens.sum()), prefill_s=prefill_s, decode_s=decode_s, compile_s=compile_s,
        compile_tokens=compile_tokens, decode_steps=steps,
        kv_bytes_in_use=cache.bytes_in_use(), kv_bytes_allocated=cache.bytes_allocated(),
        kv_bytes_dense=cache.dense_bytes(), cache=cache,
    )


# ---- text -----------------------------------------------------------------------------------------
def encode_prompts(tokenizer, prompts: Sequence[str], vocab_size: int, *, chat: bool = False) -> list[list[int]]:
    """Encode prompts, refusing empty ones and ids the model cannot embed (tokenizer mismatch).

    With `chat`, each prompt is one user message rendered by the tokenizer's chat template
    (`HFTokenizer.chat_ids`, with the assistant's generation prompt).
    """
    if chat and getattr(tokenizer, "chat_template", None) is None:
        kind = getattr(tokenizer, "kind", type(tokenizer).__name__)
        raise ValueError(f"chat needs a tokenizer with a chat template, and the {kind} tokenizer has none")
    encoded = []
    for i, text in enumerate(prompts):
        if not text:
            raise ValueError(f"prompt {i} is empty")
        ids = list(tokenizer.chat_ids([{"role": "user", "content": text}]) if chat else tokenizer.encode(text))
        if not ids:
            raise ValueError(f"prompt {i} encodes to no tokens")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]}, outside the model's vocabulary (vocab_size "
                             f"{vocab_size}): the tokenizer does not match the checkpoint")
        encoded.append(ids)
    return encoded


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` not safe to show yet: an incomplete character, or the start
    of a stop string that the next tokens may complete."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    if text.endswith("\ufffd"):  # a multi-byte character cut by the byte tokenizer
        n = max(n, len(text) - len(text.rstrip("\ufffd")))
    return n


def generate_text(
    model,
    tokenizer,
    prompts: str | Sequence[str],
    *,
    stop_strings: str | Sequence[str] | None = None,
    on_text: Callable[[int, str], None] | None = None,
    chat: bool = False,
    **kwargs,
) -> tuple[list[str], GenerationResult]:
    """Generate text continuations of one prompt or a batch; the CLI's entry point.

    Stop strings are matched on the decoded text (so they work whatever the tokenization), and the
    returned text ends before the stop string. A tokenizer with `stop_ids` (`HFTokenizer`: its eos
    ids) adds them to the stop tokens, as Hugging Face's `generate` stops at eos; such a stop token
    is not part of the returned text.

    Args:
        model: a `MoDTransformer` (see `generate`).
        tokenizer: anything with `encode(str) -> list[int]` and `decode(list[int]) -> str`.
        prompts: a prompt or a list of prompts (one batch).
        stop_strings: a row ends once its new text contains one of these.
        on_text: called as `on_text(row, piece)` with each new piece of text as it becomes final
            (streaming); the pieces of a row concatenate to its returned text.
        chat: encode each prompt as one user message with the tokenizer's chat template
            (`encode_prompts`); the reply is generated after the assistant's prompt.
        **kwargs: passed to `generate` (max_new_tokens, temperature, top_k, top_p, seed, stop,
            fraction, chunk_size, ...).

    Returns:
        (the new text of each prompt, the `GenerationResult`).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
    if any(not s for s in stops):
        raise ValueError("a stop string is empty")
    encoded = encode_prompts(tokenizer, prompts, model.cfg.vocab_size, chat=chat)
    eos = [int(t) for t in getattr(tokenizer, "stop_ids", ()) if 0 <= int(t) < model.cfg.vocab_size]
    stream = generate(model, encoded, **{**kwargs, "stop": [*(kwargs.get("stop") or ()), *eos]})
    B = len(encoded)
    new: list[list[int]] = [[] for _ in range(B)]
    texts = [""] * B
    shown = [0] * B  # characters of texts[b] already passed to on_text
    done = [False] * B
    for step in stream:
        for b, t in enumerate(step.tolist()):
            if t == FINISHED or done[b] or t in eos:  # an eos ends the row (a stop token) and is not shown
                continue
            new[b].append(t)
            text = tokenizer.decode(new[b])
            cut = min((text.find(s) for s in stops if s in text), default=-1)
            if cut >= 0:
                text, done[b] = text[:cut], True
                stream.finish_row(b)
            texts[b] = text
            upto = len(text) if done[b] else len(text) - _held_back(text, stops)
            if on_text is not None and upto > shown[b]:
                on_text(b, text[shown[b] : upto])
                shown[b] = upto
    for b in range(B):  # rows that ended on length: show what was held back
        if on_text is not None and len(texts[b]) > shown[b]:
            on_text(b, texts[b][shown[b] :])
    return texts, stream.result


# ---- statistics ------------------------------------------------------------------------------------
def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_stats(res: GenerationResult) -> str:
    """The statistics block that `mixdepth generate` prints."""
    compiled = f"; compile {res.compile_s:.1f} s apart" if res.compile_s else ""
    lines = [
        f"tokens/s: {res.tokens_per_s:.1f} ({res.new_tokens} new tokens in {res.prefill_s + res.decode_s:.2f} s; "
        f"prefill {res.prefill_tokens} tokens in {res.prefill_s:.3f} s, decode {res.decode_tokens_per_s:.1f} tok/s"
        f"{compiled})"
    ]
    if res.routed_layers:
        per_layer = ", ".join(f"layer {i}: {100 * f:.1f}%" for i, f in res.routed_fraction.items())
        lines.append(f"routed fraction: {per_layer}")
        lines.append(f"routed-layer work skipped: {100 * res.skipped_fraction:.1f}%")
    else:
        lines.append("routed-layer work skipped: n/a (the model has no routed layer)")
    lines.append(
        f"KV cache: {_fmt_bytes(res.kv_bytes_in_use)} in use ({_fmt_bytes(res.kv_bytes_allocated)} allocated) vs "
        f"{_fmt_bytes(res.kv_bytes_dense)} for a dense model of the same size ({res.kv_ratio:.2f}x)"
    )
    return "\n".join(lines)
