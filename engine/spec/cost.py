"""The step-cost model: seconds of one target or draft forward over `rows` rows of `tokens` fed tokens each,
from a grid measured at start-up (engine/spec/profiler.py), interpolated piecewise-linearly in both axes.

A forward pads its rows to the longest, so a verify costs `target(B, 1 + max W)` and a draft step
`draft(rows still drafting, 1)`. Beyond the grid the cost is extrapolated from its last segment (linear in the
tokens a forward computes, which is how a compute-bound forward grows).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from typing import Any


def interpolate(xs: tuple[int, ...], ys: tuple[float, ...], x: float) -> float:
    """Piecewise-linear through (xs, ys), xs ascending; linear extrapolation from the end segments."""
    if len(xs) == 1:
        return ys[0] * x / xs[0]  # one point: proportional
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), 0.0)


@dataclass(frozen=True, slots=True)
class ForwardCost:
    """Measured seconds of one model's forward: `seconds[i][j]` for `rows[i]` rows of `tokens[j]` tokens."""

    rows: tuple[int, ...]  # ascending
    tokens: tuple[int, ...]  # ascending
    seconds: tuple[tuple[float, ...], ...]  # [len(rows)][len(tokens)]
    scale: float = 1.0  # how fast the device runs now against the profile (not saved: it is learned online)

    def __post_init__(self) -> None:
        if not self.rows or not self.tokens:
            raise ValueError("a cost grid needs at least one row count and one token count")
        if list(self.rows) != sorted(set(self.rows)) or list(self.tokens) != sorted(set(self.tokens)):
            raise ValueError("cost grid axes must be strictly ascending")
        if len(self.seconds) != len(self.rows) or any(len(r) != len(self.tokens) for r in self.seconds):
            raise ValueError("cost grid shape does not match its axes")

    def __call__(self, rows: int, tokens: int) -> float:
        if rows <= 0 or tokens <= 0:
            return 0.0
        per_rows = tuple(interpolate(self.tokens, r, tokens) for r in self.seconds)  # at each grid row count
        return self.scale * interpolate(self.rows, per_rows, rows)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows), "tokens": list(self.tokens), "seconds": [list(r) for r in self.seconds]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ForwardCost:
        return cls(tuple(d["rows"]), tuple(d["tokens"]), tuple(tuple(float(x) for x in r) for r in d["seconds"]))


@dataclass(frozen=True, slots=True)
class StepCost:
    """Both models' forward costs, measured on one device with one thread count, after `context` cached tokens."""

    target: ForwardCost
    draft: ForwardCost
    context: int

    def scaled(self, scale: float) -> StepCost:
        """Both grids times `scale`: the profile on a device that now runs that much slower (a shared CPU's speed
        drifts by tens of percent; the profile was measured once, at start-up)."""
        return replace(self, target=replace(self.target, scale=scale), draft=replace(self.draft, scale=scale))

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target.to_dict(), "draft": self.draft.to_dict(), "context": self.context}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepCost:
        return cls(ForwardCost.from_dict(d["target"]), ForwardCost.from_dict(d["draft"]), int(d["context"]))
