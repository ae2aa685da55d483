"""SlotKVCache: preallocated K/V tensors `[max_slots, max_len, n_kv_heads, head_dim]` per layer for one model.

Pure storage: lengths live on the sequences (host side); rollback is assigning a shorter length, never a copy.
The copies: `copy_slot` forks a sequence for the evaluation replay, `read_from` fills a twin draft's positions
from the target's cache.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """Per-layer K and V for every slot, in flash-attn's non-paged layout."""

    def __init__(
        self,
        num_layers: int,
        max_slots: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (max_slots, max_len, num_kv_heads, head_dim)
        self.max_slots = max_slots
        self.max_len = max_len
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst`: forks a sequence without recomputing."""
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :length] = k[src, :length]
            v[dst, :length] = v[src, :length]

    def clear(self, slot: int, start: int = 0) -> None:
        """Zero `slot` from position `start` on. SDPA attention reads masked positions up to the batch's longest
        row, and a masked NaN still makes its output NaN, so K/V that overflowed must not outlive their row."""
        for k, v in zip(self.k, self.v, strict=True):
            k[slot, start:] = 0
            v[slot, start:] = 0

    def same_shape(self, other: SlotKVCache) -> bool:
        """Whether `other` has this cache's layers, slots, positions, per-position K/V shape, dtype and device."""
        mine, theirs = self.k[0], other.k[0]
        same = (mine.shape, mine.dtype, mine.device) == (theirs.shape, theirs.dtype, theirs.device)
        return len(self.k) == len(other.k) and same

    def read_from(self, other: SlotKVCache, slot: int, start: int, end: int) -> None:
        """Positions `start:end` of `slot` from `other` (same shape): a twin draft's cache takes the target's K/V
        for context it has not computed itself, instead of running a forward over it."""
        for k, v, ok, ov in zip(self.k, self.v, other.k, other.v, strict=True):
            k[slot, start:end] = ok[slot, start:end]
            v[slot, start:end] = ov[slot, start:end]

    @staticmethod
    def nbytes_for(
        num_layers: int, max_slots: int, max_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes the cache would take, for the start-up memory check."""
        item = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * max_slots * max_len * num_kv_heads * head_dim * item
