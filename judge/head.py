"""JudgeHead: a standardised logistic regression over judge features, and HeadBank, many heads scored at once.

p_important = sigmoid(((h - mean) / scale) · weights + bias)   (method §4)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from judge.features import check_layout


@dataclass(frozen=True)
class JudgeHead:
    layout: str  # "DT" | "DD-DT"
    mean: torch.Tensor  # [D] float64 (as fitted; the bank folds and casts for serving)
    scale: torch.Tensor  # [D] float64, 1 for constant features
    weights: torch.Tensor  # [D] float64
    bias: float
    thresholds: torch.Tensor  # [26] validation-score quantiles, ascending
    default_threshold: float
    meta: dict[str, Any] = field(default_factory=dict)  # pair fingerprint, threshold table, provenance

    def __post_init__(self) -> None:
        check_layout(self.layout)
        d = self.weights.shape[0]
        if self.mean.shape != (d,) or self.scale.shape != (d,):
            raise ValueError(f"head tensors disagree: weights [{d}], mean {list(self.mean.shape)}")
        if not 0.0 <= self.default_threshold <= 1.0:
            raise ValueError(f"default threshold {self.default_threshold} is outside [0, 1]")

    @property
    def dim(self) -> int:
        return int(self.weights.shape[0])

    def log_odds(self, features: torch.Tensor) -> torch.Tensor:  # [..., D] -> [...]
        """logit(p_important), computed in the features' dtype (float64 for the parity test)."""
        dt = features.dtype
        standardised = (features - self.mean.to(dt)) / self.scale.to(dt)
        return standardised @ self.weights.to(dt) + self.bias

    def p_important(self, features: torch.Tensor) -> torch.Tensor:  # [..., D] -> [...]
        return torch.sigmoid(self.log_odds(features))


class HeadBank:
    """Heads of one layout stacked as `[H, D]`, the scaler folded in: every slot gets every head's log-odds
    in one matmul, then each row picks its own head's column (design §7: cheaper than gathering)."""

    def __init__(self, heads: Sequence[JudgeHead], device: torch.device | str = "cpu") -> None:
        if not heads:
            raise ValueError("a head bank needs at least one head")
        layouts = {h.layout for h in heads}
        dims = {h.dim for h in heads}
        if len(layouts) > 1 or len(dims) > 1:
            raise ValueError(f"heads served together must share one layout and size, got {layouts} / {dims}")
        self.layout = heads[0].layout
        w = torch.stack([h.weights.double() / h.scale.double() for h in heads])  # [H, D]
        mean = torch.stack([h.mean.double() for h in heads])  # [H, D]
        b = torch.tensor([h.bias for h in heads], dtype=torch.float64) - (w * mean).sum(-1)  # [H]
        self.weights = w.to(device=device, dtype=torch.float32)
        self.bias = b.to(device=device, dtype=torch.float32)

    def log_odds(
        self,
        features: torch.Tensor,  # [B, W, D]
        head_index: torch.Tensor,  # [B] int64, index of each row's head
    ) -> torch.Tensor:  # [B, W]
        z = features.float() @ self.weights.T + self.bias  # [B, W, H]
        return z.gather(-1, head_index[:, None, None].expand(-1, z.shape[1], 1))[..., 0]
