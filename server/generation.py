"""One completion or chat request end to end: wire body -> engine `Request` (validation, tokens, profile), then
the engine's outputs -> a JSON response or SSE chunks, with usage and the `metrics` block; releases on every path."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from engine import (
    EngineClient,
    EngineInfo,
    EngineShutdownError,
    Request,
    RequestOutput,
    RequestStream,
    SamplingParams,
    SpecCounts,
)
from server.errors import APIError, bad_request, to_api_error
from server.metrics import RequestTracker, ServerMetrics
from server.profiles import ProfileTable, Resolved
from server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationBody,
    judge_block,
    speculative_decoding,
    usage,
)
from server.text import TextStream, Tokenizer, encode_chat

T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's status for a request the client abandoned; it never reaches the client


@dataclass(frozen=True)
class Context:
    """What every generation request needs; built once by `create_app`."""

    client: EngineClient
    info: EngineInfo
    tokenizer: Tokenizer
    profiles: ProfileTable
    metrics: ServerMetrics
    request_timeout: float
    spec_metrics: str = "summary"  # of requests that ask for none
    clock: Callable[[], float] = time.perf_counter


@dataclass
class Job:
    """A request admitted to the engine, and what its response is being built from."""

    ctx: Context
    chat: bool
    body: GenerationBody
    request: Request
    resolved: Resolved
    text: TextStream
    tracker: RequestTracker
    response_id: str
    created: int
    stream: RequestStream | None = None
    num_output: int = 0
    finish_reason: str | None = None
    final: RequestOutput | None = None
    cycles: list[SpecCounts] | None = None  # each speculation cycle, kept for "detailed" stats only
    ended: bool = field(default=False)

    def end(self, reason: str) -> None:
        """Release the engine slot (abort if still running) and record the request, once."""
        if self.ended:
            return
        self.ended = True
        if self.stream is not None:
            self.stream.close()
        self.tracker.finish(reason, self.num_output, self.stream.admitted_at if self.stream else None)


def prepare(ctx: Context, body: GenerationBody, request_id: str | None) -> tuple[Request, Resolved, int]:
    """Validate and tokenize; returns the engine request, the resolved profile and the prompt length."""
    body.check_supported()
    if body.model is not None and body.model != ctx.info.model_name:
        raise APIError(404, f"model {body.model!r} is not served here", "not_found_error", "model", "model_not_found")
    ids, param = prompt_ids(ctx, body)
    limit = ctx.info.max_model_len
    if len(ids) >= limit:
        raise bad_request(
            f"the prompt has {len(ids)} tokens; the context limit is {limit}", param, "context_length_exceeded"
        )
    assert isinstance(body, CompletionRequest | ChatCompletionRequest)
    max_tokens = body.requested_max_tokens()
    if max_tokens is None:
        max_tokens = limit - len(ids)
    elif len(ids) + max_tokens > limit:
        raise bad_request(
            f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the context limit {limit}",
            "max_tokens",
            "context_length_exceeded",
        )
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(body.top_k or 0, 0),
        seed=body.seed,
        stop=body.stop_strings(),
    )
    resolved = ctx.profiles.resolve(
        body.task_profile, body.judge_threshold, body.num_speculative_tokens, body.speculative, body.speculative_window
    )
    rid = request_id or f"req-{uuid.uuid4().hex}"
    return Request(rid, tuple(ids), sampling, resolved.spec, arrival_time=ctx.clock()), resolved, len(ids)


def prompt_ids(ctx: Context, body: GenerationBody) -> tuple[list[int], str]:
    if isinstance(body, ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        return encode_chat(ctx.tokenizer, messages), "messages"
    assert isinstance(body, CompletionRequest)
    if isinstance(body.prompt, str):
        return list(ctx.tokenizer.encode(body.prompt)), "prompt"
    if max(body.prompt) >= ctx.info.vocab_size:
        raise bad_request(f"prompt token ids must be in [0, {ctx.info.vocab_size})", "prompt")
    return list(body.prompt), "prompt"


async def serve(
    ctx: Context, body: GenerationBody, request_id: str | None, headers: dict[str, str], receive: Receive
) -> Any:
    """Admit the request (refusals become 4xx/5xx before any byte is sent), then answer or stream. `receive` is
    the ASGI channel, already drained of the body: its next message tells that the client went away."""
    request, resolved, num_prompt = prepare(ctx, body, request_id)
    chat = isinstance(body, ChatCompletionRequest)
    job = Job(
        ctx,
        chat,
        body,
        request,
        resolved,
        TextStream(ctx.tokenizer, request.sampling.stop),
        ctx.metrics.track(resolved.spec.profile, num_prompt),
        f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        int(time.time()),
        cycles=[] if (body.spec_metrics or ctx.spec_metrics) == "detailed" else None,
    )
    job.stream = await ctx.client.generate(request)  # a refusal is answered (429, 503, ...), not recorded
    if body.stream:
        return EventStream(sse(job), job, headers=headers)
    try:
        text = await unless_disconnected(collect_text(job), receive)
    except BaseException as e:
        job.end(failure_reason(e))
        raise
    if text is None:
        job.end("abort")
        return Response(status_code=CLIENT_CLOSED)
    job.end(job.finish_reason or "error")
    return JSONResponse(response(job, text), headers=headers)


async def collect_text(job: Job) -> str:
    return "".join([delta async for delta, _ in outputs(job)])


async def unless_disconnected(work: Coroutine[Any, Any, T], receive: Receive) -> T | None:
    """`work`'s result, or None as soon as the client disconnects (`work` is then cancelled). A non-streaming
    request otherwise holds its slot until it finishes, since nothing is sent that could fail."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected(receive))
    try:
        done, _ = await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()  # no-op once done
        watcher.cancel()
    if task in done:
        return task.result()
    await asyncio.wait((task,))  # let the cancelled work unwind before the slot is released
    return None


