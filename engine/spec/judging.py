"""The judge hook: what the engine hands a mismatch judge per cycle, and the always-reject default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True, slots=True)
class JudgeInput:
    """One cycle's drafted slots. Slot i of row b holds draft token d_{i+1} at absolute `positions[b, i]`.

    Hidden states are last-layer, post-final-norm, at the position whose *input* is the draft token (method §3):
    target row i+1 of the verify pass, draft state after reading d_{i+1}.
    """

    request_ids: tuple[str, ...]
    profiles: tuple[str, ...]
    positions: torch.Tensor  # [B, W] int64
    draft_token_ids: torch.Tensor  # [B, W] int64
    target_token_ids: torch.Tensor  # [B, W] int64, the target's choice at each slot
    mismatch: torch.Tensor  # [B, W] bool, drafted slots the exact rule rejects
    target_hidden: torch.Tensor  # [B, W, Dt]
    draft_hidden: torch.Tensor | None  # [B, W, Dd], only when the judge asks for it


class MismatchJudge(Protocol):
    """Scores mismatches; the engine accepts slot i of row b when `z[b, i] < logit(τ_b)`."""

    @property
    def uses_draft_hidden(self) -> bool:
        """True for the DD-DT layout: costs one extra draft forward per cycle."""
        ...

    def score(self, batch: JudgeInput) -> torch.Tensor:
        """Log-odds that each slot's mismatch is important, `[B, W]` fp32 (+inf: must not accept)."""
        ...


class RejectAllJudge:
    """Default until a trained head is loaded: every mismatch is important, so decoding stays lossless."""

    uses_draft_hidden = False

    def score(self, batch: JudgeInput) -> torch.Tensor:
        return torch.full(batch.draft_token_ids.shape, torch.inf, device=batch.draft_token_ids.device)
