"""`create_app(client, settings, tokenizer)`: the FastAPI application. Routes, API-key check, body limits and the
HTTP metrics middleware; the engine client is injected and started/stopped by the lifespan."""

from __future__ import annotations

import hmac
import importlib.metadata
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import EngineClient
from server import openapi
from server.errors import APIError, bad_request, install_handlers, to_api_error
from server.generation import Context, serve
from server.metrics import CONTENT_TYPE, ServerMetrics
from server.profiles import ProfileTable
from server.schemas import ChatCompletionRequest, CompletionRequest, GenerationBody
from server.settings import Settings
from server.text import Tokenizer
from server.version import version_info
from server.warmup import warm_up

MAX_REQUEST_ID = 128
DESCRIPTION = (
    "OpenAI-compatible completions with AutoJudge lossy speculative decoding: a draft model proposes tokens, the "
    "target verifies them, and a learned judge head of the request's task profile accepts the mismatches that do "
    "not change the answer. The extension fields (task_profile, judge_threshold, num_speculative_tokens, "
    "speculative_window, speculative, spec_metrics) choose the lossiness per request."
)

log = logging.getLogger("autojudge.server")


def create_app(
    client: EngineClient,
    settings: Settings,
    tokenizer: Tokenizer,
    metrics: ServerMetrics | None = None,
    draining: Callable[[], bool] = lambda: False,
) -> FastAPI:
    """`draining()`: a shutdown has begun; /ready answers 503 even while requests are still admitted."""
    info = client.info()
    metrics = metrics or ServerMetrics(info, client.load, vllm_names=settings.vllm_metrics)
    ctx = Context(
        client,
        info,
        tokenizer,
        ProfileTable.from_info(info, settings.default_profile),
        metrics,
        settings.request_timeout,
        settings.spec_metrics,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await client.start()
        seconds = await warm_up(ctx)
        log.info("warm-up generation (profiles %s) took %.2f s", ", ".join(ctx.profiles.profiles), seconds)
        yield
        await client.shutdown(settings.shutdown_timeout)

    app = FastAPI(
        title="AutoJudge",
        version=importlib.metadata.version("autojudge-server"),
        lifespan=lifespan,
        docs_url="/docs" if settings.docs else None,
        redoc_url=None,
    )
    openapi.install(app, info, settings.api_key is not None, DESCRIPTION)
    install_handlers(app)
    app.add_middleware(HTTPMetrics, metrics=metrics)

    @app.get("/health", response_class=Response, responses=openapi.errors(503), description="200, no body: alive")
    async def health() -> Response:
        h = client.health()
        if not h.healthy:
            raise APIError(503, f"the engine failed: {h.error}", "overloaded_error", None, "engine_unhealthy")
        return Response(status_code=200)

    @app.get("/ready", response_model=openapi.Ready, responses=openapi.errors(503))
    async def ready() -> dict[str, Any]:
        h = client.health()
        if draining() or not (h.healthy and h.accepting):
            raise APIError(503, "the server is not accepting requests", "overloaded_error", None, "not_ready")
        return {"status": "ready", "num_requests": h.num_requests}

    @app.get("/metrics", response_class=PlainTextResponse, description="Prometheus text exposition")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    about = version_info(info)

    @app.get("/version", response_model=openapi.Version)
    async def version() -> dict[str, Any]:
        return about

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(api_key_check(settings.api_key))])

    @v1.get("/models", response_model=openapi.ModelList, responses=openapi.errors(401))
    async def models() -> dict[str, Any]:
        card = {"id": info.model_name, "object": "model", "created": 0, "owned_by": "autojudge"}
        card["max_model_len"] = info.max_model_len
        return {"object": "list", "data": [card], "profiles": profile_list(ctx)}

    @v1.get("/profiles", response_model=openapi.ProfileList, responses=openapi.errors(401))
    async def profiles() -> dict[str, Any]:
        return {"object": "list", "default": ctx.profiles.default, "data": profile_list(ctx)}

    async def generate(request: Request, kind: type[GenerationBody]) -> Any:
        try:
            body = await parse(request, kind, settings.max_body_bytes)
            return await serve(ctx, body, *request_id(request), request.receive)
        except APIError:
            raise
        except Exception as e:  # engine refusals and faults become their status here, not in the error middleware
            raise to_api_error(e) from e

    @v1.post(
        "/completions",
        response_model=None,
        responses=openapi.generation_responses(openapi.Completion, openapi.CompletionChunk),
        openapi_extra=openapi.request_body(CompletionRequest),
    )
    async def completions(request: Request) -> Any:
        return await generate(request, CompletionRequest)

    @v1.post(
        "/chat/completions",
        response_model=None,
        responses=openapi.generation_responses(openapi.ChatCompletion, openapi.ChatCompletionChunk),
        openapi_extra=openapi.request_body(ChatCompletionRequest),
    )
    async def chat(request: Request) -> Any:
        return await generate(request, ChatCompletionRequest)

    app.include_router(v1)
    return app


def profile_list(ctx: Context) -> list[dict[str, Any]]:
    out = []
    for p in ctx.profiles.profiles.values():
        entry = asdict(p)
        entry["threshold_table"] = [dict(row) for row in p.threshold_table]
        entry["num_speculative_tokens"] = ctx.profiles.default_width(p)
        entry["default"] = p.name == ctx.profiles.default
        out.append(entry)
    return out


def api_key_check(key: str | None) -> Any:
    async def check(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # NOTE: compare_digest takes time independent of where the strings differ.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "invalid or missing API key", "authentication_error", None, "invalid_api_key")

    return check


def request_id(request: Request) -> tuple[str | None, dict[str, str]]:
    """An acceptable `X-Request-Id` becomes the engine request id and is echoed back."""
    given = request.headers.get("x-request-id")
    if given and len(given) <= MAX_REQUEST_ID and given.isascii() and given.isprintable():
        return given, {"X-Request-Id": given}
    return None, {}


async def parse(request: Request, model: type[GenerationBody], limit: int) -> GenerationBody:
    raw = await read_body(request, limit)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request("the request body is not valid UTF-8", None, "invalid_encoding") from e
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise to_api_error(e) from e


async def read_body(request: Request, limit: int) -> bytes:
    too_large = APIError(413, f"the request body exceeds {limit} bytes", "invalid_request_error", None, "too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large
        chunks.append(part)
    return b"".join(chunks)


class HTTPMetrics:
    """Counts and times every HTTP request by route template (bounded), method and status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            handler = getattr(route, "path", "other")
            self.metrics.observe_http(handler, scope["method"], status, time.perf_counter() - start)
