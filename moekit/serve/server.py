"""The OpenAI-compatible HTTP server: a FastAPI app over an :class:`~moekit.serve.engine.Engine`, and ``serve``.

    GET  /v1/models, /v1/models/{id}   the served model (``max_model_len``: the engine's context)
    POST /v1/completions               text completions: one or several prompts (text or token ids), n choices each
    POST /v1/chat/completions          chat completions through the chat template (``moekit.serve.chat``)
    GET  /health                       200 {"status": "ok", engine stats}; 503 while draining
    GET  /metrics                      Prometheus text: the engine's metrics and HTTP requests by endpoint and status

``stream: true`` answers server-sent events, ``data: {chunk}\\n\\n`` ... ``data: [DONE]\\n\\n``, in OpenAI's chunk
shapes (choices interleaved as their tokens come, each with its ``index``; with ``stream_options.include_usage`` a
last chunk with ``usage`` and no choices). Status codes: 400 for a bad field or value (the message names it, and
``param``), a prompt past the context, or a request body that is not JSON; 404 for an unknown model or route; 429
when the engine's queue is full; 503 while shutting down; 500 only for the one request the engine failed on (the
server keeps serving). Every error body is OpenAI's ``{"error": {...}}``.

Each choice is one engine request. Its events come from the engine thread through a
:class:`~moekit.serve.choices.Inbox`: one ``loop.call_soon_threadsafe`` wakes the event loop for every event of an
engine step (not one per token per request), and the loop moves them onto each request's asyncio queue, so the event
loop never waits on the engine. A stream that falls behind the engine sends what has piled up for a choice as one
chunk (several tokens' text), as OpenAI's streams may, rather than one chunk per token. A client that goes away (a
closed stream, or a non-streaming request's connection) cancels its engine requests: their slots are freed at the
next engine step. FastAPI and uvicorn (the ``[serve]`` extra) are imported inside the functions that need them."""

# (no ``from __future__ import annotations``: FastAPI reads the endpoints' annotations, ``Request`` among them, at
# runtime, and ``Request`` is imported inside create_app)
import asyncio
import contextlib
import logging
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from moekit.serve.chat import ChatTemplate, load_chat_template
from moekit.serve.choices import Choices, Inbox, sse_chunks
from moekit.serve.engine import Engine, EngineConfig
from moekit.serve.protocol import (
    SERVE_EXTRA,
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    error_body,
    request_error_of,
)

log = logging.getLogger(__name__)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (chat: the rest of the context)
CLIENT_CLOSED = 499  # (nginx's code) recorded for a request whose client left before its answer


def require_serve() -> None:
    """Raise a clear ImportError when the ``[serve]`` extra (FastAPI, uvicorn, jinja2) is missing."""
    for name in ("fastapi", "uvicorn", "jinja2"):
        try:
            __import__(name)
        except ImportError as e:
            raise ImportError(f"moekit serve needs {name}: {SERVE_EXTRA}") from e


