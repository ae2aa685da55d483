"""Build a serving engine from plain settings: load the draft/target pair and the judge heads, construct `Engine`,
wrap it in an `AsyncEngine`; returns it with the tokenizer and what was loaded (the server never touches torch)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
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
from engine.model.pair import load_pair
from engine.spec.judging import LOSSLESS, HeadJudge
from engine.types import StepStats
from judge.head import JudgeHead
from judge.io import SHIPPED_HEADS, load_heads

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Which models and heads to load, and where they run."""

    pair: str = "smollm2"  # smollm2 | qwen-coder
    target: str | None = None  # a Hugging Face directory or .gguf file; overrides `pair`
    draft: str = "int8"  # int8 | int8-body | none | a checkpoint path
    heads: str = "shipped"  # shipped | none | a directory of <profile>/head.json folders
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "float32"
    threads: int = 0  # CPU threads; 0 keeps torch's choice
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "autojudge")
    model_name: str | None = None  # served model id; default: the target file or directory name

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.threads < 0:
            raise ValueError("threads must be >= 0")


@dataclass(frozen=True)
class LoadedEngine:
    client: AsyncEngine
    tokenizer: Any  # a transformers tokenizer: encode, decode, apply_chat_template
    info: EngineInfo
    seconds: float  # wall time of the whole load
    summary: str  # one line: what was loaded


def load_judge(
    heads: str, pair: str, custom_target: bool, target: LoadedModel, draft: Decoder | None, device: str
) -> HeadJudge:
    """The heads of every profile, checked against the loaded pair; no heads leaves only `lossless`."""
    if heads == "none" or draft is None:
        return HeadJudge({})
    shipped = heads == "shipped"
    directory = SHIPPED_HEADS / pair if shipped else Path(heads)
    if shipped and (custom_target or not directory.is_dir()):
        return HeadJudge({})  # the shipped heads fit the named pairs only
    fingerprint = pair_fingerprint(target.model, draft, tokenizer_fingerprint(target.tokenizer))
    return HeadJudge(load_heads(directory, fingerprint), device=device)


def profile_infos(heads: Mapping[str, JudgeHead]) -> tuple[ProfileInfo, ...]:
    """`lossless` first, then one profile per head with its default τ and threshold tables."""
    infos = [ProfileInfo(LOSSLESS, 0.0)]
    for name in sorted(heads):
        head = heads[name]
        rows = head.meta.get("fit", {}).get("thresholds", [])
        table = tuple({k: float(v) for k, v in row.items() if isinstance(v, int | float)} for row in rows)
        infos.append(
            ProfileInfo(
                name=name,
                judge_threshold=head.default_threshold,
                head_sha256=head.meta.get("tensors_sha256"),
                layout=head.layout,
                thresholds=tuple(float(t) for t in head.thresholds.tolist()),
                threshold_table=table,
            )
        )
    return tuple(infos)


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
        dtype=getattr(torch, source.dtype),
        device=torch.device(device),
        cache_dir=source.cache_dir,
    )
    judge = load_judge(source.heads, source.pair, bool(source.target), target, draft, device)
    tokenizer = target.tokenizer
    engine = Engine(
        config,
        target.model,
        draft,
        judge=judge,
        eos_token_ids=eos_token_ids(target),
        detokenize=lambda ids: str(tokenizer.decode(ids)),
        on_step=on_step,
        device=device,
    )
    name = source.model_name or Path(target.source).name.removesuffix(".gguf")
    info = engine_info(engine, name, None if draft is None else source.draft, profile_infos(judge.heads))
    seconds = time.perf_counter() - start
    profiles = ", ".join(p.name for p in info.profiles)
    summary = (
        f"target {target.source}, draft {info.draft_name or 'none'}, profiles [{profiles}], "
        f"{source.dtype} on {device}, {config.cache.max_slots} slots x {config.cache.max_model_len} tokens"
    )
    return LoadedEngine(AsyncEngine(engine, info), tokenizer, info, seconds, summary)


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
        default_speculative_tokens=c.spec.default_speculative_tokens if draft_name else 0,
        bonus_token=c.spec.bonus_token,
        profiles=profiles,
    )
