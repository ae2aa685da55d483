"""Pure acceptance rules: exact match, the rejection-sampling ratio test, and AutoJudge's prefix rule.

Vocabulary: *accepted* drafts (exact or *judge-accepted*), then one *recovered* token at the first rejected slot,
or a *bonus* token when the whole window is accepted.
"""

from __future__ import annotations

import torch


def window_mask(widths: torch.Tensor, width: int) -> torch.Tensor:  # [B] -> [B, W] bool
    return torch.arange(width, device=widths.device)[None, :] < widths[:, None]


def greedy_match(
    draft_ids: torch.Tensor,  # [B, W]
    target_argmax: torch.Tensor,  # [B, W+1]
) -> torch.Tensor:  # [B, W] bool
    """Slot i matches when d_{i+1} equals the target's argmax of row i (the row that predicts it)."""
    return draft_ids == target_argmax[:, : draft_ids.shape[1]]


def ratio_test(
    draft_ids: torch.Tensor,  # [B, W]
    draft_probs: torch.Tensor,  # [B, W, V]
    target_probs: torch.Tensor,  # [B, W, V], row i predicts slot i
    uniforms: torch.Tensor,  # [B, W] in [0, 1)
) -> torch.Tensor:  # [B, W] bool
    """Speculative sampling: accept d with probability min(1, q(d) / g(d))."""
    q = target_probs.gather(-1, draft_ids[..., None])[..., 0]
    g = draft_probs.gather(-1, draft_ids[..., None])[..., 0]
    return uniforms * g < q


def accept_lengths(
    ok: torch.Tensor,  # [B, W] bool, slot may be kept
    widths: torch.Tensor,  # [B] drafted slots per row
) -> torch.Tensor:  # [B] n: length of each row's leading run of kept slots
    kept = ok & window_mask(widths, ok.shape[1])
    return torch.cumprod(kept.int(), dim=1).sum(dim=1)


def autojudge_accept(
    exact_ok: torch.Tensor,  # [B, W] bool, match (greedy) or ratio test passed (sampling)
    judge_ok: torch.Tensor,  # [B, W] bool, judge calls the mismatch unimportant
    widths: torch.Tensor,  # [B]
) -> tuple[torch.Tensor, torch.Tensor]:  # n [B], judge-accepted slots [B, W] bool
    """Acceptance continues through judge-accepted mismatches and stops at the first rejected slot."""
    n = accept_lengths(exact_ok | judge_ok, widths)
    before_n = window_mask(n, exact_ok.shape[1])
    return n, judge_ok & ~exact_ok & before_n
