"""The OpenAI-compatible HTTP layer over an `Engine` (issue 29), on FastAPI.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (the checkpoint's chat template),
`GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text), `GET /` (the page,
`static/index.html`). Streaming is server-sent events: `data: {chunk}` lines, then `data: [DONE]`.

OpenAI's conventions, as vLLM and SGLang keep them:
- `usage` in a full response; streamed, in one more chunk (empty `choices`) before `[DONE]` when
  `stream_options.include_usage` is set.
- Errors are `{"error": {"message", "type", "param", "code"}}`: 400 for a bad body (a validation
  error too, as vLLM does, not FastAPI's 422), 401 without the `--api-key`, 404 for an unknown model
  or route, 413 for a body over the limit, 429 when the waiting queue is full, 503 while stopping.
- Fields we do not build (`n` > 1, `logprobs`, penalties, `logit_bias`, tools, ...) are refused
  with 400 naming the field, never silently ignored; unknown fields too.
- Our own fields live under `mixdepth`: in a request, `{"mixdepth": {"fraction": 0.25}}` holds the
  request's routed fraction (the compute dial; openai client: `extra_body={"mixdepth": {...}}`);
  in a response or chunk, the routing statistics (per new token, how many routed layers the step
  that made it ran; the routed fraction; tokens/s).

The API key protects `/v1/*`; `/`, `/health` and `/metrics` stay open (they hold no prompt or text;
the page asks for the key and sends it). This layer knows nothing of the model's internals: it
talks to the engine (`submit`, `cancel`, `stats`, `encode`, `chat_ids`).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, EngineStopped, Event, QueueFull, SamplingParams

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 1 << 20


# ---- errors --------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)


# ---- request bodies ------------------------------------------------------------------------------
class _Strict(BaseModel):
    # strict: "12" is not an integer; forbid: an unknown field is refused, not ignored
    model_config = ConfigDict(extra="forbid", strict=True)


class MixdepthOptions(_Strict):
    fraction: float | None = Field(None, ge=0, le=1)
    """Routed fraction of this request (the compute dial); None: the calibrated threshold."""
    fraction_rule: Literal["hold", "threshold"] | None = None
    """How `fraction` is reached: `hold` (held on any text) or `threshold`; None: the server's
    `--fraction-rule`."""


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    mixdepth: MixdepthOptions | None = None
    # known but not built: refused unless at their neutral value (see `_refuse_unsupported`)
    n: int | None = 1
    presence_penalty: float | None = 0
    frequency_penalty: float | None = 0
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


# field -> its neutral values: anything else asks for something not built
_NEUTRAL: dict[str, tuple] = {
    "n": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
    "echo": (None, False), "logprobs": (None, False), "best_of": (None, 1), "suffix": (None,),
    "top_logprobs": (None,), "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None,),
}


_FIELD_NAMES = {name for m in (CompletionRequest, ChatRequest, ChatMessage, ContentPart, MixdepthOptions,
                                StreamOptions) for name in m.model_fields}


def _refuse_unsupported(body: _Sampling) -> None:
    for name, neutral in _NEUTRAL.items():
        if name in type(body).model_fields:
            value = getattr(body, name)
            if not any(value == v and type(value) is type(v) or value is v for v in neutral):
                raise APIError(400, f"'{name}' is not supported by this server (got {json.dumps(value)})",
                               param=name, code="unsupported_parameter")
    fmt = getattr(body, "response_format", None)
    if fmt is not None and fmt != {"type": "text"}:
        raise APIError(400, "response_format other than {\"type\": \"text\"} is not supported",
                       param="response_format", code="unsupported_parameter")


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise APIError(400, f"at most 4 stop sequences, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise APIError(400, "a stop sequence is empty", param="stop")
    return stops


def _message_text(m: ChatMessage) -> str:
    if isinstance(m.content, list):
        return "".join(p.text for p in m.content)
    return m.content or ""


# ---- metrics -------------------------------------------------------------------------------------
class EngineCollector:
    """Prometheus metrics read from `Engine.stats()` at each scrape."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        yield GaugeMetricFamily("mixdepth_requests_running", "Requests holding a cache row (decoding).",
                                value=s["running"])
        yield GaugeMetricFamily("mixdepth_requests_waiting", "Requests waiting for a cache row.", value=s["waiting"])
        yield GaugeMetricFamily("mixdepth_max_batch", "Cache rows in the pool (--max-batch).", value=s["max_batch"])
        yield CounterMetricFamily("mixdepth_generated_tokens", "New tokens generated.", value=s["generated_tokens"])
        yield CounterMetricFamily("mixdepth_prompt_tokens", "Prompt tokens prefilled.", value=s["prompt_tokens"])
        fin = CounterMetricFamily("mixdepth_requests_finished", "Requests ended, by finish reason.",
                                  labels=["reason"])
        for reason, n in sorted(s["finished"].items()):
            fin.add_metric([reason], n)
        yield fin
        yield GaugeMetricFamily("mixdepth_tokens_per_second", "New tokens per second over the last 10 s.",
                                value=s["tokens_per_s"])
        routed = GaugeMetricFamily("mixdepth_routed_fraction",
                                   "Fraction of decoded tokens that entered each routed layer's block (since start).",
                                   labels=["layer"])
        for lid, f in s["decode_routed_fraction"].items():
            routed.add_metric([str(lid)], f)
        yield routed
        yield GaugeMetricFamily("mixdepth_kv_bytes_in_use", "KV-cache bytes held for the running requests.",
                                value=s["kv_bytes_in_use"])
        yield GaugeMetricFamily("mixdepth_kv_bytes_dense",
                                "KV-cache bytes a dense model of the same size would hold for the same tokens.",
                                value=s["kv_bytes_dense"])
        yield GaugeMetricFamily("mixdepth_kv_bytes_allocated", "KV-cache bytes allocated for the pool.",
                                value=s["kv_bytes_allocated"])