class HTTPCounters:
    """The server's own figures: requests answered by endpoint (route template) and status, and those in flight."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.answered: Counter[tuple[str, int]] = Counter()
        self.in_flight = 0

    def prometheus(self) -> str:
        with self.lock:
            lines = ["# HELP moekit_http_requests_total HTTP requests answered, by endpoint and status.",
                     "# TYPE moekit_http_requests_total counter"]
            lines += [f'moekit_http_requests_total{{endpoint="{ep}",status="{st}"}} {n}'
                      for (ep, st), n in sorted(self.answered.items())]
            lines += ["# HELP moekit_http_requests_in_flight HTTP requests being answered.",
                      "# TYPE moekit_http_requests_in_flight gauge", f"moekit_http_requests_in_flight {self.in_flight}"]
        return "\n".join(lines) + "\n"


class _CountRequests:
    """ASGI middleware: counts every HTTP request under its route's path (``unmatched`` for unknown routes: the
    label set stays bounded) and the status it was answered with."""

    def __init__(self, app, counters: HTTPCounters) -> None:
        self.app, self.counters = app, counters

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        with self.counters.lock:
            self.counters.in_flight += 1
        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            with self.counters.lock:
                self.counters.in_flight -= 1
                self.counters.answered[(getattr(route, "path", None) or "unmatched", status[0])] += 1


def create_app(engine: Engine, model_name: str, chat_template: ChatTemplate | None = None,
               stream_interval: int = 1):
    """The FastAPI app serving ``engine`` as the model ``model_name`` (the engine is started by the caller).

    ``stream_interval``: a stream's chunk carries at least this many tokens (its last one fewer), as vLLM's
    ``--stream-interval``: every chunk is a socket write and a wake-up of the client, and on a host with few cores
    that work is taken from the engine (see RESULTS.md, serving). 1: a chunk per token.

    ``chat_template``: default, the tokenizer's (``load_chat_template``), else moekit's default template. The app's
    ``state.draining`` set to True makes new generation requests 503 (``serve`` sets it on SIGINT/SIGTERM)."""
    require_serve()
    if not (isinstance(stream_interval, int) and stream_interval >= 1):
        raise ValueError(f"stream_interval: must be an integer >= 1, got {stream_interval!r}")
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    tok = engine.tokenizer
    if tok is None:
        raise ValueError("create_app: the engine has no tokenizer to turn text into tokens")
    template = chat_template or load_chat_template(getattr(tok, "config", {}))
    counters = HTTPCounters()
    inboxes: dict[asyncio.AbstractEventLoop, Inbox] = {}  # (one loop under uvicorn; a test client may run others)
    created = int(time.time())
    app = FastAPI(title="moekit", description=f"OpenAI-compatible server for {model_name}")
    app.state.draining = False
    app.state.counters = counters
    app.add_middleware(_CountRequests, counters=counters)

    def error(e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, e: RequestError):
        return error(e)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, e: RequestValidationError):  # pydantic's 422, as OpenAI's 400
        return error(request_error_of(list(e.errors())))

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, e: HTTPException):  # unknown route, wrong method
        what = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(error_body(what, None, "not_found" if e.status_code == 404 else None),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, e: Exception):
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", None, None, "server_error"),
                            status_code=500)

    class EventStream(StreamingResponse):
        """Server-sent events whose engine requests are cancelled however the response ends."""

        def __init__(self, body, choices: Choices) -> None:
            super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            self.choices = choices

        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            except OSError:  # the client went away mid-write (Starlette's ClientDisconnect is one)
                pass
            finally:
                self.choices.cancel()

    def new_choices(prefix: str, n: int) -> Choices:
        loop = asyncio.get_running_loop()
        inbox = inboxes.get(loop)
        if inbox is None:
            for old in [lp for lp in inboxes if lp.is_closed()]:
                del inboxes[old]
            inbox = inboxes[loop] = Inbox(loop)
        return Choices(engine, f"{prefix}-{uuid.uuid4().hex}", n, inbox)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "moekit",
                "max_model_len": engine.max_seq_len}

    def admit(name: str | None) -> None:
        """A generation request may go on: it asks for the served model (or none) and the server is not draining."""
        if name is not None and name != model_name:
            raise RequestError(f"model: the model {name!r} does not exist (this server serves {model_name!r})",
                               "model", 404, "model_not_found")
        if app.state.draining:
            raise RequestError("the server is shutting down and takes no new request", None, 503, "shutting_down",
                               "server_error")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != model_name:
            raise RequestError(f"model: the model {model_id!r} does not exist (this server serves {model_name!r})",
                               "model", 404, "model_not_found")
        return model_card()

    @app.get("/health")
    async def health():
        stats = engine.stats()
        if app.state.draining or not stats.get("accepting", True):
            return JSONResponse({"status": "draining", **stats}, status_code=503)
        return {"status": "ok", **stats}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.prometheus() + counters.prometheus(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        admit(body.model)
        prompts = [_prompt_ids(p, tok) for p in body.prompts()]
        params = body.sampling_params(body.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS)
        choices = new_choices("cmpl", body.choices_per_prompt)
        choices.submit(prompts, params, "prompt")
        return await answer(choices, body, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        admit(body.model)
        ids = tok.encode(template.render(body.messages))
        asked = body.max_tokens_asked()
        if asked is None and len(ids) >= engine.max_seq_len:
            raise RequestError(f"messages: the prompt has {len(ids)} tokens, the context is {engine.max_seq_len}: "
                               "no room for a reply", "messages", code="context_length_exceeded")
        params = body.sampling_params(asked or engine.max_seq_len - len(ids), extra_stop=template.stop)
        choices = new_choices("chatcmpl", body.choices_per_prompt)
        choices.submit([ids], params, "messages")
        return await answer(choices, body, request, chat=True)

    async def answer(choices: Choices, body, request, chat: bool):
        head = {"id": choices.http_id, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model_name}
        if body.stream:
            return EventStream(sse_chunks(choices, body, head, chat, stream_interval), choices)
        texts: dict[int, list[str]] = {i: [] for i in range(len(choices.request_ids))}
        tokens: dict[int, list[int]] = {i: [] for i in texts}
        try:
            async for index, out in choices.events(request):
                texts[index].append(out.text)
                tokens[index] += out.token_ids
        finally:  # (this handler cancelled, by a forced shutdown say: its engine requests end too)
            choices.cancel()
        if choices.disconnected:
            return Response(status_code=CLIENT_CLOSED)
        if (failed := choices.failure()) is not None:
            raise failed
        out = []
        for i in sorted(texts):
            c: dict[str, Any] = {"index": i}
            text = "".join(texts[i])
            c.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            c.update({"logprobs": None, "finish_reason": choices.finals[i].finish_reason})
            if body.return_token_ids:
                c.update({"token_ids": tokens[i], "prompt_token_ids": choices.prompts[i // choices.n]})
            out.append(c)
        return {**head, "choices": out, "usage": choices.usage()}

    return app


def _prompt_ids(prompt: str | list[int], tok) -> list[int]:
    """The token ids of one completion prompt; an empty text starts from end-of-text, as OpenAI's models do."""
    if not isinstance(prompt, str):
        return prompt
    ids = tok.encode(prompt)
    if not ids:
        if tok.eot_id is None:
            raise RequestError("prompt: is empty, and this tokenizer has no end-of-text token to start from",
                               "prompt")
        ids = [tok.eot_id]
    return ids


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16,
          max_seq_len: int | None = None, kv_cache_gb: float | None = None, max_queue: int = 64, dtype: str = "auto",
          model_name: str | None = None, drain_timeout: float = 30.0, stream_interval: int = 1,
          expert_memory_gb: float | None = None) -> None:
    """Load ``checkpoint`` (as ``moekit generate`` does), start the engine and serve it over HTTP until SIGINT or
    SIGTERM. Then: no new connections, new requests on open ones 503, the running and queued requests finish (up to
    ``drain_timeout`` seconds, then they are cancelled), and the function returns (``moekit serve`` exits 0; a
    second SIGINT stops at once). ``model_name``: the ``model``
    clients ask for (default: the checkpoint directory's name). ``stream_interval``: see :func:`create_app`.
    ``expert_memory_gb``: the routed experts stay on disk, read into a pool of that many GiB (``moekit.offload``)."""
    require_serve()
    import uvicorn

    from moekit.train.evaluation import load_for_inference

    model, tok, ckpt = load_for_inference(checkpoint, dtype=dtype, expert_memory_gb=expert_memory_gb)
    engine = Engine(model, tok, EngineConfig(max_batch=max_batch, max_seq_len=max_seq_len, kv_cache_gb=kv_cache_gb,
                                             max_queue=max_queue))
    name = model_name or Path(checkpoint).resolve().name
    app = create_app(engine, name, load_chat_template(tok.config, ckpt), stream_interval=stream_interval)
    stats = engine.stats()
    log.warning("moekit serve: %s as %r on http://%s:%d (%d KV slots of %d tokens, queue %d)", ckpt, name, host, port,
                stats["slots"], stats["max_seq_len"], max_queue)

    class DrainingServer(uvicorn.Server):
        drainer: threading.Thread | None = None

        @contextlib.contextmanager
        def capture_signals(self):  # uvicorn's, minus re-raising the signal at the end: serve() returns normally
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            before = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in before.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame) -> None:  # SIGINT / SIGTERM: drain the engine beside uvicorn's shutdown
            app.state.draining = True
            if self.drainer is None:
                self.drainer = threading.Thread(target=engine.shutdown, daemon=True,
                                                kwargs={"drain": True, "timeout": drain_timeout})
                self.drainer.start()
            super().handle_exit(sig, frame)

    # uvicorn waits for open responses a little longer than the engine drains, so cut-off streams still end cleanly
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=drain_timeout + 5,
                                           log_level="info"))
    engine.start()
    try:
        server.run()
    finally:
        if server.drainer is not None and not server.force_exit:  # (a second Ctrl-C: cancel what is left now)
            server.drainer.join()
        engine.shutdown(drain=False)
