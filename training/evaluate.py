"""Threshold sweeps and baselines on held-out problems -> one row per method point (CSV, markdown, PNG, JSON).

Quality is answer agreement with the target's own greedy answer (the lossless run) and ground-truth accuracy;
speed is accepted tokens per cycle and target forwards per token for each window W (training/replay.py).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from training.data import Problem
from training.replay import Method, Trace, cycles_for_window

Z95 = 1.959964


@dataclass(frozen=True, slots=True)
class ProblemResult:
    prompt_id: str
    outcome: str | None
    correct: bool
    num_tokens: int
    cycles: dict[int, int]  # W -> cycles
    mismatches: int
    kept_mismatches: int
    failed: bool = False  # the target's numerics failed: no answer, counted wrong


class MethodPoint(Protocol):
    """What a curve row needs of its method: a `Method`, or a pooled point (training/crossfit.py)."""

    @property
    def rule(self) -> str: ...
    @property
    def param(self) -> float: ...
    @property
    def label(self) -> str: ...


def paired_drop(method: list[bool], reference: list[bool]) -> tuple[float, float, float]:
    """Accuracy drop vs the reference in points (reference minus method) on the same problems, with a 95% normal
    interval of the paired per-problem differences."""
    n = len(method)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    diffs = [float(r) - float(m) for m, r in zip(method, reference, strict=True)]
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    half = Z95 * math.sqrt(var / n)
    return (100 * mean, 100 * (mean - half), 100 * (mean + half))


def wilson(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return (centre - half, centre + half)


def score_traces(
    traces: list[Trace],
    problems: dict[str, Problem],
    windows: tuple[int, ...],
    outcome: Callable[[Problem, list[int]], str | None],
    is_correct: Callable[[Problem, str | None], bool],
) -> dict[Method, list[ProblemResult]]:
    """Per method, per problem: outcome, correctness and the counts the speed metrics need."""
    out: dict[Method, list[ProblemResult]] = {}
    for tr in traces:
        prompt_id = tr.job.job_id.split("|", 1)[1]
        problem = problems[prompt_id]
        result = None if tr.failed else outcome(problem, tr.tokens)
        kept = sum(ok and mm for ok, mm in zip(tr.ok, tr.mismatch, strict=True))
        out.setdefault(tr.job.method, []).append(
            ProblemResult(
                prompt_id=prompt_id,
                outcome=result,
                correct=not tr.failed and is_correct(problem, result),
                num_tokens=len(tr.tokens),
                cycles={w: cycles_for_window(tr.ok, w) for w in windows},
                mismatches=sum(tr.mismatch),
                kept_mismatches=kept,
                failed=tr.failed,
            )
        )
    return out


def summarise(
    results: Mapping[Any, list[ProblemResult]], reference: MethodPoint, windows: tuple[int, ...]
) -> list[dict[str, Any]]:
    """One row per method point; agreement and the accuracy drop are against the reference (lossless) run of
    the same problems."""
    ref = {r.prompt_id: (r.outcome, r.failed) for r in results[reference]}
    ref_correct = {r.prompt_id: r.correct for r in results[reference]}
    ref_speed = {w: _tokens_per_cycle(results[reference], w) for w in windows}
    rows = []
    for method, res in results.items():
        n = len(res)
        agree = sum((r.outcome, r.failed) == ref[r.prompt_id] for r in res)
        drop = paired_drop([r.correct for r in res], [ref_correct[r.prompt_id] for r in res])
        correct = sum(r.correct for r in res)
        tokens = sum(r.num_tokens for r in res)
        mismatches = sum(r.mismatches for r in res)
        row: dict[str, Any] = {
            "method": method.rule,
            "param": method.param,
            "label": method.label,
            "problems": n,
            "agreement": agree / n,
            "agreement_lo": wilson(agree, n)[0],
            "agreement_hi": wilson(agree, n)[1],
            "accuracy": correct / n,
            "accuracy_lo": wilson(correct, n)[0],
            "accuracy_hi": wilson(correct, n)[1],
            "accuracy_drop_points": drop[0],
            "accuracy_drop_lo": drop[1],
            "accuracy_drop_hi": drop[2],
            "accepted_mismatch_fraction": sum(r.kept_mismatches for r in res) / mismatches if mismatches else 0.0,
            "tokens_per_problem": tokens / n,
            "failed": sum(r.failed for r in res),
        }
        for w in windows:
            cycles = sum(r.cycles[w] for r in res)
            row[f"tokens_per_cycle_w{w}"] = _tokens_per_cycle(res, w)
            row[f"speedup_w{w}"] = row[f"tokens_per_cycle_w{w}"] / ref_speed[w]  # x lossless tokens per cycle
            row[f"target_forwards_per_token_w{w}"] = cycles / tokens if tokens else math.nan
        rows.append(row)
    rows.sort(key=lambda r: (r["method"], r["param"]))
    return rows


def _tokens_per_cycle(res: list[ProblemResult], window: int) -> float:
    cycles = sum(r.cycles[window] for r in res)
    return sum(r.num_tokens for r in res) / cycles if cycles else math.nan


def write_reports(rows: list[dict[str, Any]], out_dir: Path, windows: tuple[int, ...], meta: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out_dir / "results.md").write_text(markdown_table(rows, windows))
    plot(rows, out_dir / "curve.png", windows)


def markdown_table(rows: list[dict[str, Any]], windows: tuple[int, ...]) -> str:
    head = ["method", "n", "agreement (95% CI)", "accuracy", "acc. drop, points (95% CI)", "mismatches accepted"]
    head += [f"tok/cycle W={w}" for w in windows]
    head += [f"x lossless W={windows[-1]}", f"target fwd/tok W={windows[-1]}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["label"],
            str(r["problems"]),
            f"{r['agreement']:.3f} ({r['agreement_lo']:.3f}-{r['agreement_hi']:.3f})",
            f"{r['accuracy']:.3f}",
            f"{r['accuracy_drop_points']:.1f} ({r['accuracy_drop_lo']:.1f} to {r['accuracy_drop_hi']:.1f})",
            f"{r['accepted_mismatch_fraction']:.3f}",
        ]
        cells += [f"{r[f'tokens_per_cycle_w{w}']:.2f}" for w in windows]
        cells.append(f"{r[f'speedup_w{windows[-1]}']:.2f}")
        cells.append(f"{r[f'target_forwards_per_token_w{windows[-1]}']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    failed = [f"{r['label']} {r['failed']}" for r in rows if r.get("failed")]
    if failed:
        lines += ["", "Runs whose target logits stopped being finite (no answer, counted wrong): " + ", ".join(failed)]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, windows: tuple[int, ...]) -> None:
    """Quality against accepted tokens per cycle (the largest W), one line per method family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = windows[-1]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric in zip(axes, ("agreement", "accuracy"), strict=True):
        for rule in sorted({r["method"] for r in rows}):
            pts = sorted((r[f"tokens_per_cycle_w{w}"], r[metric]) for r in rows if r["method"] == rule)
            style = "o" if len(pts) == 1 else "o-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=rule, markersize=4)
        ax.set_xlabel(f"accepted tokens per cycle (W={w}, no bonus)")
        ax.set_ylabel("answer agreement with the target" if metric == "agreement" else "ground-truth accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
