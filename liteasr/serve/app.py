"""The HTTP side of `liteasr serve`: FastAPI routes in OpenAI's shape over one batching `Scheduler`.

POST /v1/audio/transcriptions and /v1/audio/translations (multipart, OpenAI's fields and response formats,
`stream=true` as server-sent events), GET /v1/models, GET /health, GET /metrics. Every error is answered in
OpenAI's {"error": {"message", "type", "param", "code"}} shape. Audio is read and decoded on worker threads
(the event loop never blocks); the model runs only on the scheduler's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..audio import SAMPLE_RATE, load_audio
from .metrics import ServerMetrics
from .protocol import APIError, AudioRequest, bad_field, check_language, delta_event, done_event, parse_fields, \
    response_body, sse
from .scheduler import BatchOptions, QueueFull, Scheduler, ShuttingDown
from .scheduler import Request as Submitted

ALIAS = "whisper-1"  # OpenAI's model name, answered by the first served model (clients that hard-code it work)


@dataclass(frozen=True)
class ServeOptions:
    """Limits and access of one server; the scheduler's batching in `batch`."""

    api_key: str | None = None  # require "Authorization: Bearer <api_key>" on /v1/*; None: open
    max_upload_mb: float = 25.0  # request bodies above this get 413 (OpenAI's own limit is 25 MB)
    max_audio_s: float = 3600.0  # decoded audio longer than this gets 400
    request_timeout_s: float = 600.0  # a request not finished by then is cancelled and gets 504
    retry_after_s: int = 1  # Retry-After of a 429 (the openai client waits this long, then retries)
    batch: BatchOptions = field(default_factory=BatchOptions)


class _ClientGone(Exception):
    """The client disconnected before its result was ready (its windows were cancelled)."""


class Server:
    """What the routes share: options, the scheduler, metrics, and the loading state."""

    def __init__(self, models: dict | Callable[[], dict], options: ServeOptions) -> None:
        self.options = options
        self.metrics = ServerMetrics()
        self.scheduler = Scheduler(options.batch, self.metrics)
        self.load = models if callable(models) else (lambda: models)
        self.load_error: str | None = None
        self.names: list[str] = []

    def start(self) -> None:
        """Load the models (on a thread: /health answers 503 meanwhile) and start the scheduler."""
        def run() -> None:
            try:
                models = self.load()
            except Exception as e:  # the server stays up and says why on /health
                self.load_error = f"{type(e).__name__}: {e}"
                return
            self.names = list(models)
            self.scheduler.start(models)

        threading.Thread(target=run, name="liteasr-load", daemon=True).start()

    def model(self, name: str) -> tuple[str, object]:
        if name == ALIAS and self.names and ALIAS not in self.names:
            name = self.names[0]
        if name not in self.scheduler.models:
            raise APIError(404, f"model {name!r} is not served here (served: {', '.join(self.names)})",
                           param="model", code="model_not_found")
        return name, self.scheduler.models[name]


def build_app(models: dict | Callable[[], dict], options: ServeOptions = ServeOptions()) -> FastAPI:
    """The ASGI app serving `models` ({name: liteasr Whisper or CudaRuntime}, or a function loading them, called
    on a thread at startup) with `options`. Run it with uvicorn (`serve` does)."""
    server = Server(models, options)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        yield
        server.scheduler.stop()  # uvicorn has drained the in-flight requests (or given up on them) by now

    app = FastAPI(title="liteasr", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(_BodyLimit, limit=int(options.max_upload_mb * 2 ** 20))
    _add_error_handlers(app, server)

    @app.get("/health")
    async def health() -> JSONResponse:
        if server.load_error:
            return JSONResponse({"status": "error", "error": server.load_error}, status_code=503)
        if not server.scheduler.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "models": server.names, **server.scheduler.depth()})

    @app.get("/metrics")
    async def metrics() -> Response:
        body, media = server.metrics.render()
        return Response(body, media_type=media)

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        _authorize(request, options)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "liteasr"} for name in server.names]})

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        return await _audio(request, server, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request) -> Response:
        return await _audio(request, server, "translate")

    return app


# ---------------------------------------------------------------------------------------------------
# the audio endpoints


