"""What one request measured: timings, token counts, the server's `metrics` block, or the kind of its failure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RequestResult:
    index: int  # the request's number in the run, warm-ups first
    start: float  # time.perf_counter() when it was sent
    e2e: float  # seconds from sending to the end of the response (or the failure)
    # A failure kind: `http_<status>`; `connect` (no connection); `timeout` (--timeout passed); `stream_error` (an
    # error event, or no [DONE]); `bad_response` (not an OpenAI object); `transport`; `cancelled` (cut at the end).
    error: str | None = None
    message: str | None = None  # what the server or the transport said about the failure
    ttft: float | None = None  # seconds to the first chunk with text (streams only)
    itl: tuple[float, ...] = ()  # seconds between consecutive chunks with text
    chunks: int = 0  # chunks with text
    prompt_tokens: int | None = None  # the server's usage, when it sent one
    output_tokens: int | None = None
    output_tokens_source: str | None = None  # "usage", "chunks" (a stream without usage), None (unknown)
    metrics: dict[str, Any] | None = None  # the server's per-request `metrics` block, as sent

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (output tokens - 1)."""
        if self.ttft is None or self.output_tokens is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)
