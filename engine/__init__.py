"""AutoJudge engine: draft + target models, slot KV cache, batched speculation loop, continuous batching.

Public API: build the models with `engine.model.loader`, construct `Engine`, then `add_request` / `step` / `abort`.
"""

from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpecConfig
from engine.engine import Engine
from engine.types import Request, RequestOutput, SamplingParams, SpecCounts, SpecParams, StepStats

__all__ = [
    "CacheConfig",
    "Engine",
    "EngineConfig",
    "ModelConfig",
    "Request",
    "RequestOutput",
    "SamplingParams",
    "SchedulerConfig",
    "SpecConfig",
    "SpecCounts",
    "SpecParams",
    "StepStats",
]
