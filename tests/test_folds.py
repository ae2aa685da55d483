"""Cross-fitting by task id: folds partition the problems, a head can be fitted without one fold, and the
evaluation of a fold refuses a head that may have seen its labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_judge_heads import synthetic_features

from training.cli import check_held_out, main
from training.crossfit import Point, check_runs, pool, problem_records
from training.evaluate import ProblemResult, summarise
from training.features import save_features, without_prompts
from training.folds import Fold, fold_of, parse_fold
from training.replay import Method


def test_parse_fold_reads_f_of_k_and_names_bad_text() -> None:
    assert parse_fold("2/5") == Fold(2, 5) and str(parse_fold(" 0/3 ")) == "0/3"
    for bad in ("5/5", "0/1", "1", "a/b", "-1/5"):
        with pytest.raises(ValueError, match="F/K"):
            parse_fold(bad)


def test_folds_partition_numbered_ids_evenly_and_hash_the_rest() -> None:
    ids = [f"HumanEval/{i}" for i in range(164)]
    folds = [Fold(f, 5) for f in range(5)]
    assert all(sum(f.holds(pid) for f in folds) == 1 for pid in ids)
    assert sorted(sum(f.holds(pid) for pid in ids) for f in folds) == [32, 33, 33, 33, 33]
    assert fold_of("gsm8k-train-17", 5) == fold_of("HumanEval/17", 5) == 2
    assert fold_of("no-number", 5) == fold_of("no-number", 5) in range(5)


def test_without_prompts_drops_their_mismatches_and_reindexes() -> None:
    fs = synthetic_features(n=120, prompts=12)
    fold = Fold(1, 4)
    kept = without_prompts(fs, fold.holds)
    assert kept.prompt_ids == [pid for pid in fs.prompt_ids if not fold.holds(pid)]
    assert kept.meta["prompts_dropped"] == 3
    rows = torch.tensor([not fold.holds(fs.prompt_ids[i]) for i in fs.prompt_index.tolist()])
    assert torch.equal(kept.dt, fs.dt[rows]) and torch.equal(kept.labels, fs.labels[rows])
    # every kept mismatch still names its own prompt
    assert [kept.prompt_ids[i] for i in kept.prompt_index.tolist()] == [
        fs.prompt_ids[i] for i, keep in zip(fs.prompt_index.tolist(), rows.tolist(), strict=True) if keep
    ]


def test_fit_without_a_fold_records_it_and_evaluation_checks_it(tmp_path: Path) -> None:
    fs = synthetic_features(n=400, prompts=40)
    save_features(fs, tmp_path / "f.safetensors")
    out = tmp_path / "head"
    assert main(["fit", "--features", str(tmp_path / "f.safetensors"), "--out", str(out), "--exclude-fold", "1/5"]) == 0
    meta = json.loads((out / "head.json").read_text())
    assert meta["provenance"]["excluded_fold"] == "1/5"
    assert meta["fit"]["counts"]["prompts"] == 32  # 40 prompts, 8 of them in fold 1
    check_held_out(meta, Fold(1, 5), out)
    with pytest.raises(ValueError, match=r"--exclude-fold 2/5; .* excluded 1/5"):
        check_held_out(meta, Fold(2, 5), out)
    with pytest.raises(ValueError, match="excluded no fold"):
        check_held_out({"provenance": {}}, Fold(0, 5), out)


def test_bad_fold_flags_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--features", "x", "--out", "y", "--exclude-fold", "5/5"])
    assert exit_info.value.code == 2
    assert "a fold is F/K with K >= 2 and 0 <= F < K, not 5/5" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["evaluate", "--slots", "0"], "expected a positive integer, not '0'"),  # would wait for a slot for ever
        (["mine", "--concurrency", "0", "--out", "x"], "expected a positive integer, not '0'"),
        (["features", "--group", "-2"], "expected a positive integer, not '-2'"),
        (["evaluate", "--offset", "-1"], "expected a whole number >= 0, not '-1'"),
    ],
)
def test_bad_counts_are_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def _result(pid: str, correct: bool, tokens: int = 10) -> ProblemResult:
    return ProblemResult(pid, "y" if correct else "n", correct, tokens, {8: 4, 32: 2}, 3, 1)


def test_pool_joins_each_folds_quantile_and_counts_shared_baselines_once() -> None:
    fold0 = {Method("lossless"): [_result("t/0", True)], Method("autojudge", 0.31): [_result("t/0", True, 8)]}
    fold1 = {Method("lossless"): [_result("t/1", True)], Method("autojudge", 0.47): [_result("t/1", False, 7)]}
    everything = {Method("lossless"): [_result("t/0", True), _result("t/1", True)]}
    runs = {
        "f0": list(problem_records(fold0, {Method("autojudge", 0.31): [12]})),
        "f1": list(problem_records(fold1, {Method("autojudge", 0.47): [12, "default"]})),
        "all": [json.loads(json.dumps(r)) for r in problem_records(everything, {})],  # through JSON, as on disk
    }
    pooled = pool(runs)
    judge = Point("autojudge", 12.0, "autojudge q=12")
    default = Point("autojudge", -1.0, "autojudge default")  # fold 1's default τ is its quantile 12
    assert set(pooled) == {Point("lossless", 0.0, "lossless"), judge, default}
    assert [r.prompt_id for r in pooled[default]] == ["t/1"]
    assert [r.prompt_id for r in pooled[judge]] == ["t/0", "t/1"]
    rows = {r["label"]: r for r in summarise(pooled, Point("lossless", 0.0, "lossless"), (8, 32))}
    assert rows["autojudge q=12"]["agreement"] == 0.5
    assert rows["autojudge q=12"]["accuracy_drop_points"] == 50.0
    assert rows["lossless"]["accuracy_drop_points"] == 0.0
    assert rows["autojudge q=12"]["accuracy_drop_lo"] < 50.0 < rows["autojudge q=12"]["accuracy_drop_hi"]
    runs["bad"] = list(problem_records({Method("lossless"): [_result("t/1", False)]}, {}))
    with pytest.raises(ValueError, match="bad: lossless on t/1 differs from an earlier run"):
        pool(runs)
    with pytest.raises(ValueError, match="explicit thresholds cannot be pooled"):
        pool({"x": list(problem_records({Method("autojudge", 0.3): [_result("t/0", True)]}, {}))})


def test_pooled_runs_must_share_their_setup_and_cover_distinct_folds() -> None:
    base = {"pair": {"a": 1}, "source": "humaneval-all", "max_new_tokens": 256, "windows": [8, 32]}
    check_runs({"f0": {**base, "fold": "0/5"}, "f1": {**base, "fold": "1/5"}, "all": {**base, "fold": None}})
    with pytest.raises(ValueError, match="differ in max_new_tokens"):
        check_runs({"f0": base, "f1": {**base, "max_new_tokens": 512}})
    with pytest.raises(ValueError, match="two runs evaluate the same fold"):
        check_runs({"a": {**base, "fold": "0/5"}, "b": {**base, "fold": "0/5"}})


def test_records_of_runs_older_than_the_failed_field_pool_as_not_failed() -> None:
    old = [
        {k: v for k, v in r.items() if k != "failed"}
        for r in problem_records({Method("lossless"): [_result("t/0", True)]}, {})
    ]
    pooled = pool({"old": old})
    assert [r.failed for r in pooled[Point("lossless", 0.0, "lossless")]] == [False]
