"""SlotKVCache: preallocated K/V tensors `[max_slots, max_len, n_kv_heads, head_dim]` per layer for one model.

Pure storage: lengths live on the sequences (host side); rollback is assigning a shorter length, never a copy.
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

    @staticmethod
    def nbytes_for(
        num_layers: int, max_slots: int, max_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes the cache would take, for the start-up memory check."""
        item = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * max_slots * max_len * num_kv_heads * head_dim * item