# ---- the app -------------------------------------------------------------------------------------
class _BodyLimit:
    """Refuse a request body over `limit` bytes with 413, before the route reads it (pure ASGI)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        if length is not None:
            return await self.app(scope, receive, send)
        # no length (chunked): read it here, up to the limit, and replay it
        messages, size = [], 0
        while True:
            msg = await receive()
            messages.append(msg)
            size += len(msg.get("body", b""))
            if size > self.limit:
                return await self._refuse(send)
            if msg["type"] != "http.request" or not msg.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        body = json.dumps(error_body(f"request body too large (limit {self.limit} bytes)", "invalid_request_error",
                                     code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               shutdown_timeout: float = 5.0) -> FastAPI:
    """The FastAPI app serving `engine` as model `model_name`; its lifespan starts and stops the engine.

    Args:
        engine: the `Engine` (started here if it is not yet).
        model_name: the id in `/v1/models`; a request naming another model gets 404.
        api_key: when set, `/v1/*` needs `Authorization: Bearer <api_key>`.
        max_body_bytes: larger request bodies get 413.
        shutdown_timeout: seconds running requests may take to finish when the server stops.
    """

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown, shutdown_timeout)

    app = FastAPI(title="mixdepth", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(EngineCollector(engine))
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        # the field path, without the union member tags pydantic puts in it ("prompt.str")
        raw = list(err.get("loc", ()))
        loc = [str(x) for x in raw if isinstance(x, int) or x in _FIELD_NAMES]
        if err.get("type") == "extra_forbidden" and raw:  # the unknown field's own name
            loc = [str(x) for x in raw[:-1] if isinstance(x, int) or x in _FIELD_NAMES] + [str(raw[-1])]
        param = ".".join(loc) or None
        if err.get("type") == "extra_forbidden":
            msg = f"unknown or unsupported field '{param}'"
        elif err.get("type") in ("json_invalid", "model_attributes_type") or raw == ["body"]:
            # the body as a whole (a json_invalid loc ends with a character offset, not a field)
            msg, param = "the body is not a JSON object", None
        else:
            msg = f"{param}: {err.get('msg', 'invalid value')}" if param else err.get("msg", "invalid body")
        return error_response(APIError(400, msg, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(APIError(e.status_code, str(e.detail), param=None, code=code))

    @app.exception_handler(Exception)
    async def _server_error(request, e: Exception):
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    def _authorize(request: Request) -> None:
        # a route's dependency: FastAPI runs it before it validates the body, so a caller without the
        # key learns nothing of what a valid body looks like
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "incorrect or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    def _check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    def _params(body: _Sampling, prompt_ids: list[int], max_tokens: int | None,
                default_max: int | None) -> SamplingParams:
        _refuse_unsupported(body)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        room = engine.context - len(prompt_ids)
        if max_tokens is None:
            max_tokens = room if default_max is None else min(default_max, room)
        try:
            engine.check_prompt(prompt_ids, max(max_tokens, 1))
        except ValueError as e:
            param = "max_tokens" if "context length" in str(e) else "prompt"
            raise APIError(400, str(e), param=param,
                           code="context_length_exceeded" if param == "max_tokens" else None) from None
        frac = body.mixdepth.fraction if body.mixdepth is not None else None
        rule = body.mixdepth.fraction_rule if body.mixdepth is not None else None
        try:
            return SamplingParams(max_tokens=max_tokens, top_p=body.top_p, seed=body.seed, stop=_stops(body.stop),
                                  temperature=1.0 if body.temperature is None else body.temperature, fraction=frac,
                                  fraction_rule=rule)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "stopped"}, status_code=503)
        if not engine.stats()["accepting"]:  # draining: a load balancer should send no more requests
            return JSONResponse({"status": "stopping"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(_authorize)])
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": created, "owned_by": "mixdepth",
            "max_model_len": engine.context,
            "mixdepth": {"routed_layers": engine.routed_layer_ids, "max_batch": engine.max_batch},
        }]}

    @app.post("/v1/completions", dependencies=[Depends(_authorize)])
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise APIError(400, f"one prompt per request (got {len(prompt)}); send them as separate requests",
                               param="prompt", code="unsupported_parameter")
            prompt = prompt[0]
        try:
            # in a worker thread, as the chat template is: a long prompt must not stall the other streams
            ids = await asyncio.to_thread(engine.encode, prompt) if isinstance(prompt, str) else list(prompt)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        params = _params(body, ids, body.max_tokens, 16)  # OpenAI's default max_tokens for completions
        return await _respond(request, "text_completion", body, ids, params)

    @app.post("/v1/chat/completions", dependencies=[Depends(_authorize)])
    async def chat_completions(body: ChatRequest, request: Request):
        _check_model(body.model)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
        # a message's name goes to the template, as transformers passes it (None: left out)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m),
                     "name": m.name} for m in body.messages]
        try:
            ids = await asyncio.to_thread(engine.chat_ids, messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        params = _params(body, ids, body.max_tokens or body.max_completion_tokens, None)
        return await _respond(request, "chat.completion", body, ids, params)

    async def _respond(request: Request, kind: str, body: _Sampling, ids: list[int], params: SamplingParams):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def on_event(ev: Event) -> None:  # called from the engine thread
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        try:
            req = engine.submit(ids, params, on_event)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded") from None
        except EngineStopped as e:
            raise _unavailable(str(e)) from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        rid = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex[:24]
        meta = {"id": rid, "created": int(time.time()), "model": body.model}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_stream(req, queue, kind, meta, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _whole(request, req, queue, kind, meta)

    async def _whole(request: Request, req, queue: asyncio.Queue, kind: str, meta: dict) -> JSONResponse:
        text, routed = [], []
        # the client going away is watched apart from the events: a steady flow of tokens must not hide it
        gone = asyncio.ensure_future(_disconnected(request))
        get = None
        try:
            while True:
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait((get, gone), return_when=asyncio.FIRST_COMPLETED)
                if not get.done():  # the client went away: free its row (in `finally`)
                    return JSONResponse({}, status_code=499)
                ev = get.result()
                text.append(ev.text)
                routed += ev.routed_layers
                if ev.done:
                    break
        finally:  # also when this task is cancelled: nothing left waiting
            for task in (gone, get):
                if task is not None:
                    task.cancel()
            if not req.done:
                engine.cancel(req)
        if ev.error is not None:
            raise _failed(ev)
        stats = req.stats(engine.routed_layer_ids)
        usage = _usage(stats)
        if kind == "text_completion":
            choice = {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": ev.finish_reason}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "logprobs": None,
                      "finish_reason": ev.finish_reason}
        return JSONResponse({**meta, "object": kind, "choices": [choice], "usage": usage,
                             "mixdepth": {**stats, "routed_layers_per_token": routed}})

    async def _stream(req, queue: asyncio.Queue, kind: str, meta: dict, include_usage: bool):
        chunk_kind = "text_completion" if kind == "text_completion" else "chat.completion.chunk"

        def chunk(text: str | None, finish: str | None, extra: dict, first: bool = False) -> str:
            if kind == "text_completion":
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            else:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            out = {**meta, "object": chunk_kind, "choices": [choice], "mixdepth": extra}
            if include_usage:
                out["usage"] = None
            return f"data: {json.dumps(out)}\n\n"

        try:
            if kind != "text_completion":
                yield chunk(None, None, {}, first=True)
            while True:
                ev = await queue.get()
                if ev.error is not None:
                    e = _failed(ev)
                    yield f"data: {json.dumps(error_body(e.message, e.type, code=e.code))}\n\n"
                    break
                extra = {"routed_layers": ev.routed_layers}
                if ev.done:
                    extra.update(req.stats(engine.routed_layer_ids))
                if ev.text or ev.done:
                    yield chunk(ev.text, ev.finish_reason, extra)
                if ev.done:
                    if include_usage:  # one more chunk: no choices, the usage
                        usage = _usage(req.stats(engine.routed_layer_ids))
                        yield f"data: {json.dumps({**meta, 'object': chunk_kind, 'choices': [], 'usage': usage})}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away mid-stream (the task is cancelled): free the row
            if not req.done:
                engine.cancel(req)

    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    app.state.engine = engine
    return app


def _unavailable(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="service_unavailable")


def _failed(ev: Event) -> APIError:
    """The error of a request the engine ended with `ev.error`: 503 if it never started because the
    engine is stopping (the client may retry elsewhere), else 500."""
    return _unavailable(ev.error) if ev.stopped else APIError(500, ev.error, type="server_error")


async def _disconnected(request: Request) -> None:
    """Return once the client of `request` (its body already read) has closed the connection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _usage(stats: dict) -> dict:
    p, c = stats["prompt_tokens"], stats["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
