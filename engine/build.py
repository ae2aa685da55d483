"""Build a serving engine from plain settings: load the draft/target pair and the judge heads, construct `Engine`,
wrap it in an `AsyncEngine`; returns it with the tokenizer and what was loaded (the server never touches torch)."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.client import AsyncEngine, EngineInfo, ProfileInfo
from engine.config import EngineConfig
from engine.engine import Engine
from engine.model.decoder import Decoder
from engine.model.fingerprint import pair_fingerprint
from engine.model.loader import LoadedModel, eos_token_ids, tokenizer_fingerprint
from engine.model.pair import DTYPES, QUANTIZE, draft_name, load_pair, twin_draft
from engine.spec.cost import StepCost
from engine.spec.judging import LOSSLESS, HeadJudge
from engine.spec.profiler import cached_step_cost, describe, profile_key, profile_step_cost
from engine.types import StepStats
from judge.head import JudgeHead
from judge.io import METADATA, SHIPPED_HEADS, load_head

LOSSLESS_DESCRIPTION = "exact speculative decoding: every mismatch is rejected"


@dataclass(frozen=True, slots=True)
class ProfileSpec:
    """One task profile to serve (serving.md §2): its judge head (none for `lossless`), default τ and window."""

    name: str
    judge_head: Path | None = None  # a directory holding head.json and head.safetensors
    sha256: str | None = None  # when given, must equal the head's tensors_sha256
    judge_threshold: float | None = None  # default τ; None: threshold_index, else the head's own default
    threshold_index: int | None = None  # into the head's validation-score quantiles (0 .. 25)
    num_speculative_tokens: int | None = None  # default window W; None: the server's
    description: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.name):
            raise ValueError(f"profile name {self.name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        where = f"profile {self.name!r}"
        if (self.judge_head is None) != (self.name == LOSSLESS):
            raise ValueError(f"{where}: only {LOSSLESS!r} has no judge_head, and it cannot have one")
        if self.sha256 is not None and self.judge_head is None:
            raise ValueError(f"{where}: sha256 checks a judge_head, and there is none")
        if self.judge_threshold is not None and self.threshold_index is not None:
            raise ValueError(f"{where}: give judge_threshold or threshold_index, not both")
        if self.name == LOSSLESS and (self.judge_threshold or self.threshold_index is not None):
            raise ValueError(f"{where}: the lossless profile has τ = 0")
        if self.judge_threshold is not None and not 0.0 <= self.judge_threshold <= 1.0:
            raise ValueError(f"{where}: judge_threshold must be in [0, 1]")
        if self.threshold_index is not None and self.threshold_index < 0:
            raise ValueError(f"{where}: threshold_index must be >= 0")
        if self.num_speculative_tokens is not None and self.num_speculative_tokens < 0:
            raise ValueError(f"{where}: num_speculative_tokens must be >= 0")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"{where}: sha256 must be 64 lowercase hex digits")


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Which models and heads to load, and where they run."""

    pair: str = "smollm2"  # smollm2 | qwen-coder
    target: str | None = None  # a Hugging Face directory or .gguf file; overrides `pair`
    draft: str = "int8"  # int8 | int8-body | none | a checkpoint path
    heads: str = "shipped"  # shipped | none | a directory of <profile>/head.json folders
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: the named pair's own precision (engine.model.pair.PAIR_DTYPES)
    quantize: str = "none"  # none | int8: W8A8 target and draft checkpoint (engine.model.pair.QUANTIZE)
    threads: int = 0  # CPU threads; 0 keeps torch's choice
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "autojudge")
    reprofile: bool = False  # auto windows: measure the step-cost profile again instead of reading its cache
    draft_shares_kv: bool = True  # a twin draft (an int8 copy of the target) reads the target's K/V for unread context
    model_name: str | None = None  # served model id; default: the target file or directory name
    profiles: tuple[ProfileSpec, ...] | None = None  # None: `default_profiles` from `heads`

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.threads < 0:
            raise ValueError("threads must be >= 0")


@dataclass(frozen=True)
class LoadedEngine:
    client: AsyncEngine
    tokenizer: Any  # a transformers tokenizer: encode, decode, apply_chat_template
    info: EngineInfo
    seconds: float  # wall time of the whole load
    summary: str  # one line: what was loaded


