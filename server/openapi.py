"""The published API contract (`GET /openapi.json`): the response models of every route, their error statuses,
and the document assembled from them and from the request models that validate the bodies (server/schemas.py).

The response models describe what the builders in server/schemas.py and server/generation.py produce; they
forbid unknown fields, so a field added to a response without being documented here fails the contract tests."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from engine import EngineInfo
from server.schemas import ChatCompletionRequest, CompletionRequest

REF = "#/components/schemas/{model}"
FinishReason = Literal["stop", "length", "abort"]


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- errors ---------------------------------------------------------------------------------------------


class ErrorDetail(Closed):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, ...")
    param: str | None = Field(description="the request field at fault, if one is")
    code: str | None = Field(description="a stable machine-readable reason, e.g. context_length_exceeded")


class ErrorResponse(Closed):
    """OpenAI's error body; also the last event of a stream that failed after its first chunk."""

    error: ErrorDetail


ERRORS: dict[int, str] = {
    400: "invalid request: a field's type or range, an unknown profile, an unsupported OpenAI parameter",
    401: "missing or wrong API key (`Authorization: Bearer <key>`)",
    404: "unknown model or route",
    413: "the request body is larger than the server's `--max-body-bytes`",
    429: "the waiting queue is full; retry after `Retry-After` seconds",
    500: "this request failed in the engine (code `request_failed`: its logits were not finite), or an unexpected "
    "error",
    503: "the server is starting, draining or its engine failed",
    504: "the request did not finish within the server's `--request-timeout`",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse, "description": ERRORS[s]} for s in statuses}


# --- generation -----------------------------------------------------------------------------------------


class PromptTokensDetails(Closed):
    cached_tokens: int = Field(description="prompt tokens whose K/V a slot still held from an earlier request")


class Usage(Closed):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = Field(
        None, description="on the response and the final usage chunk (not on continuous_usage_stats chunks)"
    )


class SpeculativeDecoding(Closed):
    """vLLM's per-request speculation statistics, plus the windows the planner chose."""

    num_spec_steps: int = Field(description="verify cycles")
    num_draft_tokens: int
    num_accepted_draft_tokens: int = Field(description="draft tokens kept, exact matches and judge-accepted")
    draft_acceptance_rate: float
    mean_acceptance_length: float = Field(description="1 + accepted / cycles")
    acceptance_histogram: list[int] = Field(description="[j]: cycles that kept exactly j draft tokens")
    window: Literal["auto", "fixed"]
    window_histogram: list[int] = Field(description="[W]: engine steps this request ran at window W (0: none)")
    per_step_accepted: list[int] | None = Field(None, description='each cycle, with spec_metrics "detailed"')
    per_step_drafted: list[int] | None = Field(None, description='each cycle, with spec_metrics "detailed"')


class Judge(Closed):
    """What the AutoJudge profile did for this request."""

    task_profile: str
    judge_threshold: float
    num_speculative_tokens: int = Field(description="the window W used (the cap with automatic windows)")
    bonus_token: bool
    num_judged: int = Field(description="mismatches the judge head scored")
    num_judge_accepted_tokens: int = Field(description="mismatched draft tokens the judge accepted")
    num_recovered_tokens: int
    num_bonus_tokens: int
    mean_tokens_per_cycle: float
    lossy_fraction: float = Field(description="judge-accepted tokens / output tokens")
    judge_head_sha256: str | None


class RequestMetrics(Closed):
    """Per-request statistics (`spec_metrics`); absent with `spec_metrics: none`."""

    speculative_decoding: SpeculativeDecoding | None = Field(description="null when the request did not draft")
    judge: Judge


class CompletionChoice(Closed):
    index: int
    text: str
    logprobs: None
    finish_reason: FinishReason | None


class Completion(Closed):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    metrics: RequestMetrics | None = None


class AssistantMessage(Closed):
    role: Literal["assistant"]
    content: str


class ChatChoice(Closed):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: FinishReason | None


class ChatCompletion(Closed):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    metrics: RequestMetrics | None = None


class CompletionChunk(Closed):
    """One `data:` event of a streamed completion. The last chunk carries `metrics` (with `include_usage`, an
    extra chunk with no choices carries `usage` and `metrics`); `data: [DONE]` ends the stream."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]  # a chunk's text is the new text only
    usage: Usage | None = None
    metrics: RequestMetrics | None = None


class Delta(Closed):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Closed):
    index: int
    delta: Delta
    logprobs: None
    finish_reason: FinishReason | None


class ChatCompletionChunk(Closed):
    """One `data:` event of a streamed chat completion; the first carries the role. As for completions."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    metrics: RequestMetrics | None = None


