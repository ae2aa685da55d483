"""The judge hook: what the engine hands a mismatch judge per cycle; the always-reject default and the
learned heads of task profiles."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from judge.features import build_features
from judge.head import HeadBank, JudgeHead

LOSSLESS = "lossless"  # the profile that never accepts a mismatch


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

    def check_profile(self, profile: str) -> None:
        """Raise ValueError for a task profile this judge cannot serve (checked when a request arrives)."""
        ...


class RejectAllJudge:
    """Default until a trained head is loaded: every mismatch is important, so decoding stays lossless."""

    uses_draft_hidden = False

    def score(self, batch: JudgeInput) -> torch.Tensor:
        return torch.full(batch.draft_token_ids.shape, torch.inf, device=batch.draft_token_ids.device)

    def check_profile(self, profile: str) -> None:
        if profile != LOSSLESS:
            raise ValueError(f"unknown task profile {profile!r}: no judge heads are loaded, only {LOSSLESS!r}")


class HeadJudge:
    """Each row is judged by the head of its task profile; the `lossless` profile has none (+inf)."""

    def __init__(self, heads: Mapping[str, JudgeHead], device: torch.device | str = "cpu") -> None:
        if LOSSLESS in heads:
            raise ValueError(f"the {LOSSLESS!r} profile cannot have a head")
        self.heads = dict(heads)
        self.names = sorted(heads)
        self.bank = HeadBank([heads[n] for n in self.names], device) if heads else None
        self.index = {n: i for i, n in enumerate(self.names)}
        self.uses_draft_hidden = self.bank is not None and self.bank.layout == "DD-DT"

    def default_threshold(self, profile: str) -> float:
        """The head's default τ (0 for `lossless`)."""
        self.check_profile(profile)
        return 0.0 if profile == LOSSLESS else self.heads[profile].default_threshold

    def check_profile(self, profile: str) -> None:
        if profile != LOSSLESS and profile not in self.index:
            known = ", ".join([LOSSLESS, *self.names])
            raise ValueError(f"unknown task profile {profile!r}; known profiles: {known}")

    def score(self, batch: JudgeInput) -> torch.Tensor:
        dev = batch.target_hidden.device
        idx = torch.tensor([self.index.get(p, -1) for p in batch.profiles], device=dev)  # [B]
        if self.bank is None:
            return torch.full(batch.draft_token_ids.shape, torch.inf, device=dev)
        features = build_features(self.bank.layout, batch.target_hidden, batch.draft_hidden)  # [B, W, D]
        z = self.bank.log_odds(features, idx.clamp(min=0))  # [B, W]
        return z.masked_fill((idx < 0)[:, None], torch.inf)
