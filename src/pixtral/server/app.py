"""The OpenAI-compatible HTTP server: FastAPI routes in front of an `AsyncEngine`.

    POST /v1/chat/completions   chat, streamed (SSE) or not, with images as data: URIs
    POST /v1/completions        raw text prompts (OpenAI's legacy API: echo, logprobs; see `completions`)
    GET  /v1/models             the one served model
    GET  /health                200 once the model is loaded, 503 before
    GET  /metrics               Prometheus text (see `metrics`)
    GET  /, /web/...            the web chat page (see `pixtral.server.web`), unless web_page is off

Every error is OpenAI's JSON error shape with a status that says whose fault it is. The body
is parsed here, not by FastAPI, so that size limits, invalid JSON and invalid fields each get
their own clear message. A client that goes away cancels its request.

Checks run cheapest first, so that a bad request costs little: the body's size (while it is
read, within `body_timeout_s`), JSON and field types, text that UTF-8 cannot encode, the
parameters, a bound on the text's length from its character count (a text too long for the
context fails before it is tokenized), and only then the images, decoded in a small pool of
their own under the image policy's decode budget.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from pixtral.engine.async_engine import AsyncEngine, RequestStream
from pixtral.engine.inputs import chat_prompt, check_text_length
from pixtral.engine.outputs import RequestOutput
from pixtral.errors import PixtralError
from pixtral.processing.images import SERVER_POLICY, ImagePolicy
from pixtral.server import completions
from pixtral.server.errors import APIError, encodable, error_body, from_pixtral_error
from pixtral.server.metrics import CONTENT_TYPE, ServerMetrics
from pixtral.server.structured import ChatConstraints, ToolCallStream, chat_constraints
from pixtral.server.protocol import (ChatCompletionRequest, ResponseMeta, chunk, completion_response, count_images,
                                     logprobs_content, model_card, usage_chunk)

log = logging.getLogger("pixtral.server")


@dataclass
class ServerConfig:
    model_name: str = "pixtral"
    api_key: str | None = None  # require "Authorization: Bearer <key>" on /v1/*
    image_policy: ImagePolicy = SERVER_POLICY  # data: URIs only, unless remote images are allowed
    max_images_per_request: int = 64
    max_request_bytes: int = 100 * 2**20
    body_timeout_s: float = 60.0  # to send the whole request body
    web_page: bool = True  # the chat page at /


class ServerState:
    """The engine once it is loaded. Until then (or if loading failed) requests get a 503."""

    def __init__(self, engine: AsyncEngine | None = None):
        self.engine = engine
        self.load_error: str | None = None

    def load_in_background(self, loader: Callable[[], AsyncEngine],
                           on_error: Callable[[BaseException], None] | None = None) -> threading.Thread:
        def load() -> None:
            try:
                self.engine = loader()
            except BaseException as exc:  # noqa: BLE001 - reported by /health and the log
                self.load_error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, PixtralError) else str(exc)
                log.error("could not load the model: %s", self.load_error)
                if on_error is not None:
                    on_error(exc)

        thread = threading.Thread(target=load, name="pixtral-load", daemon=True)
        thread.start()
        return thread

    def require_engine(self) -> AsyncEngine:
        if self.engine is None:
            if self.load_error:
                raise APIError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
            raise APIError(503, "the model is still loading; retry shortly", code="model_loading",
                           headers={"Retry-After": "5"})
        if not self.engine.alive:
            raise APIError(503, f"the engine is not running ({self.engine.dead})", code="engine_unavailable")
        return self.engine


def build_app(state: ServerState, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    app = FastAPI(title="pixtral", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics = ServerMetrics(lambda: state.engine)
    # Requests with images are prepared here, never in the shared thread pool: a burst of them then
    # waits its turn without holding up text requests, and no more images decode at once than the
    # budget lets through anyway.
    image_pool = ThreadPoolExecutor(config.image_policy.budget.max_images, thread_name_prefix="pixtral-images")

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics.http_error(exc.status)
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(
            exc.status_code, str(exc.detail))
        return await api_error(request, APIError(exc.status_code, message))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await api_error(request, APIError(400, str(exc)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        metrics.http_error(500)
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error"),
                            status_code=500)

    def check_auth(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {config.model_name!r}",
                           code="model_not_found", param="model")

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health() -> JSONResponse:
        state.require_engine()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        check_auth(request)
        engine = state.engine
        card = model_card(config.model_name, engine.max_model_len if engine is not None else None,
                          engine.model_info() if engine is not None else None)
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_auth(request)
        engine = state.require_engine()
        req = parse_request(await read_json(request, config.max_request_bytes, config.body_timeout_s))
        check_model(req.model)
        req.unsupported()
        n_images = count_images(req.messages)
        if n_images > config.max_images_per_request:
            raise APIError(400, f"the request has {n_images} images, over the limit of "
                                f"{config.max_images_per_request} per request", code="too_many_images",
                           param="messages")
        constraints = await chat_constraints(req, engine.processor)  # compiled in the thread pool
        try:
            params = req.sampling_params(constraints.output)
        except PixtralError as exc:
            raise from_pixtral_error(exc) from None
        try:
            check_text_length(req.messages, engine.max_model_len, engine.processor.max_token_bytes)
            encode = (chat_prompt, engine.processor, req.messages, config.image_policy, None, constraints.prompt_tools)
            if n_images:
                prompt = await asyncio.get_running_loop().run_in_executor(image_pool, *encode)
            else:
                prompt = await run_in_threadpool(*encode)
        except PixtralError as exc:
            raise from_pixtral_error(exc, param="messages") from None
        try:
            stream = engine.submit(prompt, params)
        except PixtralError as exc:
            raise from_pixtral_error(exc) from None
        meta = ResponseMeta(config.model_name)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(sse(stream, meta, include_usage, engine.processor, metrics, constraints),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        out = await result_unless_disconnected(request, stream)
        if out is None:
            return Response(status_code=499)  # nobody is listening any more
        if out.finished:
            metrics.observe_finished(out)
        if out.error:
            raise APIError(400 if out.error_code == "invalid_request" else 500, out.error,
                           code=out.error_code or "internal_error")
        return JSONResponse(completion_response(meta, out, engine.processor, constraints))

    @app.post("/v1/completions")
    async def text_completions(request: Request) -> Response:
        check_auth(request)
        engine = state.require_engine()
        req = parse_request(await read_json(request, config.max_request_bytes, config.body_timeout_s),
                            completions.CompletionRequest)
        check_model(req.model)
        req.unsupported()
        prompts = req.prompts()
        try:
            params = req.sampling_params()
        except PixtralError as exc:
            raise from_pixtral_error(exc) from None
        try:  # every prompt encoded (in one trip to the thread pool) before any is submitted
            encoded = await run_in_threadpool(
                lambda: [completions.encode_prompt(engine.processor, p, engine.max_model_len) for p in prompts])
        except PixtralError as exc:
            raise from_pixtral_error(exc, param="prompt") from None
        streams: list[RequestStream] = []
        try:
            for prompt in encoded:
                streams.append(engine.submit(prompt, params))
        except PixtralError as exc:
            for stream in streams:
                stream.abort()
            raise from_pixtral_error(exc, param="prompt") from None
        meta = ResponseMeta(config.model_name, prefix="cmpl")
        if req.stream:
            return StreamingResponse(completions.sse(streams, meta, req, prompts, engine.processor, metrics),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        outs = await results_unless_disconnected(request, streams)
        if outs is None:
            return Response(status_code=499)
        for out in outs:
            metrics.observe_finished(out)
        failed = next((out for out in outs if out.error), None)
        if failed is not None:
            raise APIError(400 if failed.error_code == "invalid_request" else 500, failed.error,
                           code=failed.error_code or "internal_error")
        return JSONResponse(completions.response(meta, req, prompts, outs, engine.processor))

    if config.web_page:
        from pixtral.server.web import add_web_routes, max_image_size

        def web_config(request: Request) -> dict[str, Any]:
            check_auth(request)
            engine = state.require_engine()  # 503 while loading: the page retries
            return {"model": config.model_name, "max_model_len": engine.max_model_len,
                    "max_image_size": max_image_size(engine.processor),
                    "max_image_pixels": config.image_policy.max_pixels,
                    "max_image_bytes": config.image_policy.max_bytes,
                    "max_images_per_request": config.max_images_per_request}

        add_web_routes(app, web_config)

    return app


# ---------------------------------------------------------------------- helpers
async def read_json(request: Request, limit: int, timeout_s: float = 60.0) -> dict[str, Any]:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {int(declared)} bytes, over the limit of {limit}",
                       code="request_too_large")
    try:
        body = await asyncio.wait_for(_read_body(request, limit), timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s", code="request_timeout") from None
    if not body.strip():
        raise APIError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        data = json.loads(body)  # a bytearray: no copy of a large body
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    del body
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    where = find_surrogate(data)
    if where is not None:
        raise APIError(400, f"'{where}': invalid Unicode (a lone surrogate, which UTF-8 cannot encode)",
                       code="invalid_request", param=where)
    return data


async def _read_body(request: Request, limit: int) -> bytearray:
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
    return body


_SURROGATE = re.compile("[\ud800-\udfff]")


def find_surrogate(value: Any, path: str = "") -> str | None:
    """The path of the first string (value or key) holding a lone surrogate, or None.

    JSON may spell one as an escape (\\ud800), and Python's JSON decoder lets it through; nothing
    downstream (tokenizer, URL parser, our JSON encoder) can take it.
    """
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return where or "body"
        elif isinstance(item, dict):
            for key, sub in item.items():
                here = f"{where}.{key}" if where else str(key)
                if _SURROGATE.search(key):
                    return encodable(here)
                stack.append((sub, here))
        elif isinstance(item, list):
            stack.extend((sub, f"{where}.{i}") for i, sub in enumerate(item))
    return None


def parse_request(body: dict[str, Any], kind: type[BaseModel] = ChatCompletionRequest) -> Any:
    try:
        return kind.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        # The path to the bad field, without pydantic's union-member tags ("str", "list[str]").
        where = ".".join(str(p) for p in first["loc"] if not _is_type_tag(p)) or "body"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise APIError(400, f"'{where}': {first['msg']}{more}", code="invalid_request", param=where) from None


def _is_type_tag(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "list", "dict"))


def event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def sse(stream: RequestStream, meta: ResponseMeta, include_usage: bool, processor,
              metrics: ServerMetrics, constraints: ChatConstraints | None = None) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams them: role, content pieces (or tool calls, see
    `ToolCallStream`), finish reason (each choice's chunks carry its `index`), [usage of every choice], [DONE]."""
    calls = ([ToolCallStream(constraints) for _ in range(stream.params.n)]
             if constraints is not None and constraints.parses_calls else None)
    try:
        for index in range(stream.params.n):
            yield event(chunk(meta, {"role": "assistant", "content": ""}, index=index))
        total = RequestOutput.start(stream.request_id, stream.prompt.token_ids, False, stream.params.n)
        async for delta in stream:
            total.add(delta)
            if total.finished:  # every choice (once: the stream ends with it)
                metrics.observe_finished(total)
            if delta.error:
                status = 400 if delta.error_code == "invalid_request" else 500
                yield event(error_body(status, delta.error, code=delta.error_code or "internal_error"))
                break
            finish_reason = delta.finish_reason
            logprobs = {"content": logprobs_content(processor, delta.logprobs)} if delta.logprobs else None
            if calls is not None:  # text as it comes, or tool calls once the choice ends
                pieces = calls[delta.index].push(delta.token_ids, delta.text)
                if delta.finished:
                    more, finish_reason = calls[delta.index].finish(delta.finish_reason)
                    pieces += more
                for piece in pieces:
                    yield event(chunk(meta, piece, logprobs=logprobs if "content" in piece else None,
                                      index=delta.index))
            elif delta.text or delta.logprobs:
                yield event(chunk(meta, {"content": delta.text}, logprobs=logprobs, index=delta.index))
            if delta.finished:
                yield event(chunk(meta, {}, finish_reason=finish_reason, index=delta.index))
        if include_usage and total.finished and not total.error:
            yield event(usage_chunk(meta, total))
        yield "data: [DONE]\n\n"
    except PixtralError as exc:  # the engine stopped under us
        api = from_pixtral_error(exc)
        yield event(api.body())
        yield "data: [DONE]\n\n"
    finally:
        stream.abort()  # no-op when finished; frees the KV blocks of a client that went away


async def result_unless_disconnected(request: Request, stream: RequestStream) -> RequestOutput | None:
    """Wait for the whole answer, but give up (and abort the request) if the client disconnects."""
    outs = await results_unless_disconnected(request, [stream])
    return None if outs is None else outs[0]


async def results_unless_disconnected(request: Request, streams: list[RequestStream]) -> list[RequestOutput] | None:
    """Wait for every stream's whole answer, but give up (and abort them all) if the client disconnects."""
    task = asyncio.ensure_future(asyncio.gather(*(stream.result() for stream in streams)))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    except PixtralError as exc:
        raise from_pixtral_error(exc) from None
    finally:
        if not task.done():
            task.cancel()
        for stream in streams:
            stream.abort()
