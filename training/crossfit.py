"""Pool cross-fitted evaluations into one curve: K fold runs, each judged by the head fitted without its fold.

Each `autojudge-train evaluate` run writes `problems.jsonl`, one line per (method, problem). Fold runs name their
AutoJudge points by the head's threshold quantile (each fold's head has its own τ for quantile q, chosen on its own
training folds, never on the evaluated problems), so the pooled point `autojudge q=i` joins every fold's quantile i,
and `autojudge default` joins every fold head's default τ (the operating point a server would use, also chosen
without the evaluated problems). One τ may stand for several pooled points: its results are recorded once per name.
Baselines need no head and pool by rule and parameter; a problem decoded by two runs (a baseline run over all
problems, and a fold run) must give the same record, and is counted once.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.evaluate import ProblemResult
from training.jsonlines import read_complete
from training.replay import Method

PROBLEMS = "problems.jsonl"


@dataclass(frozen=True, slots=True)
class Point:
    """A pooled method point: a rule and its parameter (for AutoJudge, the threshold quantile index)."""

    rule: str
    param: float
    label: str


DEFAULT = "default"  # the pooled name of each head's default τ


def problem_records(
    results: Mapping[Method, list[ProblemResult]], pooled_as: Mapping[Method, list[int | str]]
) -> Iterable[dict[str, Any]]:
    """The lines of `problems.jsonl`: each result with its method, once per pooled name of an AutoJudge point (a
    quantile index, or DEFAULT)."""
    for method, res in results.items():
        names: list[int | str | None] = [*pooled_as.get(method, [])] or [None]
        for name in names:
            for r in res:
                yield {"rule": method.rule, "param": method.param, "quantile": name, **_fields(r)}


def _fields(r: ProblemResult) -> dict[str, Any]:
    d = dataclasses.asdict(r)
    d["cycles"] = {str(w): c for w, c in r.cycles.items()}
    return d


def _result(record: dict[str, Any]) -> ProblemResult:
    names = [f.name for f in dataclasses.fields(ProblemResult)]
    fields = {k: record[k] for k in names if k in record}  # `failed` is absent from older runs
    fields["cycles"] = {int(w): c for w, c in record["cycles"].items()}
    return ProblemResult(**fields)


def point_of(record: dict[str, Any], where: str) -> Point:
    rule, param = record["rule"], float(record["param"])
    if rule != "autojudge":
        return Point(rule, param, Method(rule, param).label)
    q = record["quantile"]
    if q is None:
        raise ValueError(f"{where}: AutoJudge points set by explicit thresholds cannot be pooled (use --quantiles)")
    if q == DEFAULT:
        return Point(rule, -1.0, "autojudge default")
    return Point(rule, float(q), f"autojudge q={q}")


def pool(runs: Mapping[str, list[dict[str, Any]]]) -> dict[Point, list[ProblemResult]]:
    """Per pooled point, each problem's result once; two runs that disagree on one problem are an error."""
    pooled: dict[Point, dict[str, ProblemResult]] = {}
    for where, records in runs.items():
        for record in records:
            point, result = point_of(record, where), _result(record)
            seen = pooled.setdefault(point, {}).get(result.prompt_id)
            if seen is not None and seen != result:
                raise ValueError(f"{where}: {point.label} on {result.prompt_id} differs from an earlier run")
            pooled[point][result.prompt_id] = result
    return {p: [by_id[k] for k in sorted(by_id)] for p, by_id in pooled.items()}


def read_run(directory: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """An evaluation directory's meta (results.json) and problem records."""
    summary, records = directory / "results.json", directory / PROBLEMS
    if not summary.is_file() or not records.is_file():
        raise FileNotFoundError(f"{directory} is not a finished evaluation (expected results.json and {PROBLEMS})")
    meta = json.loads(summary.read_text())["meta"]
    return meta, read_complete(records, "an evaluation problem record")[0]


def judge_rates(directory: Path) -> set[float]:
    """The accepted-mismatch fractions of the AutoJudge rows of a finished report (an evaluation or a pooled
    curve): the rates at which random acceptance is the matched baseline."""
    summary = directory / "results.json"
    if not summary.is_file():
        raise FileNotFoundError(f"{directory} holds no report (expected results.json)")
    rows = json.loads(summary.read_text())["rows"]
    return rates_of(rows)


def rates_of(rows: Iterable[Mapping[str, Any]]) -> set[float]:
    return {round(r["accepted_mismatch_fraction"], 4) for r in rows if r["method"] == "autojudge"}


SAME_SETUP = ("pair", "source", "max_new_tokens", "windows")


def check_runs(metas: Mapping[str, dict[str, Any]]) -> None:
    """The runs must share pair, source, budget and windows, and fold runs must cover distinct folds."""
    first_name, first = next(iter(metas.items()))
    for name, meta in metas.items():
        for key in SAME_SETUP:
            if meta.get(key) != first.get(key):
                raise ValueError(f"{name} and {first_name} differ in {key}: {meta.get(key)!r} vs {first.get(key)!r}")
    folds = [m["fold"] for m in metas.values() if m.get("fold")]
    if len(set(folds)) != len(folds):
        raise ValueError(f"two runs evaluate the same fold: {sorted(folds)}")
