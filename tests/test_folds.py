"""Cross-fitting by task id: folds partition the problems, a head can be fitted without one fold, and the
evaluation of a fold refuses a head that may have seen its labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_judge_heads import synthetic_features

from training.cli import check_held_out, main
from training.features import save_features, without_prompts
from training.folds import Fold, fold_of, parse_fold


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