def default_profiles(heads: str, pair: str, custom_target: bool, has_draft: bool) -> tuple[ProfileSpec, ...]:
    """`lossless`, plus one profile per head directory of `heads` at the head's default τ."""
    lossless = ProfileSpec(LOSSLESS, description=LOSSLESS_DESCRIPTION)
    if heads == "none" or not has_draft:
        return (lossless,)
    shipped = heads == "shipped"
    directory = SHIPPED_HEADS / pair if shipped else Path(heads)
    if shipped and (custom_target or not directory.is_dir()):
        return (lossless,)  # the shipped heads fit the named pairs only
    if not directory.is_dir():
        raise FileNotFoundError(f"judge head directory {directory} does not exist")
    found = sorted(d for d in directory.iterdir() if (d / METADATA).is_file())
    return (lossless, *(ProfileSpec(d.name, d, description=f"judge head {d.name}, default τ") for d in found))


def profile_specs(source: ModelSource) -> tuple[ProfileSpec, ...]:
    """The profiles a server of `source` serves (before their heads are loaded and checked)."""
    return source.profiles or default_profiles(source.heads, source.pair, bool(source.target), source.draft != "none")


def load_profiles(
    specs: Sequence[ProfileSpec], expected_pair: dict[str, Any] | None, device: str
) -> tuple[HeadJudge, tuple[ProfileInfo, ...]]:
    """Load and check each profile's head (pair fingerprint, sha256, τ); `lossless` is always served, first.
    `expected_pair` None means no draft is loaded, so no head can serve."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate profile names in {names}")
    if LOSSLESS not in names:
        specs = [ProfileSpec(LOSSLESS, description=LOSSLESS_DESCRIPTION), *specs]
    heads: dict[str, JudgeHead] = {}
    infos = []
    for spec in sorted(specs, key=lambda s: s.name != LOSSLESS):
        if spec.judge_head is None:
            infos.append(ProfileInfo(LOSSLESS, 0.0, num_speculative_tokens=spec.num_speculative_tokens,
                                     description=spec.description))  # fmt: skip
            continue
        if expected_pair is None:
            raise ValueError(f"profile {spec.name!r} has a judge head, but no draft model is loaded")
        heads[spec.name] = head = load_head(spec.judge_head, expected_pair)
        infos.append(profile_info(spec, head))
    return HeadJudge(heads, device=device), tuple(infos)


def profile_info(spec: ProfileSpec, head: JudgeHead) -> ProfileInfo:
    where = f"profile {spec.name!r} (head {spec.judge_head})"
    sha = head.meta.get("tensors_sha256")
    if spec.sha256 is not None and spec.sha256 != sha:
        raise ValueError(f"{where}: the head's sha256 is {sha}, the profile expects {spec.sha256}")
    quantiles = tuple(float(t) for t in head.thresholds.tolist())
    tau = head.default_threshold if spec.judge_threshold is None else spec.judge_threshold
    if spec.threshold_index is not None:
        if spec.threshold_index >= len(quantiles):
            raise ValueError(f"{where}: threshold_index must be < {len(quantiles)}, got {spec.threshold_index}")
        tau = quantiles[spec.threshold_index]
    rows = head.meta.get("fit", {}).get("thresholds", [])
    return ProfileInfo(
        name=spec.name,
        judge_threshold=tau,
        head_sha256=sha,
        layout=head.layout,
        num_speculative_tokens=spec.num_speculative_tokens,
        description=spec.description,
        thresholds=quantiles,
        threshold_table=tuple({k: float(v) for k, v in row.items() if isinstance(v, int | float)} for row in rows),
    )


def judge_fingerprint(target: LoadedModel, draft: Decoder | None) -> dict[str, Any] | None:
    """What a head must have been fitted for; None without a draft (nothing to judge)."""
    if draft is None:
        return None
    return pair_fingerprint(target.model, draft, tokenizer_fingerprint(target.tokenizer))


def load_judge(
    heads: str, pair: str, custom_target: bool, target: LoadedModel, draft: Decoder | None, device: str
) -> HeadJudge:
    """The heads of the default profiles (see `default_profiles`), checked against the loaded pair."""
    specs = default_profiles(heads, pair, custom_target, draft is not None)
    return load_profiles(specs, judge_fingerprint(target, draft), device)[0]


def step_cost_of(
    pair: dict[str, Any],
    target: Decoder,
    draft: Decoder,
    device: torch.device,
    config: EngineConfig,
    source: ModelSource,
) -> tuple[StepCost, bool]:
    """The step-cost profile of this pair on this device and thread count: cached, or measured now."""
    slots, width = config.cache.max_slots, config.spec.max_speculative_tokens
    key = profile_key(pair, device, slots, width)
    return cached_step_cost(
        source.cache_dir, key, lambda: profile_step_cost(target, draft, device, slots, width), source.reprofile
    )


def pair_engine(
    config: EngineConfig,
    target: LoadedModel,
    draft: Decoder | None,
    judge: HeadJudge,
    on_step: Callable[[StepStats], None] | None,
    device: str | torch.device,
    step_cost: StepCost | None = None,
) -> Engine:
    """An `Engine` over a loaded pair, with the target's EOS ids and its tokenizer for stop strings."""
    tokenizer = target.tokenizer
    return Engine(
        config,
        target.model,
        draft,
        judge=judge,
        eos_token_ids=eos_token_ids(target),
        detokenize=lambda ids: str(tokenizer.decode(ids)),
        on_step=on_step,
        device=device,
        step_cost=step_cost,
    )


