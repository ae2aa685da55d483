"""benchmarks/load_report.py refuses, before any server starts, modes it cannot measure: unknown names, and judge
modes for a task the server it would start serves no profile for (its flags and inherited environment decide)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import engine.build
from judge.io import METADATA

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import load_report


def heads_dir(root: Path, *names: str) -> Path:
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / METADATA).write_text("{}")
    return root


@pytest.fixture(autouse=True)
def shipped_code_head_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    heads_dir(tmp_path / "shipped" / "qwen-coder", "code")
    monkeypatch.setattr(engine.build, "SHIPPED_HEADS", tmp_path / "shipped")


def test_the_planned_profiles_follow_the_servers_flags_and_environment(tmp_path: Path) -> None:
    flags = ["--pair", "qwen-coder"]
    assert load_report.planned_profiles(flags, {}) == {"lossless", "code"}
    assert load_report.planned_profiles(flags, {"AUTOJUDGE_DRAFT": "none"}) == {"lossless"}
    assert load_report.planned_profiles(flags, {"AUTOJUDGE_HEADS": "none"}) == {"lossless"}
    mine = heads_dir(tmp_path / "mine", "math")
    assert load_report.planned_profiles(flags, {"AUTOJUDGE_HEADS": str(mine)}) == {"lossless", "math"}
    with pytest.raises(SystemExit, match=r"would not start: .*does not exist"):
        load_report.planned_profiles(flags, {"AUTOJUDGE_HEADS": str(tmp_path / "nowhere")})


def test_judge_modes_need_the_tasks_profile() -> None:
    args = load_report.parse_args(["--task", "math"])
    with pytest.raises(SystemExit, match="no 'math' profile \\(it serves code, lossless\\)"):
        load_report.check_modes(args, ["no-spec", "judge auto"], {"lossless", "code"})
    load_report.check_modes(args, ["no-spec", "lossless auto"], {"lossless", "code"})
    load_report.check_modes(args, ["no-spec", "judge auto"], {"lossless", "math"})


def test_main_refuses_before_any_server_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOJUDGE_DRAFT", "none")
    monkeypatch.setattr(load_report, "Server", lambda *a: pytest.fail("a server was started"))
    with pytest.raises(SystemExit, match="no 'code' profile \\(it serves lossless\\)"):
        load_report.main(["--pair", "qwen-coder", "--task", "code"])
    with pytest.raises(SystemExit, match="unknown modes \\['judge K=3'\\]"):
        load_report.main(["--pair", "qwen-coder", "--task", "code", "--modes", "judge K=3"])
