"""An evaluation sweep resumes from its checkpoint: same traces as one uninterrupted run, only missing jobs decoded."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from conftest import overflowing
from training.cli import main
from training.replay import Job, LockstepDecoder, Method, Trace
from training.tracelog import decode_with_log, write_baselines

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
    events: list[tuple[str, int]] = []  # the count read back is told before any run is decoded
    traces, resumed = decode_with_log(
        dec, all_jobs, log, META, lambda n: events.append(("done", n)), lambda n: events.append(("resumed", n))
    )
    assert resumed == 5 and events[0] == ("resumed", 5)
    assert sum(n for kind, n in events[1:] if kind == "done") == len(all_jobs) - 5
    assert as_tuples(traces) == as_tuples(decoder(target, draft).run(all_jobs))
    lines = log.read_text().splitlines()
    assert len(lines) == 1 + len(all_jobs) and all(json.loads(x) for x in lines)
    again, resumed = decode_with_log(decoder(target, draft), all_jobs, log, META)
    assert resumed == len(all_jobs) and as_tuples(again) == as_tuples(traces)


def test_a_drained_sweep_finishes_its_prompts_in_flight_and_the_next_run_the_rest(
    target, draft, tmp_path: Path
) -> None:
    log = tmp_path / "traces.jsonl"
    dec = LockstepDecoder(target, draft, None, eos_token_ids=(), slots=1, max_len=64)  # one prompt at a time
    traces, _ = decode_with_log(dec, jobs(), log, META, lambda n: dec.drain())  # a signal as the first run ends
    first = {j.job_id for j in jobs() if j.job_id.endswith("|0")}
    assert {t.job.job_id for t in traces} == first  # every method of the prompt in flight, forks included
    assert len(log.read_text().splitlines()) == 1 + len(first)
    again, resumed = decode_with_log(decoder(target, draft), jobs(), log, META)
    assert resumed == len(first) and as_tuples(again) == as_tuples(decoder(target, draft).run(jobs()))


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


def test_a_stored_checkpoint_beside_no_log_is_not_silently_decoded_again(target, draft, tmp_path: Path) -> None:
    log = tmp_path / "traces.jsonl"
    decode_with_log(decoder(target, draft), jobs()[:3], log, META)
    (tmp_path / "traces.jsonl.gz").write_bytes(gzip.compress(log.read_bytes()))
    log.unlink()
    with pytest.raises(ValueError, match="gunzip -k"):
        decode_with_log(decoder(target, draft), jobs(), log, META)
    assert not log.exists()


def test_the_baselines_of_fold_checkpoints_are_adopted_by_another_heads_run(target, draft, tmp_path: Path) -> None:
    folds = [tmp_path / "f0" / "traces.jsonl", tmp_path / "f1.jsonl.gz"]
    decode_with_log(decoder(target, draft), jobs()[:6], folds[0], {**META, "head_sha256": "aa"})
    decode_with_log(decoder(target, draft), jobs()[6:], tmp_path / "f1.jsonl", {**META, "head_sha256": "bb"})
    with open(tmp_path / "f1.jsonl", "a") as f:  # a head's own job is not a baseline
        f.write(json.dumps({"job_id": "autojudge=0.5|0", "tokens": [1], "ok": "1", "mismatch": "0"}) + "\n")
    folds[1].write_bytes(gzip.compress((tmp_path / "f1.jsonl").read_bytes()))
    out = tmp_path / "other-head" / "traces.jsonl"
    assert write_baselines(folds, out) == len(jobs())
    assert json.loads(out.read_text().splitlines()[0]) == {"meta": {**META, "head_sha256": None}}
    traces, resumed = decode_with_log(decoder(target, draft), jobs(), out, {**META, "head_sha256": "cc"})
    assert resumed == len(jobs()) and as_tuples(traces) == as_tuples(decoder(target, draft).run(jobs()))
    with pytest.raises(ValueError, match="only written as a new file"):
        write_baselines(folds, out)


def test_baselines_refuse_checkpoints_of_other_setups(target, draft, tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    decode_with_log(decoder(target, draft), jobs()[:2], a, {**META, "head_sha256": "aa"})
    decode_with_log(decoder(target, draft), jobs()[2:4], b, {**META, "max_new_tokens": 64, "head_sha256": "bb"})
    with pytest.raises(ValueError, match="differ in more than their head"):
        write_baselines([a, b], tmp_path / "out.jsonl")
    with pytest.raises(FileNotFoundError, match="no such evaluation checkpoint"):
        write_baselines([tmp_path / "missing.jsonl"], tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_the_baselines_command_reads_stored_folds_and_names_a_broken_file(
    target, draft, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = tmp_path / "run" / "traces.jsonl"
    decode_with_log(decoder(target, draft), jobs()[:3], plain, {**META, "head_sha256": "aa"})
    stored = tmp_path / "store" / "fold0"
    stored.mkdir(parents=True)
    (stored / "traces.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))  # as crossfit-save keeps it
    assert main(["baselines", str(stored), "--out", str(tmp_path / "b")]) == 0
    assert len((tmp_path / "b" / "traces.jsonl").read_text().splitlines()) == 1 + 3
    (stored / "traces.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes())[:-12])  # cut short
    assert main(["baselines", str(stored), "--out", str(tmp_path / "c")]) == 2
    assert "not a complete gzip file" in capsys.readouterr().err
    assert not (tmp_path / "c" / "traces.jsonl").exists()
    packed = gzip.compress(plain.read_bytes())
    for at in range(10, len(packed) - 8, max(1, (len(packed) - 18) // 8)):  # damaged deflate data, not cut
        (stored / "traces.jsonl.gz").write_bytes(packed[:at] + bytes([packed[at] ^ 0xFF]) + packed[at + 1 :])
        assert main(["baselines", str(stored), "--out", str(tmp_path / "d")]) == 2  # named, never a traceback
        assert "traces.jsonl.gz" in capsys.readouterr().err


def test_a_failed_run_is_logged_as_failed_and_read_back_so(target, draft, tmp_path: Path) -> None:
    log = tmp_path / "traces.jsonl"
    broken = overflowing(target, 5)  # the token's embedding is NaN: a prompt holding it overflows the target
    failing = [Job(f"{m.label}|bad", (8, 5, 9), m, 20) for m in METHODS[:2]]
    traces, _ = decode_with_log(decoder(broken, draft), [*failing, *jobs()], log, META)
    assert [t.failed for t in traces[:2]] == [True, True] and not any(t.failed for t in traces[2:])
    again, resumed = decode_with_log(decoder(broken, draft), [*failing, *jobs()], log, META)
    assert resumed == len(traces) and [t.failed for t in again] == [t.failed for t in traces]