async def _audio(request: Request, server: Server, task: str) -> Response:
    _authorize(request, server.options)
    if not server.scheduler.ready:
        raise APIError(503, "the server is loading its models" if not server.load_error else server.load_error,
                       type="server_error", code="not_ready", headers={"Retry-After": "5"})
    t0 = time.monotonic()
    req, fields_ = await _admit(request, server, task)
    if fields_.stream:
        return StreamingResponse(_stream(request, req, server, t0), media_type="text/event-stream")
    try:
        result = await _wait(request, req, server.options.request_timeout_s)
    except _ClientGone:
        server.metrics.errors.labels("client_closed", "client_closed").inc()
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    body, media = response_body(result, fields_)
    server.metrics.audio_seconds.labels(req.model).inc(result["duration"])
    server.metrics.requests.labels(request.url.path, req.model, "200").inc()
    server.metrics.latency.labels(request.url.path).observe(time.monotonic() - t0)
    return Response(body, media_type=media)


async def _admit(request: Request, server: Server, task: str) -> tuple[Submitted, AudioRequest]:
    """Take a queue slot, read and check the form and the audio, and submit: (scheduler Request, fields)."""
    try:
        server.scheduler.reserve()
    except QueueFull as e:
        raise APIError(429, f"the server is busy: {e}; retry later", type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(server.options.retry_after_s)}) from None
    except ShuttingDown as e:
        raise APIError(503, str(e), type="server_error", code="shutting_down") from None
    try:
        form = await request.form(max_files=1, max_fields=64)
        fields_ = parse_fields(form, task)
        name, model = server.model(fields_.model)
        check_language(fields_, model.tokenizer, model.is_multilingual)
        options = fields_.transcribe_options()
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise bad_field("file", "file: required (the audio file, as a multipart file field)", "missing")
        data = await upload.read()
        if not data:
            raise bad_field("file", f"file: {upload.filename!r} is empty", "empty_file")
        audio = await run_in_threadpool(_decode_upload, data, upload.filename or "audio")
        if len(audio) > server.options.max_audio_s * SAMPLE_RATE:
            raise bad_field("file", f"file: {len(audio) / SAMPLE_RATE:.1f} s of audio is longer than this "
                            f"server's limit of {server.options.max_audio_s:g} s", "audio_too_long")
        return server.scheduler.submit(name, audio, options, upload.filename or "audio"), fields_
    except BaseException:
        server.scheduler.release()
        raise


