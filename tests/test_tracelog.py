"""An evaluation sweep resumes from its checkpoint: same traces as one uninterrupted run, only missing jobs decoded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.replay import Job, LockstepDecoder, Method, Trace
from training.tracelog import decode_with_log

PROMPTS = [(3, 14, 15, 92, 65), (2, 7, 18), (27, 18, 28, 18, 28, 45, 90, 45)]
METHODS = [Method("lossless"), Method("draft"), Method("topk", 3), Method("random", 0.5)]
META = {"pair": "tiny", "max_new_tokens": 20}


def jobs() -> list[Job]:
    return [Job(f"{m.label}|{i}", p, m, 20, seed=i) for i, p in enumerate(PROMPTS) for m in METHODS]


def decoder(target, draft) -> LockstepDecoder:
    return LockstepDecoder(target, draft, None, eos_token_ids=(), slots=4, max_len=64)


def as_tuples(traces: list[Trace]) -> list[tuple]:
    return [(t.job.job_id, t.tokens, t.ok, t.mismatch) for t in traces]


def test_a_fresh_log_holds_every_job_and_equals_a_plain_run(target, draft, tmp_path: Path) -> None:
    log = tmp_path / "traces.jsonl"
    traces, resumed = decode_with_log(decoder(target, draft), jobs(), log, META)
    assert resumed == 0
    assert as_tuples(traces) == as_tuples(decoder(target, draft).run(jobs()))
    lines = log.read_text().splitlines()
    assert json.loads(lines[0]) == {"meta": META}
    assert sorted(json.loads(x)["job_id"] for x in lines[1:]) == sorted(j.job_id for j in jobs())


def test_resume_decodes_only_the_missing_jobs(target, draft, tmp_path: Path) -> None:
    log = tmp_path / "traces.jsonl"
    all_jobs = jobs()
    decode_with_log(decoder(target, draft), all_jobs[:5], log, META)
    with open(log, "ab") as f:
        f.write(b'{"job_id": "torn')  # a kill mid-write leaves a partial line
    dec = decoder(target, draft)
    decoded: list[int] = []
    traces, resumed = decode_with_log(dec, all_jobs, log, META, decoded.append)
    assert resumed == 5 and sum(decoded) == len(all_jobs) - 5
    assert as_tuples(traces) == as_tuples(decoder(target, draft).run(all_jobs))
    lines = log.read_text().splitlines()
    assert len(lines) == 1 + len(all_jobs) and all(json.loads(x) for x in lines)
    again, resumed = decode_with_log(decoder(target, draft), all_jobs, log, META)
    assert resumed == len(all_jobs) and as_tuples(again) == as_tuples(traces)


def test_a_log_of_another_setup_is_refused(target, draft, tmp_path: Path) -> None:
    log = tmp_path / "traces.jsonl"
    decode_with_log(decoder(target, draft), jobs()[:2], log, META)
    before = log.read_bytes()
    with pytest.raises(ValueError, match="another setup"):
        decode_with_log(decoder(target, draft), jobs(), log, {**META, "max_new_tokens": 64})
    assert log.read_bytes() == before  # nothing lost


def test_a_file_that_is_not_a_log_is_a_clear_error(target, draft, tmp_path: Path) -> None:
    log = tmp_path / "traces.jsonl"
    log.write_text("not json\n")
    with pytest.raises(ValueError, match="not an evaluation checkpoint"):
        decode_with_log(decoder(target, draft), jobs(), log, META)
    log.write_text(json.dumps({"meta": META}) + '\n{"tokens": [1]}\n')
    with pytest.raises(ValueError, match=":2 is not an evaluation checkpoint line"):
        decode_with_log(decoder(target, draft), jobs(), log, META)


def test_a_baselines_only_log_is_adopted_by_the_first_run_with_a_head(target, draft, tmp_path: Path) -> None:
    log = tmp_path / "traces.jsonl"
    baselines = {**META, "head_sha256": None}
    decode_with_log(decoder(target, draft), jobs()[:6], log, baselines)
    headed = {**META, "head_sha256": "aa"}
    traces, resumed = decode_with_log(decoder(target, draft), jobs(), log, headed)
    assert resumed == 6 and as_tuples(traces) == as_tuples(decoder(target, draft).run(jobs()))
    lines = log.read_text().splitlines()
    assert json.loads(lines[0]) == {"meta": headed} and len(lines) == 1 + len(jobs())
    before = log.read_bytes()
    for other in ({**META, "head_sha256": "bb"}, baselines):  # now it is that head's checkpoint
        with pytest.raises(ValueError, match="another setup"):
            decode_with_log(decoder(target, draft), jobs(), log, other)
    assert log.read_bytes() == before


def test_only_a_missing_head_is_adopted(target, draft, tmp_path: Path) -> None:
    log = tmp_path / "traces.jsonl"
    decode_with_log(decoder(target, draft), jobs()[:2], log, {**META, "head_sha256": None})
    with pytest.raises(ValueError, match="another setup"):
        decode_with_log(decoder(target, draft), jobs(), log, {**META, "head_sha256": "aa", "max_new_tokens": 64})
