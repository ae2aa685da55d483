"""Decoder: one Llama-style causal LM (Llama 2/3.x, Mistral, Qwen2/2.5, SmolLM2) that runs on our slot KV cache.

Parameter names equal transformers' so a Hugging Face state dict loads as is. Input: `ForwardBatch`; output:
post-final-norm hidden states `[B, Q, D]`, and `compute_logits` for the rows that need them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.kv_cache import SlotKVCache
from engine.model.attention import attend
from engine.model.protocol import ForwardBatch


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like the reference implementation, then cast back and scale in x's dtype.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:  # [hd/2] fp32
    """Rotary inverse frequencies, with Llama 3 wavelength-dependent scaling when configured."""
    hd = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    rs = config.rope_scaling
    if rs is None:
        return inv
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # [B, Q, heads, hd]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    qkv_proj: nn.Module | None  # one projection for q, k and v, once `fuse_projections` ran

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.q_proj = nn.Linear(d, config.num_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, config.num_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, config.num_kv_heads * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_heads * hd, d, bias=config.o_bias)
        self.qkv_proj = None

    def forward(
        self,
        x: torch.Tensor,  # [B, Q, D]
        cos: torch.Tensor,  # [B, Q, 1, hd]
        sin: torch.Tensor,  # [B, Q, 1, hd]
        layer: int,
        batch: ForwardBatch,
        cache: SlotKVCache | None,
    ) -> torch.Tensor:  # [B, Q, D]
        b, q_len, _ = x.shape
        h, kvh, hd = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is None:
            q = _rope(self.q_proj(x).reshape(b, q_len, h, hd), cos, sin)
            k = _rope(self.k_proj(x).reshape(b, q_len, kvh, hd), cos, sin)
            v = self.v_proj(x).reshape(b, q_len, kvh, hd)
        else:  # one rotation for the q and k heads together: fewer, larger ops (elementwise, so same values)
            qkv = self.qkv_proj(x).reshape(b, q_len, h + 2 * kvh, hd)
            q, k = torch.split(_rope(qkv[:, :, : h + kvh], cos, sin), [h, kvh], dim=2)
            v = qkv[:, :, h + kvh :]
        out = attend(q, k, v, layer, batch, cache)
        return self.o_proj(out.reshape(b, q_len, h * hd))


class MLP(nn.Module):
    gate_up_proj: nn.Module | None  # gate and up in one projection, once `fuse_projections` ran

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.gate_up_proj = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,  # [B, Q, D]
        cos: torch.Tensor,  # [B, Q, 1, hd]
        sin: torch.Tensor,  # [B, Q, 1, hd]
        layer: int,
        batch: ForwardBatch,
        cache: SlotKVCache | None,
    ) -> torch.Tensor:  # [B, Q, D]
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, batch, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Decoder(nn.Module):
    """The engine's model: `forward(batch, cache) -> hidden [B, Q, D]`, `compute_logits(hidden) -> [.., V]`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with `lm_head` for tied checkpoints (call again after `load_state_dict(assign=True)`)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_rope(self) -> None:
        """Recompute the rotary buffer (it is not in checkpoints; models built on `meta` need it)."""
        self.inv_freq = rope_inv_freq(self.config).to(self.model.norm.weight.device)

    def forward(self, batch: ForwardBatch, cache: SlotKVCache | None = None) -> torch.Tensor:
        x = self.model.embed_tokens(batch.input_ids)  # [B, Q, D]
        freqs = batch.positions.float()[..., None] * self.inv_freq  # [B, Q, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # [B, Q, 1, hd]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, i, batch, cache)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def new_cache(self, max_slots: int, max_len: int) -> SlotKVCache:
        """A slot cache shaped for this model, in its parameter dtype and device."""
        c, w = self.config, self.model.norm.weight
        return SlotKVCache(c.num_layers, max_slots, max_len, c.num_kv_heads, c.head_dim, w.dtype, w.device)

    def cache_nbytes(self, max_slots: int, max_len: int) -> int:
        c = self.config
        dtype = self.model.norm.weight.dtype
        return SlotKVCache.nbytes_for(c.num_layers, max_slots, max_len, c.num_kv_heads, c.head_dim, dtype)


def fuse_projections(model: Decoder) -> None:
    """Replace each layer's q/k/v and gate/up Linears, which read the same input, by one Linear each.

    Every output element keeps its own weight row, so the products are those of the separate layers; fewer,
    larger calls cost less where a call has its own overhead (the int8 draft quantizes its input per call).
    """
    for module in list(model.modules()):
        if isinstance(module, Attention) and module.qkv_proj is None:
            module.qkv_proj = _concat_linears([module.q_proj, module.k_proj, module.v_proj])
            del module.q_proj, module.k_proj, module.v_proj
        elif isinstance(module, MLP) and module.gate_up_proj is None:
            module.gate_up_proj = _concat_linears([module.gate_proj, module.up_proj])
            del module.gate_proj, module.up_proj


def _concat_linears(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output rows are those of `parts`, in order (built on `meta`, so nothing is initialised)."""
    w = parts[0].weight
    fused = nn.Linear(w.shape[1], sum(p.out_features for p in parts), bias=parts[0].bias is not None, device="meta")
    with torch.no_grad():
        fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]))
        if fused.bias is not None:
            fused.bias = nn.Parameter(torch.cat([p.bias for p in parts if p.bias is not None]))
    return fused
