"""ModelRunner: the one place where per-row token lists become device tensors; runs one model on its cache."""

from __future__ import annotations

import torch

from engine.kv_cache import SlotKVCache
from engine.model.protocol import ForwardBatch, LanguageModel


class ModelRunner:
    def __init__(self, model: LanguageModel, cache: SlotKVCache, device: torch.device) -> None:
        self.model = model
        self.cache = cache
        self.device = device

    @torch.inference_mode()
    def forward(self, rows: list[list[int]], cache_lens: list[int], slots: list[int]) -> torch.Tensor:  # [B, Q, D]
        """Feed `rows[b]` after `cache_lens[b]` cached positions of slot `slots[b]`; K/V land in the cache."""
        batch = ForwardBatch.build(rows, cache_lens, slots, self.device)
        assert batch.max_kv_len < self.cache.max_len, "verify window past the cache"
        return self.model.forward(batch, self.cache)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., V]
        return self.model.compute_logits(hidden)


def last_rows(hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:  # [B, Q, D] -> [B, D]
    """Each row's state at its last real (unpadded) token."""
    idx = torch.tensor([n - 1 for n in lengths], device=hidden.device)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
