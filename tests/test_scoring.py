"""Scoring a sweep's traces: a run whose target numerics failed has no answer and is counted, never scored."""

from __future__ import annotations

from training.data import Problem
from training.evaluate import markdown_table, score_traces, summarise
from training.replay import Job, Method, Trace

LOSSLESS, DRAFT = Method("lossless"), Method("draft")


def trace(method: Method, pid: str, tokens: list[int], failed: bool = False) -> Trace:
    n = len(tokens)
    return Trace(Job(f"{method.label}|{pid}", (1, 2), method, 8), tokens, [True] * n, [False] * n, True, failed)


def outcome(_: Problem, tokens: list[int]) -> str | None:
    return str(tokens[-1]) if tokens else None


def test_a_failed_run_is_wrong_agrees_only_with_a_failed_reference_and_is_reported() -> None:
    problems = {pid: Problem(pid, "math", "q", "7") for pid in ("a", "b")}
    traces = [
        trace(LOSSLESS, "a", [3, 7]),
        trace(LOSSLESS, "b", [], failed=True),
        trace(DRAFT, "a", [3], failed=True),  # it had emitted a token before its target overflowed
        trace(DRAFT, "b", [], failed=True),
    ]
    results = score_traces(traces, problems, (4,), outcome, lambda p, out: out == p.reference)
    assert [(r.correct, r.outcome, r.failed) for r in results[DRAFT]] == [(False, None, True), (False, None, True)]
    rows = {r["label"]: r for r in summarise(results, LOSSLESS, (4,))}
    assert rows["draft"]["failed"] == 2 and rows["lossless"]["failed"] == 1
    assert rows["draft"]["agreement"] == 0.5  # b: both failed; a: the reference answered, the draft did not
    assert rows["draft"]["accuracy"] == 0.0 and rows["draft"]["accuracy_drop_points"] == 50.0
    table = markdown_table(list(rows.values()), (4,))
    assert "stopped being finite" in table and "draft 2" in table and "lossless 1" in table
    clean = summarise(
        score_traces(traces[:1], problems, (4,), outcome, lambda p, out: out == p.reference), LOSSLESS, (4,)
    )
    assert "finite" not in markdown_table(clean, (4,))
