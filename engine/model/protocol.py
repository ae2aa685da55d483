"""The `LanguageModel` protocol the engine runs, and `ForwardBatch`, the one input every forward takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from engine.config import ModelConfig
from engine.kv_cache import SlotKVCache


@dataclass(frozen=True, slots=True)
class ForwardBatch:
    """Ragged rows, right-padded to the longest: row b feeds `q_lens[b]` tokens after `cache_lens[b]` cached ones.

    The attention metadata is built once per forward, on the host, so no layer syncs with the device.
    """

    input_ids: torch.Tensor  # [B, Q] int64
    positions: torch.Tensor  # [B, Q] int64 (cache_lens[b] + j)
    slot_ids: torch.Tensor  # [B] int64, KV cache row of each batch row
    cache_lens: torch.Tensor  # [B] int32, valid cached positions before this forward
    q_lens: torch.Tensor  # [B] int32, real (unpadded) tokens in this forward
    max_kv_len: int  # max(cache_lens + q_lens)
    # SDPA path: cache position each fed token's K/V is written to; -1 (the last position) for pads.
    write_pos: torch.Tensor  # [B, Q] int64
    # SDPA path: attend over cache rows [lo, hi) in place when set (no K/V copy), else over gathered rows.
    slot_range: tuple[int, int] | None
    # In place with rows absent or out of order: batch row b is row scatter_rows[b] of the range (slot - lo).
    scatter_rows: torch.Tensor | None  # [B] int64; None when the batch rows are the cache rows in order
    attn_mask: torch.Tensor  # [R, 1, Q, T] bool, R = hi - lo or B; key k visible to query j iff k <= len + j

    @staticmethod
    def build(rows: list[list[int]], cache_lens: list[int], slot_ids: list[int], device: torch.device) -> ForwardBatch:
        """Right-pad `rows` (token ids fed per row) into device tensors."""
        q = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), q, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        lens = torch.tensor(cache_lens, dtype=torch.long)
        positions = lens[:, None] + torch.arange(q)[None, :]
        q_lens = torch.tensor([len(r) for r in rows], dtype=torch.long)
        # NOTE: pads write to the last cache position (index -1), which no row ever holds as valid data (rows
        # end at least one verify window before it), so the layers' writes need no filtering.
        write_pos = torch.where(torch.arange(q)[None, :] < q_lens[:, None], positions, -1)
        max_kv_len = max(c + len(r) for c, r in zip(cache_lens, rows, strict=True))
        lo, hi = min(slot_ids), max(slot_ids) + 1
        # Rows that sit close together in the cache are attended in place; padding the few absent rows
        # costs less than copying every row's K/V in every layer.
        slot_range = (lo, hi) if hi - lo <= 2 * len(rows) else None
        mask_lens, scatter_rows = lens, None
        if slot_range is not None:
            in_range = torch.tensor(slot_ids, dtype=torch.long) - lo  # [B] row of each batch row in [lo, hi)
            mask_lens = torch.zeros(hi - lo, dtype=torch.long).index_copy(0, in_range, lens)
            if slot_ids != list(range(lo, hi)):
                scatter_rows = in_range.to(device)
        mask = torch.arange(max_kv_len)[None, None, :] <= mask_lens[:, None, None] + torch.arange(q)[None, :, None]
        return ForwardBatch(
            input_ids=ids.to(device),
            positions=positions.to(device),
            slot_ids=torch.tensor(slot_ids, dtype=torch.long, device=device),
            cache_lens=lens.to(device=device, dtype=torch.int32),
            q_lens=q_lens.to(device=device, dtype=torch.int32),
            max_kv_len=max_kv_len,
            write_pos=write_pos.to(device),
            slot_range=slot_range,
            scatter_rows=scatter_rows,
            attn_mask=mask[:, None].to(device),
        )


class LanguageModel(Protocol):
    """What the engine needs of a model: hidden states for fed tokens, and logits for chosen hidden rows."""

    config: ModelConfig

    def forward(self, batch: ForwardBatch, cache: SlotKVCache | None) -> torch.Tensor:
        """Last-layer post-norm hidden states `[B, Q, D]`; writes K/V into `cache` when given."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[..., D]` -> fp32 logits `[..., V]`."""
        ...

    def new_cache(self, max_slots: int, max_len: int) -> SlotKVCache:
        """A KV cache shaped, typed and placed for this model."""
        ...

    def cache_nbytes(self, max_slots: int, max_len: int) -> int:
        """Bytes `new_cache` would allocate."""
        ...