def event_stream(chunk: type[BaseModel]) -> dict[str, Any]:
    """Each server-sent event (OpenAPI 3.1 reads `schema` of an event stream per event): `data:` holds a chunk,
    or the error that ended the stream, then the literal `[DONE]`."""
    payload = {"anyOf": [{"$ref": REF.format(model=m)} for m in (chunk.__name__, "ErrorResponse")]}
    data = {"anyOf": [{"const": "[DONE]"}, {"type": "string", "contentMediaType": "application/json",
                                              "contentSchema": payload}]}  # fmt: skip
    return {"schema": {"type": "object", "required": ["data"], "properties": {"data": data}}}


def generation_responses(reply: type[BaseModel], chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    ok = {
        "model": reply,
        "description": f"the {reply.__name__}; with `stream: true`, server-sent events: `data: <{chunk.__name__}>` "
        "each, an ErrorResponse event if the request fails after the first, then `data: [DONE]`",
        "content": {"text/event-stream": event_stream(chunk)},
    }
    return {200: ok} | errors(400, 401, 404, 413, 429, 500, 503, 504)


# --- information ----------------------------------------------------------------------------------------


class ThresholdRow(BaseModel):
    model_config = ConfigDict(extra="allow")  # the head's fit table: quantile, threshold, accept fraction, ...


class Profile(Closed):
    """A task profile: a judge head (none for `lossless`) with its default threshold and window."""

    name: str
    judge_threshold: float
    head_sha256: str | None
    layout: str | None = Field(description="the head's feature layout")
    num_speculative_tokens: int = Field(description="the window W this profile drafts by default")
    description: str
    thresholds: list[float] = Field(description="the head's validation-score quantiles, ascending")
    threshold_table: list[ThresholdRow]
    default: bool = Field(description="used by requests that name no task_profile")


class ModelCard(Closed):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(Closed):
    object: Literal["list"]
    data: list[ModelCard]
    profiles: list[Profile]


class ProfileList(Closed):
    object: Literal["list"]
    default: str
    data: list[Profile]


class Ready(Closed):
    status: Literal["ready"]
    num_requests: int = Field(description="requests running or waiting")


class Speculation(Closed):
    window: Literal["auto", "fixed"]
    default_speculative_tokens: int
    max_speculative_tokens: int
    draft_shares_kv: bool = Field(description="the draft, an int8 copy of the target, reads the target's K/V")
    step_cost: dict[str, Any] | None = Field(description="the planner's step-cost profile: seconds per forward")


class Version(Closed):
    version: str
    git_commit: str | None
    model: str
    draft: str | None
    judge_heads: dict[str, str] = Field(description="profile -> sha256 of its judge head")
    speculation: Speculation


# Not a route's declared body or return value, so FastAPI does not list them itself.
BODIES: tuple[type[BaseModel], ...] = (CompletionRequest, ChatCompletionRequest)
UNREFERENCED: tuple[tuple[type[BaseModel], JsonSchemaMode], ...] = (
    *((m, "validation") for m in BODIES),
    (CompletionChunk, "serialization"),
    (ChatCompletionChunk, "serialization"),
)


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` of a route that validates its raw body with `model` itself (server/app.py `parse`)."""
    ref = {"$ref": REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def branch(field: dict[str, Any], kind: str) -> dict[str, Any]:
    """The `kind` member of an optional or union field's `anyOf`."""
    return next(s for s in field["anyOf"] if s.get("type") == kind)


def install(app: FastAPI, info: EngineInfo, api_key: bool, description: str) -> None:
    """Serve the document at `/openapi.json`: FastAPI's, plus the models it cannot see (the bodies are parsed by
    hand for the size limit and OpenAI-style errors; stream chunks are not a route's return value), with this
    server's window limit and vocabulary."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=description, routes=app.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            _, extra = models_json_schema(UNREFERENCED, ref_template=REF)
            for name, schema in extra["$defs"].items():
                schemas.setdefault(name, schema)  # a model FastAPI listed too: the same, minus null defaults
            for model in BODIES:
                fields = schemas[model.__name__]["properties"]
                branch(fields["num_speculative_tokens"], "integer")["maximum"] = info.max_speculative_tokens
                if "prompt" in fields:
                    branch(fields["prompt"], "array")["items"]["maximum"] = info.vocab_size - 1
            if api_key:
                doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, ops in doc["paths"].items():
                for op in ops.values() if path.startswith("/v1/") else ():
                    if api_key:
                        op["security"] = [{"bearer": []}]
                    else:
                        op["responses"].pop("401")  # no key, no 401
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
