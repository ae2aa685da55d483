"""Frozen engine configuration: model shape, KV cache, scheduler and speculation settings.

`ModelConfig.from_hf` turns a Hugging Face `config.json` dict into our model shape and refuses architectures the
decoder does not implement. Everything else is plain validated values composed into `EngineConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class UnsupportedModelError(ValueError):
    """The checkpoint is not a model our decoder can run."""


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama 3.x frequency scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape of a Llama-style decoder (Llama 2/3.x, Mistral, Qwen2/2.5, SmolLM2)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.architecture!r}; supported: " + ", ".join(SUPPORTED_ARCHITECTURES)
            )
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise UnsupportedModelError(f"{name} must be positive")

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V bytes for one position across all layers, in fp32."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 4

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Map a transformers `config.json` dict; refuse what our decoder cannot reproduce."""
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else _arch_from_model_type(cfg.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {arch!r} (model_type={cfg.get('model_type')!r}); "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rope = _rope_from_hf(cfg)
        theta = cfg.get("rope_theta")
        if theta is None:  # transformers 5 nests it in rope_parameters
            theta = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        heads = int(cfg["num_attention_heads"])
        max_pos = int(cfg.get("max_position_embeddings", 2048))
        window = cfg.get("sliding_window")
        if window and (arch == "MistralForCausalLM" or cfg.get("use_sliding_window")):
            # NOTE: we attend over the full cache, so a context past the window would differ from the
            # reference model; cap the context instead of silently diverging.
            max_pos = min(max_pos, int(window))
        qwen = arch == "Qwen2ForCausalLM"
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
            max_position_embeddings=max_pos,
            rope_theta=float(theta),
            rope_scaling=rope,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qwen or attention_bias,
            o_bias=attention_bias and not qwen,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
        )


def _arch_from_model_type(model_type: str | None) -> str:
    return {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
    }.get(model_type or "", str(model_type))


def _rope_from_hf(cfg: dict[str, Any]) -> RopeScaling | None:
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise UnsupportedModelError(f"unsupported rope scaling {kind!r}; supported: llama3")
    return RopeScaling(
        factor=float(rs["factor"]),
        low_freq_factor=float(rs["low_freq_factor"]),
        high_freq_factor=float(rs["high_freq_factor"]),
        original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
    )


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Slot KV cache: `max_slots` rows of `max_model_len` positions (plus speculation headroom)."""

    max_slots: int = 8
    max_model_len: int = 2048
    memory_fraction: float = 0.9  # of free memory the caches may take at start-up
    # A finished request's K/V stays in its free slot; a new prompt sharing its prefix lands there and skips it.
    reuse_prefix: bool = True

    def __post_init__(self) -> None:
        if self.max_slots < 1:
            raise ValueError("max_slots must be >= 1")
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError("memory_fraction must be in (0, 1]")


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    """The `auto` window planner (engine/spec/autowindow.py): acceptance estimates, catch-up and the guard."""

    prior_alpha: float = 0.6  # per-position acceptance assumed before any row of a profile has drafted
    row_decay: float = 0.9  # EMA factor per observed cycle of a row's acceptance
    key_decay: float = 0.98  # ... of the (profile, τ, greedy) history that seeds new rows
    row_weight: float = 4.0  # pseudo-positions of the profile history in a row's estimate
    optimism: float = 1.0  # standard errors added to a row's estimate to decide whether it drafts (0: none)
    # Most cycles a draft catch-up forward is spread over when choosing (fewer when the row's remaining tokens
    # will take fewer, or when rows have drafted fewer cycles per catch-up of late): a new request's deferred
    # draft prefill costs several steps and serves the whole request.
    amortize: float = 64.0
    probe_every: int = 64  # steps without an observation of a profile before one row of it drafts anyway (0: never)
    probe_window: int = 4  # the window of that row (a new profile is probed at once)
    probe_budget: float = 0.02  # share of step time later probes may cost, on average
    guard_steps: int = 32  # drafting steps the guard sums before it compares them with plain decoding
    backoff_steps: int = 32  # steps without drafting after the guard trips (doubles while it keeps tripping)
    # A step that admits requests drafts for no row (fixed windows excepted): the new requests' first tokens then
    # wait for a target-only step, not for a verify over K+1 positions of the rows already running.
    plain_admission: bool = True
    # A step stops drafting as soon as a request arrives that a free slot could take, and verifies what it has:
    # the newcomer waits for one draft forward and a short verify instead of the whole window.
    yield_to_arrivals: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.prior_alpha < 1.0:
            raise ValueError("prior_alpha must be in (0, 1)")
        if not (0.0 < self.row_decay <= 1.0 and 0.0 < self.key_decay <= 1.0):
            raise ValueError("row_decay and key_decay must be in (0, 1]")
        if not 0.0 <= self.probe_budget < 1.0:
            raise ValueError("probe_budget must be in [0, 1)")
        if self.row_weight <= 0 or self.amortize < 1 or self.optimism < 0:
            raise ValueError("row_weight must be > 0, amortize >= 1 and optimism >= 0")
        if min(self.probe_window, self.guard_steps, self.backoff_steps) < 1 or self.probe_every < 0:
            raise ValueError("probe_window, guard_steps and backoff_steps must be >= 1, probe_every >= 0")


@dataclass(frozen=True, slots=True)
class SpecConfig:
    """Speculation limits and policy shared by every request. With `auto_window`, a request's window is a cap and
    the planner picks each row's window every step (0 included); otherwise every cycle drafts the window asked."""

    max_speculative_tokens: int = 8
    default_speculative_tokens: int = 4
    bonus_token: bool = True
    draft_hidden: bool = False  # DD-DT judge layout: one extra draft forward per cycle
    # The draft is the target's quantized twin: it reads the target's K/V for context it has not computed
    # (no draft prefill, no catch-up forward; engine/spec/drafter.py).
    draft_shares_kv: bool = False
    auto_window: bool = False
    planner: PlannerConfig = field(default_factory=PlannerConfig)

    def __post_init__(self) -> None:
        if not 1 <= self.max_speculative_tokens <= 64:
            raise ValueError("max_speculative_tokens must be in 1..64")
        if not 0 <= self.default_speculative_tokens <= self.max_speculative_tokens:
            raise ValueError("default_speculative_tokens must be in 0..max_speculative_tokens")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Admission limits."""

    max_waiting: int = 256
    max_prefill_tokens: int = 4096  # prompt tokens prefilled together in one step

    def __post_init__(self) -> None:
        if self.max_waiting < 0 or self.max_prefill_tokens < 1:
            raise ValueError("max_waiting must be >= 0 and max_prefill_tokens >= 1")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Composition of the sub-configs; components receive only the part they need."""

    cache: CacheConfig = field(default_factory=CacheConfig)
    spec: SpecConfig = field(default_factory=SpecConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @property
    def cache_len(self) -> int:
        """Positions per slot: a verify window past the longest context must still fit."""
        return self.cache.max_model_len + self.spec.max_speculative_tokens + 1
