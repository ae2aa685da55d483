"""Boundary types of the engine: request parameters in, outputs and per-cycle statistics out (frozen values)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Temperatures below this decode greedily (vLLM's epsilon too): logits / 1e-308 overflow to inf, and the
# softmax of inf is NaN, which would fail the whole batch's step.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop. `temperature < GREEDY_BELOW` (0 included) is greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 keeps the whole vocabulary
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings; matched on detokenized output
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError("temperature must be in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 disables it)")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True, slots=True)
class SpecParams:
    """Per-request speculation: on/off, window W (None = engine default), judge profile and threshold τ."""

    enabled: bool = True
    num_speculative_tokens: int | None = None
    profile: str = "lossless"
    judge_threshold: float = 0.0  # τ: accept a mismatch when p_important < τ; 0 = lossless
    fixed_window: bool = False  # with the `auto` planner on: draft exactly the window every cycle anyway

    def __post_init__(self) -> None:
        if self.num_speculative_tokens is not None and not 0 <= self.num_speculative_tokens <= 64:
            raise ValueError("num_speculative_tokens must be in 0..64")
        if not 0.0 <= self.judge_threshold <= 1.0:
            raise ValueError("judge_threshold must be in [0, 1]")


@dataclass(frozen=True, slots=True)
class Request:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    spec: SpecParams = field(default_factory=SpecParams)
    arrival_time: float = 0.0

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("prompt must contain at least one token")


@dataclass(frozen=True, slots=True)
class SpecCounts:
    """Speculation counters of one request (or one profile); the one source for response stats and metrics.

    `num_accepted_tokens` counts accepted drafts (exact + judge); the recovered or bonus token is extra.
    """

    num_spec_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_judge_accepted: int = 0
    num_judged: int = 0
    num_bonus: int = 0
    num_recovered: int = 0
    accepted_per_pos: tuple[int, ...] = ()

    def merge(self, other: SpecCounts) -> SpecCounts:
        width = max(len(self.accepted_per_pos), len(other.accepted_per_pos))
        a = self.accepted_per_pos + (0,) * (width - len(self.accepted_per_pos))
        b = other.accepted_per_pos + (0,) * (width - len(other.accepted_per_pos))
        return SpecCounts(
            num_spec_steps=self.num_spec_steps + other.num_spec_steps,
            num_draft_tokens=self.num_draft_tokens + other.num_draft_tokens,
            num_accepted_tokens=self.num_accepted_tokens + other.num_accepted_tokens,
            num_judge_accepted=self.num_judge_accepted + other.num_judge_accepted,
            num_judged=self.num_judged + other.num_judged,
            num_bonus=self.num_bonus + other.num_bonus,
            num_recovered=self.num_recovered + other.num_recovered,
            accepted_per_pos=tuple(x + y for x, y in zip(a, b, strict=True)),
        )

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per speculation cycle (accepted drafts + recovered/bonus)."""
        if not self.num_spec_steps:
            return 0.0
        emitted = self.num_accepted_tokens + self.num_bonus + self.num_recovered
        return emitted / self.num_spec_steps

    @property
    def draft_acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """New tokens of one request from one step; `spec` and `finish_reason` are set on the final output."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    spec: SpecCounts | None = None
    cycle: SpecCounts | None = None  # this step's speculation cycle (num_spec_steps == 1); None if it drafted none
    windows: tuple[int, ...] = ()  # final output: steps run at each window W (index 0: plain decoding)
    num_cached_tokens: int = 0  # final output: prompt tokens reused from the slot (OpenAI's cached_tokens)
    error: str | None = None  # why a request with finish_reason "error" failed


@dataclass(frozen=True, slots=True)
class RowCycleStats:
    """One row's speculation cycle."""

    request_id: str
    profile: str
    counts: SpecCounts  # this cycle only: num_spec_steps == 1
    num_emitted: int


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """The engine's load as of its last change (an add, an abort, a step), replaced whole so a reader in
    another thread always sees one consistent snapshot."""

    num_running: int = 0
    num_waiting: int = 0
    batch_size: int = 0  # rows of the last step while work remains; 0 once idle
    kv_usage: float = 0.0  # Σ committed lengths / (slots · positions per slot)


@dataclass(frozen=True, slots=True)
class StepStats:
    """One engine step, for metrics: load, timings and each speculating row's cycle."""

    load: EngineLoad  # as the step left it
    num_prefill_tokens: int  # prompt tokens computed; a reused slot prefix is not counted
    num_prefix_query_tokens: int  # prompt tokens of the requests admitted this step
    num_prefix_hit_tokens: int  # of those, the positions a slot still held from an earlier request
    num_generated_tokens: int
    seconds_prefill: float
    seconds_plan: float  # the `auto` window planner: choosing, then learning from the step
    seconds_draft: float
    seconds_verify: float
    seconds_judge: float
    seconds_step: float
    rows: tuple[RowCycleStats, ...]
    finished: tuple[RequestOutput, ...]
    windows: tuple[int, ...] = ()  # each running row's window this step (0: it did not draft; none: no row decoded)
    window_profiles: tuple[str, ...] = ()  # each running row's task profile, in the order of `windows`
    predicted_seconds: float | None = None  # the `auto` planner's cost-model time of draft + verify + commit
    cut_short: bool = False  # drafting stopped early for a newly arrived request (the windows are what ran)
    caught_up: int = 0  # drafting rows whose draft cache a catch-up forward of its own read first
    cost_speed: float | None = None  # the `auto` cost model's device speed against its start-up profile
