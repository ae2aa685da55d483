"""Pure accept rule of the judge: a mismatch is accepted when p_important < τ, compared in logit space."""

from __future__ import annotations

import torch


def threshold_logits(tau: torch.Tensor) -> torch.Tensor:  # [B] -> [B]
    """logit(τ) with exact infinities, so τ = 0 accepts nothing and τ = 1 everything a finite score allows."""
    return torch.logit(tau.double()).float()


def judge_accepts(
    z_important: torch.Tensor,  # [B, W] judge logits (log-odds of "important"); +inf = surely important
    tau: torch.Tensor,  # [B] thresholds in [0, 1]
) -> torch.Tensor:  # [B, W] bool
    """Accept where logit(p_important) < logit(τ): avoids a float32 sigmoid saturating at 0 or 1."""
    return z_important < threshold_logits(tau)[:, None]
