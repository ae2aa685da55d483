"""`--step-log`: one JSON line per engine step, written from the engine's step hook, that reads back as the steps
ran (windows, emitted tokens, the cost model's prediction); a log closed by shutdown ignores a late step."""

from __future__ import annotations

import json
import os
from pathlib import Path

from test_autowindow_engine import DRAFTS_PAY, auto_engine
from test_spec_greedy import prompts, requests

from conftest import run_all
from engine.types import StepStats
from server.settings import load_settings
from server.steplog import StepLog


def test_step_log_records_every_step(target, draft, tmp_path):
    path = tmp_path / "steps.jsonl"
    log = StepLog(path)
    seen: list[StepStats] = []

    def on_step(stats: StepStats) -> None:
        seen.append(stats)
        log.write(stats)

    tokens, _ = run_all(auto_engine(target, draft, DRAFTS_PAY, on_step=on_step), requests(prompts(3, seed=5)))
    log.close()
    log.write(seen[-1])  # after shutdown closed it: dropped, not an error
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == len(seen) > 1
    assert [rec["windows"] for rec in lines] == [list(s.windows) for s in seen]
    assert any(max(rec["windows"], default=0) > 0 for rec in lines)  # the planner drafted in some steps
    assert sum(rec["generated_tokens"] for rec in lines) == sum(len(t) for t in tokens.values())
    assert all(rec["predicted_s"] is not None and rec["step_s"] > 0 for rec in lines)
    assert [rec["t"] for rec in lines] == sorted(rec["t"] for rec in lines)


def test_a_failing_write_turns_the_log_off_not_the_engine(target, draft, caplog):
    log = StepLog(Path("/dev/full"))  # every write fails: no space left on the device
    seen: list[StepStats] = []
    engine = auto_engine(target, draft, DRAFTS_PAY, on_step=lambda s: (seen.append(s), log.write(s)))
    tokens, _ = run_all(engine, requests(prompts(2, seed=5)))
    assert len(seen) > 1 and all(len(t) == 24 for t in tokens.values())
    assert sum("step log off" in r.message for r in caplog.records) == 1  # said once, then off
    log.close()


def test_a_full_log_moves_to_dot_one_and_starts_anew(target, draft, tmp_path):
    path = tmp_path / "steps.jsonl"
    path.write_text("x" * 50 + "\n")  # a log from an earlier run is appended to, and counts toward the cap
    log = StepLog(path, max_bytes=2000)
    seen: list[StepStats] = []
    engine = auto_engine(target, draft, DRAFTS_PAY, on_step=lambda s: (seen.append(s), log.write(s)))
    run_all(engine, requests(prompts(3, seed=5)))
    log.close()
    rotated = path.with_name("steps.jsonl.1")
    assert rotated.is_file() and path.stat().st_size <= 2000 and rotated.stat().st_size <= 2000
    lines = rotated.read_text().splitlines() + path.read_text().splitlines()
    steps = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(path.read_text().splitlines()) < len(steps) <= len(seen)  # older ones may be gone, none doubled
    assert [rec["windows"] for rec in steps] == [list(s.windows) for s in seen[-len(steps) :]]


def test_step_log_setting(tmp_path):
    assert load_settings([], {}).step_log is None
    assert load_settings([], {}).step_log_max_mb == 100
    assert load_settings(["--step-log-max-mb", "0.5"], {}).step_log_max_mb == 0.5
    path = str(tmp_path / "s.jsonl")
    assert load_settings(["--step-log", path], {}).step_log == path
    assert load_settings([], {"AUTOJUDGE_STEP_LOG": path}).step_log == path


def test_a_log_on_a_pipe_is_written_and_never_rotated(target, draft, tmp_path):
    fifo = tmp_path / "steps.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader first, so opening for writing does not block
    try:
        log = StepLog(fifo, max_bytes=10)  # a cap below one line: a regular file would rotate at every step
        engine = auto_engine(target, draft, DRAFTS_PAY, on_step=log.write)
        run_all(engine, requests(prompts(1, seed=5)))
        log.close()
        lines = os.read(reader, 1 << 20).decode().splitlines()
    finally:
        os.close(reader)
    assert lines and all(json.loads(line)["step_s"] > 0 for line in lines)
    assert not fifo.with_name("steps.fifo.1").exists()
