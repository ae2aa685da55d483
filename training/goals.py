"""Goal statements read off an evaluation's curve (`results.json` of `evaluate` or `pool`), so that the claims a
report makes come from one rule instead of a reading of the table:

- the fastest AutoJudge point whose accuracy drop is at most `max_drop` points and whose outcome agreement with
  the target is at least `min_agreement`, as a ratio of lossless tokens per cycle at window W, against a goal ratio;
- each baseline point against the AutoJudge curve (its points that no other beats in both speed and accuracy,
  lossless included, τ = 0) at equal speed: below AutoJudge when some curve point is at least as fast and at
  least as accurate; above when it is itself that to some curve point (and better in one of the two); else beyond
  AutoJudge's speed when it is faster than every curve point, or between AutoJudge points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Row = dict[str, Any]
JUDGE = ("autojudge", "lossless")  # the AutoJudge curve: its thresholds and τ = 0
Quality = Literal["accuracy", "agreement"]
Verdict = Literal["below AutoJudge", "above AutoJudge", "beyond AutoJudge's speed", "between AutoJudge points"]


@dataclass(frozen=True, slots=True)
class Goal:
    max_drop: float  # accuracy points lost against lossless, at most
    min_agreement: float  # outcome agreement with the target's own answers, at least
    speedup: float  # lossless tokens per cycle multiplied by this, at least
    window: int  # the W whose tokens per cycle count

    def __post_init__(self) -> None:
        if self.max_drop < 0 or not 0 <= self.min_agreement <= 1 or self.speedup <= 0 or self.window < 1:
            raise ValueError("max_drop >= 0, min_agreement in [0, 1], speedup > 0 and window >= 1")


def speed(row: Row, window: int) -> float:
    """Tokens per cycle over lossless's at `window` (the evaluation's `speedup_w<W>`)."""
    key = f"speedup_w{window}"
    if key not in row:
        raise ValueError(f"the evaluation has no tokens per cycle at W = {window}")
    return float(row[key])


def best_point(rows: Sequence[Row], goal: Goal) -> Row | None:
    """The fastest AutoJudge threshold within the goal's accuracy drop and agreement; None when none is."""
    ok = [
        r
        for r in rows
        if r["method"] == "autojudge"
        and r["accuracy_drop_points"] <= goal.max_drop
        and r["agreement"] >= goal.min_agreement
    ]
    return max(ok, key=lambda r: speed(r, goal.window), default=None)


def frontier(judge: Sequence[Row], window: int, quality: Quality = "accuracy") -> list[Row]:
    """The AutoJudge points no other one beats in both speed and `quality`: a point that a faster and better
    threshold already beats (a noisy curve has some) is not where the curve lies."""

    def beats(a: Row, b: Row) -> bool:
        ge = speed(a, window) >= speed(b, window) and a[quality] >= b[quality]
        return ge and (speed(a, window) > speed(b, window) or a[quality] > b[quality])

    return [j for j in judge if not any(beats(k, j) for k in judge)]


def verdict(baseline: Row, judge: Sequence[Row], window: int, quality: Quality = "accuracy") -> Verdict:
    """Where one baseline point lies against the AutoJudge curve at equal or better speed (see the module), by
    ground-truth accuracy or by outcome agreement with the target (less noisy: it has no task difficulty in it)."""
    judge = frontier(judge, window, quality)
    x, acc = speed(baseline, window), baseline[quality]
    if any(speed(j, window) >= x and j[quality] >= acc for j in judge):
        return "below AutoJudge"
    if any(speed(j, window) <= x and j[quality] <= acc for j in judge):
        return "above AutoJudge"  # not below, so better than that point in speed or accuracy
    if x > max(speed(j, window) for j in judge):
        return "beyond AutoJudge's speed"
    return "between AutoJudge points"


def statements(rows: Sequence[Row], goal: Goal) -> list[str]:
    """Markdown lines: the speed goal met or not and why, then each baseline's place against AutoJudge."""
    judge = [r for r in rows if r["method"] in JUDGE]
    if not any(r["method"] == "lossless" for r in judge):
        raise ValueError("the evaluation has no lossless row to compare with")
    best = best_point(rows, goal)
    w, rule = goal.window, f"drop <= {goal.max_drop:g} points and agreement >= {goal.min_agreement:.1%}"
    if best is None:
        lines = [f"- **Speed goal not met**: no AutoJudge threshold keeps {rule}."]
    else:
        met = speed(best, w) >= goal.speedup
        lines = [
            f"- **Speed goal {'met' if met else 'not met'}**: the fastest AutoJudge point with {rule} is "
            f"`{best['label']}`: {speed(best, w):.2f}x lossless tokens per cycle at W = {w} (goal {goal.speedup:g}x), "
            f"drop {best['accuracy_drop_points']:.1f} points (95% CI {best['accuracy_drop_lo']:.1f} to "
            f"{best['accuracy_drop_hi']:.1f}), agreement {best['agreement']:.1%}."
        ]
    fastest = max(judge, key=lambda r: speed(r, w))
    lines.append(
        f"- Fastest AutoJudge point at any accuracy: `{fastest['label']}`, {speed(fastest, w):.2f}x, drop "
        f"{fastest['accuracy_drop_points']:.1f} points, agreement {fastest['agreement']:.1%}."
    )
    baselines = [r for r in rows if r["method"] not in JUDGE]
    for b in sorted(baselines, key=lambda r: (r["method"], speed(r, w))):
        lines.append(
            f"- `{b['label']}` ({speed(b, w):.2f}x, accuracy {b['accuracy']:.3f}, drop {b['accuracy_drop_points']:.1f}"
            f" points, agreement {b['agreement']:.1%}): by accuracy {verdict(b, judge, w)}, by agreement "
            f"{verdict(b, judge, w, 'agreement')}."
        )
    for quality in ("accuracy", "agreement"):
        placed = [verdict(b, judge, w, quality) for b in baselines]
        lines.append(
            f"- By {quality}, of {len(baselines)} baseline points {placed.count('below AutoJudge')} lie below "
            f"AutoJudge at equal or better speed and {placed.count('above AutoJudge')} above it."
        )
    return lines
