"""Verifier: one target forward per cycle over `[s_{L-1}, d_1 .. d_W]` per row -> TargetScores."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.runner import ModelRunner
from engine.sequence import Sequence


@dataclass(frozen=True, slots=True)
class TargetScores:
    """Row i of the window predicts slot i+1 (its input is d_i, or s_{L-1} for i = 0)."""

    logits: torch.Tensor  # [B, W+1, V] fp32
    argmax: torch.Tensor  # [B, W+1]
    finite: torch.Tensor  # [B, W+1] bool: the slot's logits hold no NaN and not all are -inf (nor any +inf)
    hidden: torch.Tensor  # [B, W+1, Dt]; hidden[:, i] is the DT feature of slot i (input d_i), i >= 1


class Verifier:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def verify(self, seqs: list[Sequence], drafted: list[list[int]]) -> TargetScores:
        for s in seqs:
            assert s.target_len == len(s.token_ids) - 1, "target cache must end one token before the sequence"
        feeds = [[s.token_ids[-1], *d] for s, d in zip(seqs, drafted, strict=True)]
        hidden = self.runner.forward(feeds, [s.target_len for s in seqs], [s.slot for s in seqs])
        logits = self.runner.logits(hidden)
        top = logits.max(-1)  # max propagates NaN: one pass gives the argmax and the numerics check
        return TargetScores(logits=logits, argmax=top.indices, finite=top.values.isfinite(), hidden=hidden)
