"""Wire models: the completion and chat request bodies (strict pydantic, validated from the raw JSON) and the
builders of response objects, stream chunks and the per-request `metrics` block."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from engine import SpecCounts
from server.errors import bad_request

MAX_STOP_STRINGS = 16

# Fields OpenAI defines that speculative verification does not support yet (serving.md §2): a clear 400 when
# a request asks for them with a non-default value, instead of silently ignoring them.
UNSUPPORTED_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "min_p": (None, 0, 0.0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "echo": (None, False),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "audio": (None,),
    "modalities": (None, ["text"]),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = Field(False, description="send a last chunk with the usage and the `metrics` block")
    continuous_usage_stats: bool = Field(False, description="put the running usage on every chunk")


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# JSON Schema's integer: 4 and 4.0 alike (JSON has one number type), never "4" or 4.5. It goes after an int's
# bounds, so that they reach the document as minimum/maximum.
Integral = BeforeValidator(_integral)


class ResponseFormat(BaseModel):
    """Plain text only: JSON modes are not supported with speculative verification yet."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]


MaxTokens = Annotated[int, Field(ge=1), Integral] | None
TokenId = Annotated[int, Field(ge=0), Integral]
StopString = Annotated[str, Field(min_length=1)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]


class GenerationBody(BaseModel):
    """Fields shared by both endpoints, including our extensions (sent by the OpenAI SDK through `extra_body`).
    Unknown fields are accepted and ignored, except OpenAI's that this server does not support with a value
    other than their default (`n`, `best_of`, `logprobs`, `logit_bias`, `tools`, ...): those are a 400."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    model: str | None = Field(None, description="the served model id (`GET /v1/models`); any other is a 404")
    max_tokens: MaxTokens = Field(None, description="tokens to generate at most; default: up to the context limit")
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = Field(None, description="default 1; 0 is greedy")
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(None, description="nucleus sampling; default 1")
    # -1 or 0: disabled (vLLM accepts both)
    top_k: Annotated[int, Field(ge=-1), Integral] | None = Field(None, description="keep the k likeliest; -1 or 0: off")
    seed: Annotated[int, Field(ge=0, lt=2**63), Integral] | None = Field(None, description="reproducible sampling")
    stop: Stop | None = Field(None, description=f"up to {MAX_STOP_STRINGS} non-empty strings that end the text")
    stream: bool = Field(False, description="answer with server-sent events (`text/event-stream`) chunks")
    stream_options: StreamOptions | None = None
    user: str | None = None
    task_profile: str | None = Field(
        None, description="AutoJudge task profile (`GET /v1/profiles`): its judge head, threshold and window"
    )
    judge_threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        None,
        description="the judge accepts a mismatch whose importance score is below this; higher is lossier. "
        "Default: the profile's. Ignored by `lossless`",
    )
    num_speculative_tokens: Annotated[int, Field(ge=0), Integral] | None = Field(
        None,
        description="window W: draft tokens per cycle, at most the server's `max_speculative_tokens` (see "
        "`/version`); 0 decodes without drafting. With automatic windows it is the cap of the planner's choice. "
        "Default: the profile's, else the server's",
    )
    speculative_window: Literal["auto", "fixed"] | None = Field(
        None,
        description="`fixed`: draft W tokens every cycle; `auto`: the cost model picks each step's window in "
        "[0, W] (needs a server started with `--num-speculative-tokens auto`). Default: the server's",
    )
    speculative: bool | None = Field(None, description="false: plain decoding for this request. Default: true")
    spec_metrics: Literal["none", "summary", "detailed"] | None = Field(
        None,
        description="the response's `metrics` block: none, per-request summary, or summary plus every cycle. "
        "Default: the server's `--spec-metrics`",
    )
    response_format: ResponseFormat | None = None

    def check_supported(self) -> None:
        extra = self.model_extra or {}
        for name, defaults in UNSUPPORTED_DEFAULTS.items():
            if name in extra and not any(extra[name] == d and type(extra[name]) is type(d) for d in defaults):
                raise bad_request(f"{name} is not supported by this server", name, "unsupported_parameter")

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(GenerationBody):
    """`POST /v1/completions`."""

    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[int, Field(ge=0), Integral]], Field(min_length=1)]
    ) = Field(description="text, or token ids of the served model's vocabulary; one prompt")

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(GenerationBody):
    """`POST /v1/chat/completions`: the messages are rendered with the model's chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: MaxTokens = Field(None, description="OpenAI's newer name of max_tokens; wins over it")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --- responses ----------------------------------------------------------------------------------------


def usage(num_prompt: int, num_output: int, num_cached: int | None = None) -> dict[str, Any]:
    """OpenAI's usage object; a finished request's also says how many prompt tokens came from a retained slot."""
    out: dict[str, Any] = {"prompt_tokens": num_prompt, "completion_tokens": num_output}
    out["total_tokens"] = num_prompt + num_output
    if num_cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": num_cached}
    return out


def speculative_decoding(
    counts: SpecCounts, width: int, cycles: list[SpecCounts] | None, windows: tuple[int, ...], auto: bool
) -> dict[str, Any]:
    """vLLM's per-request schema; mean acceptance length is `1 + accepted / cycles` (vLLM's definition). With
    `cycles` ("detailed"), the accepted and drafted counts of each cycle too. `windows[W]` counts the engine steps
    this request ran at window W (0: not drafting), which `auto` chooses per step up to `width`."""
    steps = counts.num_spec_steps
    # accepted_per_pos[i] counts cycles that kept draft i, i.e. that accepted more than i drafts.
    at_least = [steps, *counts.accepted_per_pos[:width], 0]
    at_least += [0] * (width + 2 - len(at_least))
    out: dict[str, Any] = {
        "num_spec_steps": steps,
        "num_draft_tokens": counts.num_draft_tokens,
        "num_accepted_draft_tokens": counts.num_accepted_tokens,
        "draft_acceptance_rate": counts.draft_acceptance_rate,
        "mean_acceptance_length": 1 + counts.num_accepted_tokens / steps if steps else 0.0,
        "acceptance_histogram": [at_least[j] - at_least[j + 1] for j in range(width + 1)],
        "window": "auto" if auto else "fixed",
        "window_histogram": list(windows),
    }
    if cycles is not None:
        out["per_step_accepted"] = [c.num_accepted_tokens for c in cycles]
        out["per_step_drafted"] = [c.num_draft_tokens for c in cycles]
    return out


def judge_block(
    counts: SpecCounts | None,
    profile: str,
    tau: float,
    width: int,
    bonus: bool,
    num_output: int,
    head_sha256: str | None,
) -> dict[str, Any]:
    c = counts or SpecCounts()
    return {
        "task_profile": profile,
        "judge_threshold": tau,
        "num_speculative_tokens": width,
        "bonus_token": bonus and width > 0,
        "num_judged": c.num_judged,
        "num_judge_accepted_tokens": c.num_judge_accepted,
        "num_recovered_tokens": c.num_recovered,
        "num_bonus_tokens": c.num_bonus,
        "mean_tokens_per_cycle": c.mean_acceptance_length,
        "lossy_fraction": c.num_judge_accepted / num_output if num_output else 0.0,
        "judge_head_sha256": head_sha256,
    }
