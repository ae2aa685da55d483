"""SlotKVCache: preallocated K/V tensors `[max_slots, max_len, n_kv_heads, head_dim]` per layer for one model.

Pure storage: lengths live on the sequences (host side); rollback is assigning a shorter length, never a copy.
The one copy, `copy_slot`, forks a sequence for the evaluation replay.
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

    @staticmethod
    def nbytes_for(
        num_layers: int, max_slots: int, max_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes the cache would take, for the start-up memory check."""
        item = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * max_slots * max_len * num_kv_heads * head_dim * item
