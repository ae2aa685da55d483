"""The batched miner against a plain, one-prompt-at-a-time transcription of method §2.2 on tiny models."""

from __future__ import annotations

import gzip
import json
import os
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import overflowing, tiny_decoder
from engine.model.decoder import Decoder
from engine.model.protocol import ForwardBatch
from training import cli
from training.data import Problem
from training.interrupt import Stopped, drain_on_signal
from training.mine import MineConfig, Miner, label_summary, mine_to_file, read_done

EOS = 5
BUDGET = 20


def outcome(problem: Problem, generated: list[int]) -> str | None:
    """A toy task: the 'answer' is the sum of the last three tokens mod 3 (None if too short)."""
    body = [t for t in generated if t != EOS]
    return None if len(body) < 3 else str(sum(body[-3:]) % 3)


@torch.no_grad()
def full_logits(model: Decoder, ids: list[int]) -> torch.Tensor:  # [L, V], no cache
    batch = ForwardBatch.build([ids], [0], [0], torch.device("cpu"))
    return model.compute_logits(model(batch, None))[0]


def greedy(model: Decoder, prefix: list[int], n: int) -> list[int]:
    seq = list(prefix)
    for _ in range(n):
        seq.append(int(full_logits(model, seq)[-1].argmax()))
        if seq[-1] == EOS:
            break
    return seq


def reference_search(target: Decoder, draft: Decoder, prompt: list[int]) -> dict:
    """Method §2.2 step by step: full recomputation, no batching, no caches."""
    P = len(prompt)
    R = greedy(target, prompt, BUDGET)
    y = outcome(None, R[P:])  # type: ignore[arg-type]
    if y is None:
        return {"mismatches": [], "final_token_ids": R, "target_outcome": None}
    left, records = P, []
    while True:
        pred = full_logits(draft, R).argmax(-1).tolist()  # pred[j] is the prediction for j + 1
        ps = [p for p in range(left, len(R)) if pred[p - 1] != R[p]]
        if not ps:
            break
        p, d = ps[0], pred[ps[0] - 1]
        A = [*R[:p], d] if d == EOS else greedy(target, [*R[:p], d], max(1, BUDGET - (p + 1 - P)))
        important = outcome(None, A[P:]) != y  # type: ignore[arg-type]
        records.append([p, int(important), R[p], d])
        if not important:
            R = A
        left = p + 1
        if d == EOS:
            break
    return {"mismatches": records, "final_token_ids": R, "target_outcome": y}


def _problems(n: int) -> list[tuple[Problem, list[int]]]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 12, (1,), generator=gen))
        prompt = torch.randint(6, 97, (length,), generator=gen).tolist()
        out.append((Problem(f"p{i}", "math", "", ""), prompt))
    return out


def _miner(target: Decoder, draft: Decoder, concurrency: int) -> Miner:
    config = MineConfig(max_new_tokens=BUDGET, concurrency=concurrency, draft_batch_tokens=64)
    return Miner(target, draft, outcome, (EOS,), config, max_prompt_len=16)


def test_batched_miner_equals_the_plain_search() -> None:
    target, draft = tiny_decoder(0), tiny_decoder(7, layers=1)
    problems = _problems(10)
    got: dict[str, dict] = {}
    _miner(target, draft, concurrency=4).run(problems, lambda r: got.__setitem__(r["prompt_id"], r))
    assert set(got) == {p.prompt_id for p, _ in problems}
    total = important = 0
    for problem, prompt in problems:
        want = reference_search(target, draft, prompt)
        rec = got[problem.prompt_id]
        assert rec["mismatches"] == want["mismatches"], problem.prompt_id
        assert rec["final_token_ids"] == want["final_token_ids"]
        assert rec["target_outcome"] == want["target_outcome"]
        # The invariant of method §2.5: the final sequence holds d where unimportant, the current token where not.
        for p, imp, cur, d in rec["mismatches"]:
            assert rec["final_token_ids"][p] == (cur if imp else d)
        positions = [m[0] for m in rec["mismatches"]]
        assert positions == sorted(set(positions))
        total += len(positions)
        important += sum(m[1] for m in rec["mismatches"])
    assert total > 10 and 0 < important < total  # the toy task exercises both labels


