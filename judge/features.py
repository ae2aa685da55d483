"""Pure: judge features from last-layer, post-final-norm hidden states (method §3).

`DT` is the target's state at the slot whose input is the draft token (free from the verify pass); `DD-DT`
puts the draft's state after reading the same token in front of it (one extra draft forward per cycle).
"""

from __future__ import annotations

import torch

LAYOUTS = ("DT", "DD-DT")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown feature layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def build_features(
    layout: str,
    target_hidden: torch.Tensor,  # [..., Dt]
    draft_hidden: torch.Tensor | None,  # [..., Dd], required for DD-DT
) -> torch.Tensor:  # [..., D]
    check_layout(layout)
    if layout == "DT":
        return target_hidden.float()
    if draft_hidden is None:
        raise ValueError("the DD-DT layout needs the draft's hidden states")
    return torch.cat([draft_hidden.float(), target_hidden.float()], dim=-1)


def feature_dim(layout: str, target_hidden_size: int, draft_hidden_size: int) -> int:
    check_layout(layout)
    return target_hidden_size + (draft_hidden_size if layout == "DD-DT" else 0)
