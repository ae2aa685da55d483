"""Attention over the slot KV cache: flash-attn `flash_attn_with_kvcache` on CUDA when installed, SDPA otherwise.

Both paths write the new K/V at each row's length and attend causally over the cache plus the new tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kv_cache import SlotKVCache
from engine.model.protocol import ForwardBatch

try:  # optional CUDA extra
    from flash_attn import flash_attn_with_kvcache
except ImportError:  # pragma: no cover - depends on the install
    flash_attn_with_kvcache = None


def flash_available(device: torch.device, dtype: torch.dtype) -> bool:
    """The flash path needs the package, a CUDA device and a half-precision cache."""
    return flash_attn_with_kvcache is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def attend(
    q: torch.Tensor,  # [B, Q, H, hd], RoPE applied
    k: torch.Tensor,  # [B, Q, KVH, hd], RoPE applied
    v: torch.Tensor,  # [B, Q, KVH, hd]
    layer: int,
    batch: ForwardBatch,
    cache: SlotKVCache | None,
) -> torch.Tensor:  # [B, Q, H, hd]
    """Causal attention for ragged right-padded rows; pads never reach a real query's keys."""
    if cache is None:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        return out.transpose(1, 2)
    if flash_available(q.device, cache.k[layer].dtype):
        return flash_attn_with_kvcache(
            q,
            cache.k[layer],
            cache.v[layer],
            k=k,
            v=v,
            cache_seqlens=batch.cache_lens,
            cache_batch_idx=batch.slot_ids.to(torch.int32),
            causal=True,
        )
    return _sdpa_with_cache(q, k, v, layer, batch, cache)


def _sdpa_with_cache(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: ForwardBatch, cache: SlotKVCache
) -> torch.Tensor:
    slots = batch.slot_ids[:, None].expand_as(batch.write_pos)  # [B, Q]
    cache.k[layer][slots, batch.write_pos] = k.to(cache.k[layer].dtype)
    cache.v[layer][slots, batch.write_pos] = v.to(cache.v[layer].dtype)

    t, rows = batch.max_kv_len, batch.scatter_rows
    if batch.slot_range is not None:
        lo, hi = batch.slot_range
        keys, values = cache.k[layer][lo:hi, :t], cache.v[layer][lo:hi, :t]  # views [R, T, KVH, hd]
        if rows is not None:  # absent rows attend to key 0 and are dropped below
            q = q.new_zeros((hi - lo, *q.shape[1:])).index_copy(0, rows, q)
    else:
        keys = cache.k[layer][:, :t].index_select(0, batch.slot_ids)  # [B, T, KVH, hd]
        values = cache.v[layer][:, :t].index_select(0, batch.slot_ids)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        keys.transpose(1, 2).to(q.dtype),
        values.transpose(1, 2).to(q.dtype),
        attn_mask=batch.attn_mask,
        enable_gqa=True,
    ).transpose(1, 2)
    return out if rows is None else out.index_select(0, rows)
