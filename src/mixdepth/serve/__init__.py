"""Serving a checkpoint behind the OpenAI API (issue 29).

Split as vLLM splits its engine from its OpenAI entrypoint:
- `engine`: one thread owns the model and a fixed pool of KV-cache rows; waiting and running
  queues, chunked prefill, continuous batching (a request is one row). It knows nothing of HTTP.
- `api`: the FastAPI app (OpenAI routes, SSE streaming, errors in OpenAI's shape, Prometheus
  metrics, the page). It knows nothing of the model's internals: it talks to an `Engine`.
- `static/index.html`: the page served at `GET /` (plain HTML and JavaScript, no build step).
- `loadgen`: `mixdepth bench serve`, a bounded load generator against servers it starts itself.

`mixdepth.commands.serve` only wires them. The server needs the `serve` extra
(fastapi, uvicorn, prometheus-client); the engine needs nothing beyond torch.
"""