def test_mining_resumes_and_refuses_a_different_setup(tmp_path: Path) -> None:
    target, draft = tiny_decoder(0), tiny_decoder(7, layers=1)
    problems = _problems(6)
    path = tmp_path / "labels.jsonl"
    meta = {"budget": BUDGET}
    mine_to_file(_miner(target, draft, 2), problems[:3], path, meta)
    with open(path, "ab") as f:
        f.write(b'{"prompt_id": "p3", "torn')  # killed mid-write
    totals = mine_to_file(_miner(target, draft, 2), problems, path, meta)
    assert totals["prompts"] == 3
    records, _ = read_done(path)
    assert {r["prompt_id"] for r in records[:3]} == {"p0", "p1", "p2"}
    assert sorted(r["prompt_id"] for r in records) == [f"p{i}" for i in range(6)]
    assert all(json.loads(line) for line in path.read_text().splitlines())
    summary = label_summary(records)
    assert summary["prompts"] == 6
    assert summary["labels"] == sum(len(r["mismatches"]) for r in records)
    assert summary["important"] == sum(m[1] for r in records for m in r["mismatches"])
    try:
        mine_to_file(_miner(target, draft, 2), problems, path, {"budget": BUDGET + 1})
    except ValueError as e:
        assert "another setup" in str(e)
    else:
        raise AssertionError("mixed setups were accepted")
    gz = tmp_path / "labels.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(ValueError, match=r"not a \.gz"):  # appending at an uncompressed offset would wreck it
        mine_to_file(_miner(target, draft, 2), problems, gz, meta)
    assert gzip.decompress(gz.read_bytes()) == path.read_bytes()


def test_a_file_that_is_not_a_label_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_text("question,answer\n")
    with pytest.raises(ValueError, match=r"labels.jsonl:1 is not a label record \("):
        read_done(path)
    path.write_text('{"prompt_id": "p0"}\n')
    with pytest.raises(ValueError, match=r"labels.jsonl:1 is not a label record \(it needs .*mismatches"):
        read_done(path)
    assert read_done(tmp_path / "absent.jsonl") == ([], 0)


def test_a_rollout_whose_numerics_fail_gives_no_label_and_mining_goes_on() -> None:
    target, draft = tiny_decoder(0), tiny_decoder(7, layers=1)
    problems = _problems(10)
    clean: dict[str, dict] = {}
    _miner(target, draft, concurrency=4).run(problems, lambda r: clean.__setitem__(r["prompt_id"], r))
    swaps = Counter(m[3] for r in clean.values() for m in r["mismatches"] if m[3] != EOS)
    nan_token = swaps.most_common(1)[0][0]  # a draft token whose swap rollouts now overflow
    problems.append((Problem("poisoned", "math", "", ""), [7, nan_token, 8]))
    got: dict[str, dict] = {}
    _miner(overflowing(target, nan_token), draft, concurrency=4).run(
        problems, lambda r: got.__setitem__(r["prompt_id"], r)
    )
    assert set(got) == {p.prompt_id for p, _ in problems}
    assert got["poisoned"]["mismatches"] == [] and got["poisoned"]["target_outcome"] is None
    assert "not finite" in got["poisoned"]["failed"]  # said apart from an answer that does not parse
    failed = [r for r in got.values() if "failed" in r]
    assert all(r["target_outcome"] is None and r["mismatches"] == [] for r in failed)
    assert label_summary(list(got.values()))["failed"] == len(failed) < len(got)
    labelled = [m for r in got.values() for m in r["mismatches"]]
    assert labelled and all(m[3] != nan_token for m in labelled)
    # The search goes on past the failed swap: labels after the first position where the clean run swapped in it.
    failed_at = {
        pid: min(m[0] for m in r["mismatches"] if m[3] == nan_token)
        for pid, r in clean.items()
        if any(m[3] == nan_token for m in r["mismatches"])
    }
    assert any(m[0] > p for pid, p in failed_at.items() for m in got[pid]["mismatches"])


def test_a_drained_miner_finishes_the_searches_in_flight_and_starts_no_more() -> None:
    target, draft = tiny_decoder(0), tiny_decoder(7, layers=1)
    problems = _problems(10)
    full: dict[str, dict] = {}
    _miner(target, draft, concurrency=4).run(problems, lambda r: full.__setitem__(r["prompt_id"], r))
    miner = _miner(target, draft, concurrency=4)
    got: dict[str, dict] = {}

    def emit(record: dict) -> None:
        got[record["prompt_id"]] = record
        miner.drain()  # after the first search ends: the three others in flight still finish

    miner.run(problems, emit)
    assert len(got) == 4
    for pid, record in got.items():
        assert {k: v for k, v in record.items() if k != "seconds"} == {
            k: v for k, v in full[pid].items() if k != "seconds"
        }


def test_the_first_signal_drains_and_a_second_stops_at_once() -> None:
    miner = _miner(tiny_decoder(0), tiny_decoder(7, layers=1), concurrency=2)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped) as stopped, drain_on_signal(miner, "searches") as caught:
        os.kill(os.getpid(), signal.SIGTERM)
        assert miner.draining and caught == [signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) == before
    assert stopped.value.signum == signal.SIGINT and "searches in flight are lost" in str(stopped.value)
    assert isinstance(stopped.value, KeyboardInterrupt)  # no `except Exception` swallows it


def test_a_second_signal_ends_the_command_with_its_code_and_no_traceback(monkeypatch, capsys) -> None:
    def stopped(argv: list[str]) -> int:
        raise Stopped(signal.SIGTERM, "searches")

    monkeypatch.setitem(cli.COMMANDS, "mine", stopped)
    assert cli.main(["mine"]) == 128 + signal.SIGTERM
    assert "SIGTERM again: stopped at once, the searches in flight are lost" in capsys.readouterr().err
