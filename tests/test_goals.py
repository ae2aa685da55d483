"""training/goals.py: the goal statements read off an evaluation's rows."""

from __future__ import annotations

import json

import pytest

from training.cli import main
from training.goals import Goal, best_point, statements, verdict


def row(method: str, label: str, speedup: float, accuracy: float, drop: float, agreement: float) -> dict:
    return {"method": method, "label": label, "speedup_w32": speedup, "accuracy": accuracy,
            "accuracy_drop_points": drop, "accuracy_drop_lo": drop - 3, "accuracy_drop_hi": drop + 3,
            "agreement": agreement}  # fmt: skip


LOSSLESS = row("lossless", "lossless", 1.0, 0.70, 0.0, 1.0)
JUDGE = [
    LOSSLESS,
    row("autojudge", "aj=0.1", 1.2, 0.70, 0.0, 0.97),
    row("autojudge", "aj=0.2", 1.4, 0.69, 1.0, 0.96),  # the fastest within 2 points and 95%
    row("autojudge", "aj=0.4", 1.6, 0.60, 10.0, 0.80),
]


def test_the_fastest_threshold_within_the_drop_and_agreement_is_chosen():
    assert best_point(JUDGE, Goal(2.0, 0.95, 1.5, 32))["label"] == "aj=0.2"
    assert best_point(JUDGE, Goal(0.5, 0.95, 1.5, 32))["label"] == "aj=0.1"
    assert best_point(JUDGE, Goal(0.0, 0.99, 1.5, 32)) is None  # lossless is not an AutoJudge threshold


@pytest.mark.parametrize(
    ("speedup", "accuracy", "expected"),
    [
        (1.3, 0.65, "below AutoJudge"),  # aj=0.2 is faster and more accurate
        (1.4, 0.69, "below AutoJudge"),  # a tie counts for AutoJudge
        (1.5, 0.65, "between AutoJudge points"),  # aj=0.2 is more accurate but slower, aj=0.4 faster but worse
    ],
)
def test_a_baseline_is_placed_against_the_autojudge_points(speedup, accuracy, expected):
    assert verdict(row("topk", "t", speedup, accuracy, 5, 0.9), JUDGE, 32) == expected


def test_above_and_beyond():
    assert verdict(row("kl", "k", 1.3, 0.75, -5, 0.9), JUDGE, 32) == "above AutoJudge"  # beats lossless and aj=0.1
    assert verdict(row("draft", "d", 1.7, 0.50, 20, 0.6), JUDGE, 32) == "beyond AutoJudge's speed"
    assert verdict(row("draft", "d", 1.7, 0.65, 5, 0.6), JUDGE, 32) == "above AutoJudge"  # beats aj=0.4


def test_statements_say_met_or_not_with_the_point_and_count_the_baselines():
    rows = [*JUDGE, row("topk", "topk=2", 1.3, 0.65, 5, 0.9), row("kl", "kl=0.3", 1.3, 0.75, -5, 0.9)]
    met = statements(rows, Goal(2.0, 0.95, 1.3, 32))
    assert met[0].startswith("- **Speed goal met**") and "`aj=0.2`: 1.40x" in met[0]
    assert statements(rows, Goal(2.0, 0.95, 1.5, 32))[0].startswith("- **Speed goal not met**")
    assert "no AutoJudge threshold keeps" in statements(rows, Goal(0.0, 0.99, 1.5, 32))[0]
    assert (
        met[-2] == "- By accuracy, of 2 baseline points 1 lie below AutoJudge at equal or better speed and 1 above it."
    )
    assert met[-1].startswith("- By agreement, of 2 baseline points 2 lie below")  # 0.9 agreement against aj=0.2's
    with pytest.raises(ValueError, match="no tokens per cycle at W = 8"):
        statements(rows, Goal(2.0, 0.95, 1.3, 8))
    with pytest.raises(ValueError, match="no lossless row"):
        statements(JUDGE[1:], Goal(2.0, 0.95, 1.3, 32))


def test_goals_command(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"meta": {}, "rows": JUDGE}))
    assert main(["goals", str(path), "--max-drop", "2", "--speedup", "1.3"]) == 0
    assert "Speed goal met" in capsys.readouterr().out
    assert main(["goals", str(path), "--min-agreement", "1.5"]) == 2  # a bad goal is a usage error, not a trace


def test_a_point_the_curve_already_beats_does_not_make_a_baseline_look_above():
    curve = [LOSSLESS, row("autojudge", "a", 1.35, 0.69, 1, 0.96), row("autojudge", "b", 1.6, 0.60, 10, 0.8)]
    weak = row("autojudge", "weak", 1.30, 0.40, 30.0, 0.5)  # "a" is faster and more accurate
    baseline = row("topk", "t", 1.38, 0.65, 5, 0.9)  # beats only the weak point
    assert verdict(baseline, curve, 32) == verdict(baseline, [*curve, weak], 32) == "between AutoJudge points"


def test_goals_command_names_a_file_that_is_not_an_evaluation(tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"meta": {}}))
    assert main(["goals", str(path)]) == 2
    assert "not an evaluation's results.json" in capsys.readouterr().err
    path.write_text(json.dumps({"rows": [{"method": "lossless", "speedup_w32": 1.0}, {"method": "autojudge"}]}))
    assert main(["goals", str(path)]) == 2
    assert "a row lacks what an evaluation writes" in capsys.readouterr().err
