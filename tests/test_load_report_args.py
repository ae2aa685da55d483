"""benchmarks/load_report.py refuses, before any server starts, modes it cannot measure: unknown names, and judge
modes for a task whose head the pair does not ship."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import engine.build
from judge.io import METADATA

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import load_report


@pytest.fixture
def shipped_code_head_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "qwen-coder" / "code").mkdir(parents=True)
    (tmp_path / "qwen-coder" / "code" / METADATA).write_text("{}")
    monkeypatch.setattr(engine.build, "SHIPPED_HEADS", tmp_path)


def test_judge_modes_need_the_tasks_head(shipped_code_head_only: None) -> None:
    with pytest.raises(SystemExit, match="no 'math' head \\(it serves code, lossless\\)"):
        load_report.check_modes(load_report.parse_args(["--pair", "qwen-coder", "--task", "math"]))
    load_report.check_modes(load_report.parse_args(["--pair", "qwen-coder", "--task", "code"]))
    load_report.check_modes(
        load_report.parse_args(["--pair", "qwen-coder", "--task", "math", "--modes", "lossless auto,lossless K=4"])
    )


def test_unknown_modes_are_named(shipped_code_head_only: None) -> None:
    with pytest.raises(SystemExit, match="unknown modes \\['judge K=3'\\]"):
        load_report.check_modes(
            load_report.parse_args(["--pair", "qwen-coder", "--task", "code", "--modes", "judge K=3"])
        )