async def disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def failure_reason(exc: BaseException) -> str:
    """`finished_reason` of a request that did not finish: the server stopped it (abort) or it failed (error)."""
    return "abort" if isinstance(exc, TimeoutError | EngineShutdownError | asyncio.CancelledError) else "error"


async def outputs(job: Job) -> AsyncIterator[tuple[str, RequestOutput]]:
    """Text deltas as the engine produces them, under the request deadline."""
    assert job.stream is not None
    deadline = asyncio.get_running_loop().time() + job.ctx.request_timeout
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                out = await anext(job.stream)
        except StopAsyncIteration:
            return
        if out.new_token_ids:
            job.tracker.on_tokens()
        if job.cycles is not None and out.cycle is not None:
            job.cycles.append(out.cycle)
        job.num_output = out.num_output_tokens
        if out.finished:
            job.finish_reason, job.final = out.finish_reason, out
        yield job.text.push(out.new_token_ids, out.finished), out


class EventStream(StreamingResponse):
    """SSE response that releases the request however the response ends (a disconnect cancels the body)."""

    def __init__(self, content: AsyncIterator[str], job: Job, headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.end("abort")  # no-op when the stream already ended it


def event(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


async def sse(job: Job) -> AsyncIterator[str]:
    body = job.body
    continuous = body.stream_options is not None and body.stream_options.continuous_usage_stats
    if job.chat:
        yield event(chunk(job, {"role": "assistant", "content": ""}, None))
    try:
        async for delta, out in outputs(job):
            if not delta and not out.finished:
                continue
            data = chunk(job, {"content": delta} if job.chat else delta, out.finish_reason if out.finished else None)
            if continuous:
                data["usage"] = usage(out.num_prompt_tokens, out.num_output_tokens)
            if out.finished and not body.include_usage and (m := metrics_block(job)) is not None:
                data["metrics"] = m
            yield event(data)
        if body.include_usage:
            final = {**chunk(job, None, None), "choices": [], "usage": final_usage(job)}
            if (m := metrics_block(job)) is not None:
                final["metrics"] = m
            yield event(final)
        job.end(job.finish_reason or "error")
    except Exception as e:  # after the 200 headers: one error event, then [DONE]
        job.end(failure_reason(e))
        yield event(to_api_error(e).body())
    yield event("[DONE]")


def chunk(job: Job, delta: dict[str, str] | str | None, finish_reason: str | None) -> dict[str, Any]:
    if job.chat:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}
    kind = "chat.completion.chunk" if job.chat else "text_completion"
    return {"id": job.response_id, "object": kind, "created": job.created, "model": job.ctx.info.model_name,
            "choices": [choice]}  # fmt: skip


def response(job: Job, text: str) -> dict[str, Any]:
    if job.chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
    else:
        choice = {"index": 0, "text": text}
    choice |= {"logprobs": None, "finish_reason": job.finish_reason}
    out = {
        "id": job.response_id,
        "object": "chat.completion" if job.chat else "text_completion",
        "created": job.created,
        "model": job.ctx.info.model_name,
        "choices": [choice],
        "usage": final_usage(job),
    }
    if (m := metrics_block(job)) is not None:
        out["metrics"] = m
    return out


def final_usage(job: Job) -> dict[str, Any]:
    cached = job.final.num_cached_tokens if job.final is not None else 0
    return usage(len(job.request.prompt_token_ids), job.num_output, cached)


def windows(final: RequestOutput | None) -> tuple[int, ...]:
    return () if final is None else final.windows


def metrics_block(job: Job) -> dict[str, Any] | None:
    if (job.body.spec_metrics or job.ctx.spec_metrics) == "none":
        return None
    counts = job.final.spec if job.final is not None else None
    spec = job.resolved.spec
    width = job.resolved.width
    return {
        "speculative_decoding": (
            speculative_decoding(counts, width, job.cycles, windows(job.final), job.resolved.auto)
            if counts is not None
            else None
        ),
        "judge": judge_block(
            counts,
            spec.profile,
            spec.judge_threshold,
            width,
            job.ctx.info.bonus_token,
            job.num_output,
            job.resolved.head_sha256,
        ),
    }