def _decode_upload(data: bytes, filename: str) -> np.ndarray:
    """16-kHz mono float32 samples (T,) of an uploaded file, through liteasr.audio.load_audio (soundfile, then
    ffmpeg), from a temporary file named like the upload (ffmpeg guesses some containers by extension)."""
    suffix = Path(filename).suffix[:16]
    fd, tmp = tempfile.mkstemp(prefix="liteasr-upload-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return load_audio(tmp)
    except (ValueError, OSError) as e:
        raise bad_field("file", f"file: {str(e).replace(tmp, repr(filename))}", "invalid_audio") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


async def _events(request: Request, req: Submitted, timeout: float):
    """The request's events ("segments", [...]) and ("done", result) as they come; an ("error", e) event is raised
    as an APIError. Cancels the request when the client disconnects (_ClientGone) or the timeout passes (504)."""
    deadline = time.monotonic() + timeout
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        while True:
            get = asyncio.ensure_future(req.events.get())
            done, _ = await asyncio.wait({get, gone}, timeout=max(deadline - time.monotonic(), 0),
                                         return_when=asyncio.FIRST_COMPLETED)
            if get in done:
                kind, payload = get.result()
                if kind == "error":
                    raise _decode_error(payload)
                yield kind, payload
                if kind == "done":
                    return
                continue
            get.cancel()
            req.cancel()
            if gone in done:
                raise _ClientGone()
            raise APIError(504, f"the request did not finish within {timeout:g} s (request timeout)",
                           type="timeout_error", code="request_timeout")
    finally:
        gone.cancel()
        req.cancel()  # no-op for a finished request; drops the pending windows of an abandoned one


async def _wait(request: Request, req: Submitted, timeout: float) -> dict:
    """The result of `req` (raises like `_events`)."""
    async with contextlib.aclosing(_events(request, req, timeout)) as events:
        async for kind, payload in events:
            if kind == "done":
                return payload
    raise RuntimeError("the scheduler ended a request without a result")


async def _disconnect(request: Request) -> None:
    """Returns when the client goes away (the body is read already, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(request: Request, req: Submitted, server: Server, t0: float):
    """transcript.text.delta events as windows finish, then transcript.text.done (or an error event)."""
    endpoint = request.url.path
    first = True
    events = _events(request, req, server.options.request_timeout_s - (time.monotonic() - t0))
    try:
        async with contextlib.aclosing(events):
            async for kind, payload in events:
                if kind == "segments":
                    text = " ".join(seg["text"] for seg in payload if seg["text"])
                    if text:  # joined as Job.result joins segments, so the deltas add up to the final text
                        yield sse(delta_event(text if first else " " + text))
                        first = False
                else:
                    server.metrics.audio_seconds.labels(req.model).inc(payload["duration"])
                    server.metrics.requests.labels(endpoint, req.model, "200").inc()
                    server.metrics.latency.labels(endpoint).observe(time.monotonic() - t0)
                    yield sse(done_event(payload))
    except APIError as e:  # the status line is sent already: the error goes in the stream, as OpenAI does
        server.metrics.errors.labels(e.type, str(e.code)).inc()
        yield sse(e.body())
    except _ClientGone:
        server.metrics.errors.labels("client_closed", "client_closed").inc()


def _decode_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, ShuttingDown):
        return APIError(503, str(e), type="server_error", code="shutting_down")
    if isinstance(e, ValueError):  # liteasr's input checks (audio content) raise ValueError naming the input
        return APIError(400, str(e), param="file", code="invalid_audio")
    return APIError(500, f"decoding failed: {type(e).__name__}: {e}", type="server_error", code="decode_failed")


# ---------------------------------------------------------------------------------------------------
# access, limits, errors


def _authorize(request: Request, options: ServeOptions) -> None:
    if options.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or token.strip() != options.api_key:
        raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                       code="invalid_api_key")


class _BodyLimit:
    """ASGI middleware: 413 for a body above `limit` bytes, from Content-Length before reading it, or while
    reading a body sent without one (chunked)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _error_response(_too_large(int(length), self.limit))(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _too_large(seen, self.limit)
            return message

        await self.app(scope, counted, send)


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body ({size / 2 ** 20:.1f} MiB) is larger than this server's limit of "
                    f"{limit / 2 ** 20:g} MiB", code="request_too_large")


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _add_error_handlers(app: FastAPI, server: Server) -> None:
    def answer(request: Request, e: APIError) -> JSONResponse:
        server.metrics.errors.labels(e.type, str(e.code)).inc()
        if request.url.path.startswith("/v1/audio"):
            server.metrics.requests.labels(request.url.path, "-", str(e.status)).inc()
        return _error_response(e)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return answer(request, e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # unknown routes, bad multipart
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return answer(request, APIError(e.status_code, str(e.detail), type=kind, code=f"http_{e.status_code}"))

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> JSONResponse:  # a bug: say what, keep serving
        return answer(request, APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error",
                                        code="internal_error"))


# ---------------------------------------------------------------------------------------------------


def load_models(names: list[str], device: str = "cpu", dtype=None) -> dict:
    """{name: model} for `serve`: liteasr Whisper models on `device`; on CUDA, each wrapped in a CudaRuntime."""
    import torch

    from ..checkpoint import load_model

    cuda = str(device).startswith("cuda")
    dtype = dtype or (torch.float16 if cuda else torch.float32)
    models = {}
    for name in names:
        model = load_model(name, device=device, dtype=dtype)
        if cuda:
            from ..cuda import CudaRuntime

            model = CudaRuntime(model)
        models[name] = model
    return models


def serve(models: list[str], device: str = "cpu", dtype=None, host: str = "127.0.0.1", port: int = 8000,
          options: ServeOptions = ServeOptions(), log_level: str = "info") -> None:
    """Serve `models` (names or directories, the first one also answers to "whisper-1") on host:port until
    interrupted. SIGINT/SIGTERM: stop accepting, let in-flight requests finish (up to request_timeout_s),
    then fail what is left with 503."""
    import uvicorn

    if len(set(models)) != len(models):
        raise ValueError(f"--model: a model is named twice ({', '.join(models)})")
    app = build_app(lambda: load_models(models, device, dtype), options)
    uvicorn.run(app, host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=math.ceil(options.request_timeout_s))
