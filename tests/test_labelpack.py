"""Packed label files: prompts out, then back from the problems they name, byte-for-byte the same records."""

from __future__ import annotations

import gzip
import json

import pytest

from training.cli import main as train_main
from training.labelpack import pack_record, read_packed, unpack_all, unpack_record, write_packed
from training.mine import read_done

PROMPTS = {"gsm8k-train-0": [1, 2, 3, 4], "gsm8k-train-1": [1, 2, 9]}


def record(prompt_id: str) -> dict:
    prompt = PROMPTS[prompt_id]
    return {
        "prompt_id": prompt_id,
        "task": "math",
        "prompt_token_ids": prompt,
        "target_token_ids": [*prompt, 7, 8, 9, 2],
        "final_token_ids": [*prompt, 7, 5, 9, 2],
        "mismatches": [[len(prompt) + 1, False, 8, 5], [len(prompt) + 2, True, 9, 6]],
        "target_outcome": "9",
        "num_rollouts": 3,
        "seconds": 1.5,
        "meta": {"source": "gsm8k-train", "max_new_tokens": 512},
    }


def test_pack_drops_the_prompt_and_unpack_restores_the_record():
    r = record("gsm8k-train-0")
    packed = pack_record(r)
    assert "prompt_token_ids" not in packed and "target_token_ids" not in packed
    assert [1, 2, 3, 4] not in packed.values()
    assert packed["target_response_ids"] == [7, 8, 9, 2] and packed["final_response_ids"] == [7, 5, 9, 2]
    assert unpack_record(packed, PROMPTS["gsm8k-train-0"]) == r


def test_unpack_refuses_a_prompt_that_renders_differently():
    packed = pack_record(record("gsm8k-train-0"))
    with pytest.raises(ValueError, match="renders differently"):
        unpack_record(packed, [1, 2, 3, 5])
    with pytest.raises(ValueError, match="renders differently"):
        unpack_record(packed, [1, 2, 3])
    with pytest.raises(ValueError, match="not a packed label record"):
        unpack_record(record("gsm8k-train-0"), PROMPTS["gsm8k-train-0"])


def test_pack_refuses_a_record_whose_sequences_do_not_start_with_the_prompt():
    r = record("gsm8k-train-0")
    r["final_token_ids"] = [9, *r["final_token_ids"][1:]]
    with pytest.raises(ValueError, match="final_token_ids does not start with the prompt"):
        pack_record(r)


def test_file_round_trip_is_deterministic_and_names_missing_problems(tmp_path):
    records = [record("gsm8k-train-0"), record("gsm8k-train-1")]
    a, b = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    assert write_packed(a, records) == 2
    write_packed(b, records)
    assert a.read_bytes() == b.read_bytes()  # fixed gzip mtime: committed files do not churn
    assert unpack_all(read_packed(a), PROMPTS.get) == records
    with pytest.raises(ValueError, match="gsm8k-train-1: no such problem"):
        unpack_all(read_packed(a), {"gsm8k-train-0": PROMPTS["gsm8k-train-0"]}.get)


def test_pack_labels_command_reads_a_label_file(tmp_path, capsys):
    labels = tmp_path / "math.jsonl"
    labels.write_text("".join(json.dumps(record(p)) + "\n" for p in PROMPTS) + '{"torn')
    out = tmp_path / "math.jsonl.gz"
    assert train_main(["pack-labels", str(labels), "--out", str(out)]) == 0
    assert "packed 2 records" in capsys.readouterr().err
    lines = gzip.decompress(out.read_bytes()).decode().splitlines()
    assert [json.loads(x)["prompt_id"] for x in lines] == list(PROMPTS)
    assert read_done(labels)[0] == [record(p) for p in PROMPTS]
    assert train_main(["pack-labels", str(tmp_path / "none.jsonl"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_read_packed_refuses_files_that_are_not_packed_labels(tmp_path):
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_text(json.dumps(record("gsm8k-train-0")) + "\n")
    with pytest.raises(ValueError, match="is not a packed label file"):
        read_packed(plain)  # not gzip
    unpacked = tmp_path / "unpacked.jsonl.gz"
    unpacked.write_bytes(gzip.compress((json.dumps(record("gsm8k-train-0")) + "\n").encode()))
    with pytest.raises(ValueError, match="a record without format"):
        read_packed(unpacked)
