"""One request: its body, sent as an SSE stream or a plain POST, timed (TTFT, ITL, e2e), with its usage and
`metrics` block, or its failure classified by kind."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadtest.config import LoadConfig
from loadtest.result import RequestResult
from loadtest.sse import MalformedEvent, as_dict, error_message, parse_event, payloads


@dataclass(frozen=True)
class Target:
    """What every request of a run shares: the route, the body besides prompt and seed, and the time limit."""

    path: str
    body: dict[str, Any]
    stream: bool
    timeout: float
    seed: int

    @classmethod
    def of(cls, cfg: LoadConfig, model: str) -> Target:
        body: dict[str, Any] = {"model": model, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature}
        if cfg.stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        # Extension fields only when asked for: another server may refuse fields it does not know.
        extensions = {
            "task_profile": cfg.task_profile,
            "judge_threshold": cfg.judge_threshold,
            "num_speculative_tokens": cfg.num_speculative_tokens,
            "speculative_window": cfg.speculative_window,
        }
        body |= {k: v for k, v in extensions.items() if v is not None}
        path = "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions"
        return cls(path, body, cfg.stream, cfg.timeout, cfg.seed)


class Failure(Exception):
    """A request that failed in a way this module names: `kind` is the report's error kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Reading:
    """What has arrived of one response so far."""

    start: float
    ttft: float | None = None
    last: float = 0.0
    itl: list[float] = field(default_factory=list)
    chunks: int = 0
    usage: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    end: float | None = None  # when the response was complete: [DONE], or the plain body read

    def on_text(self, now: float) -> None:
        if self.ttft is None:
            self.ttft = now - self.start
        else:
            self.itl.append(now - self.last)
        self.last = now
        self.chunks += 1


async def send(http: httpx.AsyncClient, target: Target, prompt: dict[str, Any], index: int) -> RequestResult:
    """Request number `index` with the prompt fields `prompt`; each request gets its own seed, so sampling at
    temperature > 0 varies across requests yet repeats across runs."""
    body = {**target.body, **prompt, "seed": target.seed + index}
    reading = Reading(time.perf_counter())
    try:
        async with asyncio.timeout(target.timeout):
            await (read_stream if target.stream else read_plain)(http, target.path, body, reading)
    except Failure as e:
        return failed(index, reading, e.kind, str(e))
    except (httpx.ConnectError, httpx.ConnectTimeout) as e:
        return failed(index, reading, "connect", describe(e))
    except (TimeoutError, httpx.TimeoutException) as e:  # asyncio's (the whole request) or httpx's (one read)
        return failed(index, reading, "timeout", str(e) or f"not done within --timeout {target.timeout:g} s")
    except httpx.HTTPError as e:
        return failed(index, reading, "transport", describe(e))
    assert reading.end is not None  # both readers set it or fail
    e2e = reading.end - reading.start
    usage = reading.usage or {}
    prompt_tokens, completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(completion_tokens, int):
        output: tuple[int | None, str | None] = (completion_tokens, "usage")
    else:  # a server that ignores include_usage: each chunk counted as one token
        output = (reading.chunks, "chunks") if target.stream else (None, None)
    return RequestResult(
        index,
        reading.start,
        e2e,
        ttft=reading.ttft,
        itl=tuple(reading.itl),
        chunks=reading.chunks,
        prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) else None,
        output_tokens=output[0],
        output_tokens_source=output[1],
        metrics=reading.metrics,
    )


async def read_stream(http: httpx.AsyncClient, path: str, body: dict[str, Any], reading: Reading) -> None:
    async with http.stream("POST", path, json=body) as response:
        await check_status(response)
        async for data in payloads(response.aiter_lines()):
            if reading.end is not None:
                continue  # past [DONE]: read to the end so that the connection goes back to the pool
            try:
                event = parse_event(data)
            except MalformedEvent as e:
                raise Failure("bad_response", str(e)) from e
            if event.error is not None:
                raise Failure("stream_error", event.error)
            now = time.perf_counter()
            if event.done:
                reading.end = now
            elif event.text:
                reading.on_text(now)
            # With continuous usage stats every chunk has usage: the last one is the total.
            reading.usage = event.usage or reading.usage
            reading.metrics = event.metrics or reading.metrics
    if reading.end is None:
        raise Failure("stream_error", "the stream ended without data: [DONE]")


async def read_plain(http: httpx.AsyncClient, path: str, body: dict[str, Any], reading: Reading) -> None:
    response = await http.post(path, json=body)
    reading.end = time.perf_counter()
    await check_status(response)
    try:
        obj = response.json()
    except ValueError as e:
        raise Failure("bad_response", f"a body that is not JSON: {response.text[:120]!r}") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
        raise Failure("bad_response", f"a body without choices: {response.text[:120]!r}")
    reading.usage, reading.metrics = as_dict(obj.get("usage")), as_dict(obj.get("metrics"))


async def check_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    await response.aread()
    try:
        obj = response.json()
        message = error_message(obj) if isinstance(obj, dict) else None
    except ValueError:  # not JSON, or not UTF-8
        message = None
    raise Failure(f"http_{response.status_code}", message or response.text[:200] or response.reason_phrase)


def failed(index: int, reading: Reading, kind: str, message: str) -> RequestResult:
    return RequestResult(index, reading.start, time.perf_counter() - reading.start, kind, message)


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
