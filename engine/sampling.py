"""Pure sampling rules: the one logits -> probabilities transform (temperature, top-k, top-p) and draws.

Draft and target distributions must both come from `logits_to_probs`, or rejection sampling is not lossless.
"""

from __future__ import annotations

import torch

from engine.types import SamplingParams


def logits_to_probs(
    logits: torch.Tensor,  # [N, V] fp32
    temperature: torch.Tensor,  # [N] > 0
    top_k: torch.Tensor,  # [N] int, 0 = off
    top_p: torch.Tensor,  # [N] in (0, 1]
) -> torch.Tensor:  # [N, V]
    """Temperature-scaled softmax restricted to the top-k tokens and the smallest top-p nucleus."""
    scaled = logits / temperature[:, None]
    vocab = scaled.shape[-1]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [N, V]
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    drop = rank >= k[:, None]
    probs_sorted = sorted_logits.masked_fill(drop, -torch.inf).softmax(-1)
    # Drop a token when the mass before it already reaches top_p; the top token always stays.
    mass_before = probs_sorted.cumsum(-1) - probs_sorted
    drop |= (mass_before >= top_p[:, None]) & (rank > 0)
    filtered = sorted_logits.masked_fill(drop, -torch.inf)
    out = torch.full_like(scaled, -torch.inf).scatter(-1, order, filtered)
    return out.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:  # probs [V]
    return int(torch.multinomial(probs, 1, generator=generator).item())


def residual_distribution(
    target_probs: torch.Tensor,  # [V]
    draft_probs: torch.Tensor,  # [V]
) -> torch.Tensor:  # [V]
    """norm(max(0, q - g)): what to sample after a rejection so the output stays distributed as q."""
    residual = (target_probs - draft_probs).clamp(min=0)
    total = residual.sum()
    # q == g leaves no residual mass, but then a rejection has probability 0; fall back to q.
    return residual / total if total > 0 else target_probs


def probs_for_params(
    logits: torch.Tensor,  # [N, V] fp32
    params: list[SamplingParams],  # one per row, all with temperature > 0
) -> torch.Tensor:  # [N, V]
    """`logits_to_probs` with each row's own sampling parameters."""
    dev = logits.device
    return logits_to_probs(
        logits,
        torch.tensor([p.temperature for p in params], device=dev),
        torch.tensor([p.top_k for p in params], device=dev),
        torch.tensor([p.top_p for p in params], device=dev),
    )
