"""benchmarks/pair_speedup_estimate.py: the speed-up formula, and a whole run on tiny shapes on the CPU (the script
is meant for a GPU, where it must work the first time it runs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from engine.spec.cost import ForwardCost, StepCost

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import pair_speedup_estimate as est

TINY_HF = {
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def test_speedup_is_tokens_per_cycle_times_a_plain_step_over_a_cycle():
    target = ForwardCost((1, 2), (1, 9), ((0.10, 0.20), (0.12, 0.30)))
    draft = ForwardCost((1, 2), (1,), ((0.01,), (0.02,)))
    cost = StepCost(target, draft, 256)
    assert est.speedup(cost, 1, 8, 5.0) == pytest.approx(5.0 * 0.10 / (8 * 0.01 + 0.20))
    assert est.speedup(cost, 2, 8, 5.0) == pytest.approx(5.0 * 0.12 / (8 * 0.02 + 0.30))


def test_a_run_on_tiny_shapes_estimates_every_method_against_lossless(tmp_path, capsys):
    shapes = tmp_path / "shapes"
    shapes.mkdir()
    for name in ("target", "draft"):
        (shapes / f"{name}.json").write_text(json.dumps(TINY_HF))
    rows = [
        {"method": "lossless", "label": "lossless", "agreement": 1.0, "accuracy_drop_points": 0.0,
         "tokens_per_cycle_w8": 4.0, "tokens_per_cycle_w16": 5.0},
        {"method": "autojudge", "label": "autojudge=0.1", "agreement": 0.97, "accuracy_drop_points": 1.5,
         "tokens_per_cycle_w8": 6.0, "tokens_per_cycle_w16": 8.0},
    ]  # fmt: skip
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"meta": {}, "rows": rows}))
    out = tmp_path / "estimate.json"
    argv = ["--shapes", str(shapes), "--results", str(results), "--rows", "1,2", "--windows", "8,16"]
    assert est.main([*argv, "--device", "cpu", "--dtype", "float32", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    lines = {(x["label"], x["rows"], x["window"]): x for x in doc["estimates"]}
    assert len(lines) == 2 * 2 * 2
    for b in (1, 2):
        for w in (8, 16):
            assert lines[("lossless", b, w)]["x_lossless"] == pytest.approx(1.0)
            judge = lines[("autojudge=0.1", b, w)]
            assert judge["x_lossless"] == pytest.approx(judge["tokens_per_cycle"] / (4.0 if w == 8 else 5.0))
    assert "| autojudge=0.1 | 1.5 | 0.970 |" in capsys.readouterr().out


def test_windows_an_evaluation_does_not_replay_are_refused(tmp_path):
    results = tmp_path / "results.json"
    results.write_text("{}")
    with pytest.raises(SystemExit):
        est.parse_args(["--results", str(results), "--windows", "4"])


def test_missing_shapes_and_a_file_that_is_not_an_evaluation_are_refused(tmp_path):
    results = tmp_path / "results.json"
    results.write_text("{}")
    with pytest.raises(SystemExit):
        est.parse_args(["--results", str(results), "--shapes", str(tmp_path)])  # no target.json, draft.json
    with pytest.raises(SystemExit, match=r"not an evaluation's results\.json"):
        est.main(["--results", str(results)])
