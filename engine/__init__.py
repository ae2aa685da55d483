"""AutoJudge engine: draft + target models, slot KV cache, batched speculation loop, continuous batching.

Public API: build the models with `engine.model.loader`, construct `Engine`, then `add_request` / `step` / `abort`;
or, to serve, `build_engine(ModelSource, EngineConfig)` for an `AsyncEngine` behind the `EngineClient` Protocol.
"""

from engine.build import LoadedEngine, ModelSource, ProfileSpec, build_engine
from engine.client import (
    AsyncEngine,
    EngineClient,
    EngineDeadError,
    EngineInfo,
    EngineShutdownError,
    Health,
    ProfileInfo,
    QueueFullError,
    RequestFailedError,
    RequestStream,
)
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpecConfig
from engine.engine import Engine
from engine.model.assets import DEFAULT_CACHE_DIR
from engine.model.pair import DTYPES, PAIRS, draft_name
from engine.spec.judging import LOSSLESS
from engine.types import (
    EngineLoad,
    Request,
    RequestOutput,
    RowCycleStats,
    SamplingParams,
    SpecCounts,
    SpecParams,
    StepStats,
)

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DTYPES",
    "LOSSLESS",
    "PAIRS",
    "AsyncEngine",
    "CacheConfig",
    "Engine",
    "EngineClient",
    "EngineConfig",
    "EngineDeadError",
    "EngineInfo",
    "EngineLoad",
    "EngineShutdownError",
    "Health",
    "LoadedEngine",
    "ModelConfig",
    "ModelSource",
    "ProfileInfo",
    "ProfileSpec",
    "QueueFullError",
    "Request",
    "RequestFailedError",
    "RequestOutput",
    "RequestStream",
    "RowCycleStats",
    "SamplingParams",
    "SchedulerConfig",
    "SpecConfig",
    "SpecCounts",
    "SpecParams",
    "StepStats",
    "build_engine",
    "draft_name",
]