def build_engine(
    source: ModelSource, config: EngineConfig, on_step: Callable[[StepStats], None] | None = None
) -> LoadedEngine:
    start = time.perf_counter()
    device = source.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if source.threads:
        torch.set_num_threads(source.threads)
    target, draft = load_pair(
        pair=source.pair,
        target=source.target,
        draft=source.draft,
        dtype=source.dtype,
        device=torch.device(device),
        cache_dir=source.cache_dir,
        quantize=source.quantize,
    )
    specs = profile_specs(source)
    pair = judge_fingerprint(target, draft)
    judge, profiles = load_profiles(specs, pair, device)
    # Not under a DD-DT head: it reads the draft's hidden states, which were mined with the draft's own K/V.
    twin = draft is not None and twin_draft(source.pair, source.target, source.draft)
    if twin and source.draft_shares_kv and not judge.uses_draft_hidden:
        config = dataclasses.replace(config, spec=dataclasses.replace(config.spec, draft_shares_kv=True))
    step_cost, cost_note = None, ""
    if config.spec.auto_window and draft is not None:
        assert pair is not None
        step_cost, measured = step_cost_of(pair, target.model, draft, torch.device(device), config, source)
        cost_note = f", auto windows on a {'measured' if measured else 'cached'} step cost: {describe(step_cost)}"
    engine = pair_engine(config, target, draft, judge, on_step, device, step_cost)
    name = source.model_name or Path(target.source).name.removesuffix(".gguf")
    info = engine_info(engine, name, draft_name(source.pair, source.target, source.draft), profiles)
    seconds = time.perf_counter() - start
    served = ", ".join(f"{p.name} (τ={p.judge_threshold:.4g}, head {(p.head_sha256 or '-')[:12]})" for p in profiles)
    precision = str(next(target.model.parameters()).dtype).removeprefix("torch.")
    if source.quantize == "int8":
        precision += " with int8 W8A8 linears"
    summary = (
        f"target {target.source}, draft {info.draft_name or 'none'}, profiles [{served}], "
        f"{precision} on {device}, "
        f"{config.cache.max_slots} slots x {config.cache.max_model_len} tokens{cost_note}"
        f"{', the draft reads the target K/V' if config.spec.draft_shares_kv else ''}"
    )
    return LoadedEngine(AsyncEngine(engine, info), target.tokenizer, info, seconds, summary)


def engine_info(
    engine: Engine, model_name: str, draft_name: str | None, profiles: tuple[ProfileInfo, ...]
) -> EngineInfo:
    c = engine.config
    return EngineInfo(
        model_name=model_name,
        draft_name=draft_name,
        vocab_size=engine.vocab_size,
        max_model_len=c.cache.max_model_len,
        max_slots=c.cache.max_slots,
        max_waiting=c.scheduler.max_waiting,
        max_speculative_tokens=c.spec.max_speculative_tokens,
        default_speculative_tokens=c.spec.default_speculative_tokens if draft_name is not None else 0,
        bonus_token=c.spec.bonus_token,
        profiles=profiles,
        auto_window=engine.autowindow is not None,
        step_cost=None if engine.autowindow is None else engine.autowindow.profile.to_dict(),
        draft_shares_kv=c.spec.draft_shares_kv,
    )
