"""Start-up checks: the models suit the configuration, and the KV cache fits in the device's free memory."""

from __future__ import annotations

import torch

from engine.config import EngineConfig
from engine.model.protocol import LanguageModel


def check_models(config: EngineConfig, target: LanguageModel, draft: LanguageModel | None) -> None:
    """Refuse a context the models cannot hold and a draft whose vocabulary differs from the target's."""
    for role, model in (("target", target), ("draft", draft)):
        if model is not None and config.cache.max_model_len > model.config.max_position_embeddings:
            raise ValueError(
                f"max_model_len={config.cache.max_model_len} is longer than the {role} model allows "
                f"({model.config.max_position_embeddings} positions)"
            )
    if draft is not None and draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft vocab size {draft.config.vocab_size} != target vocab size {target.config.vocab_size}")


def check_memory(
    config: EngineConfig, target: LanguageModel, draft: LanguageModel | None, device: torch.device
) -> None:
    """Refuse at start-up a KV cache that would not fit in the free memory of the device."""
    need = sum(m.cache_nbytes(config.cache.max_slots, config.cache_len) for m in (target, draft) if m is not None)
    free = available_memory(device)
    if free is not None and need > config.cache.memory_fraction * free:
        raise MemoryError(
            f"KV cache needs {need / 2**30:.2f} GiB for {config.cache.max_slots} slots x "
            f"{config.cache_len} positions, but only {free / 2**30:.2f} GiB is free "
            f"(memory_fraction={config.cache.memory_fraction}); lower max_slots or max_model_len"
        )


def available_memory(device: torch.device) -> int | None:
    """Free bytes on the device (MemAvailable on Linux CPUs); None when it cannot be known."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
