"""Packed label files: a label file without the prompts, so it can be committed and shared without the data set
it was mined on. A packed record keeps the model's own tokens (response parts of `target_token_ids` and
`final_token_ids`) and replaces `prompt_token_ids` by its length and sha256; `unpack_record` puts the prompt back
from the problem it names, rendered again, and refuses a prompt that renders differently."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

PACKED_FORMAT = "autojudge-labels-packed/1"


def ids_sha256(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids, separators=(",", ":")).encode()).hexdigest()


def pack_record(record: dict[str, Any]) -> dict[str, Any]:
    prompt = record["prompt_token_ids"]
    n = len(prompt)
    for key in ("target_token_ids", "final_token_ids"):
        if record[key][:n] != prompt:
            raise ValueError(f"{record['prompt_id']}: {key} does not start with the prompt")
    out = {k: v for k, v in record.items() if k not in ("prompt_token_ids", "target_token_ids", "final_token_ids")}
    out["format"] = PACKED_FORMAT
    out["prompt"] = {"length": n, "sha256": ids_sha256(prompt)}
    out["target_response_ids"] = record["target_token_ids"][n:]
    out["final_response_ids"] = record["final_token_ids"][n:]
    return out


def unpack_record(packed: dict[str, Any], prompt: list[int]) -> dict[str, Any]:
    """The label record again, with `prompt` (the rendered prompt of `packed['prompt_id']`) checked against the
    packed length and hash: another data file, chat template or tokenizer is an error, not silent garbage."""
    if packed.get("format") != PACKED_FORMAT:
        raise ValueError(f"{packed.get('prompt_id')}: not a packed label record (format {packed.get('format')!r})")
    want = packed["prompt"]
    if len(prompt) != want["length"] or ids_sha256(prompt) != want["sha256"]:
        raise ValueError(
            f"{packed['prompt_id']}: the prompt renders differently from the one mined ({len(prompt)} tokens, "
            f"packed {want['length']}); use the same data file, chat template and tokenizer"
        )
    keep = {"format", "prompt", "target_response_ids", "final_response_ids"}
    out = {k: v for k, v in packed.items() if k not in keep}
    out["prompt_token_ids"] = prompt
    out["target_token_ids"] = prompt + packed["target_response_ids"]
    out["final_token_ids"] = prompt + packed["final_response_ids"]
    return out


def write_packed(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Gzipped JSON lines, with no name or mtime in the header, so the same labels give the same bytes."""
    n = 0
    with open(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as f:
        for r in records:
            f.write((json.dumps(pack_record(r), separators=(",", ":")) + "\n").encode())
            n += 1
    return n


def read_packed(path: Path) -> list[dict[str, Any]]:
    """The packed records of `path`; a file that is not gzip, JSON lines or packed records is a ValueError."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (gzip.BadGzipFile, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a packed label file ({e})") from e
    for r in records:
        if not isinstance(r, dict) or r.get("format") != PACKED_FORMAT or "source" not in r.get("meta", {}):
            raise ValueError(f"{path} is not a packed label file (a record without format {PACKED_FORMAT!r})")
    return records


def unpack_all(packed: list[dict[str, Any]], prompt_of: Callable[[str], list[int] | None]) -> list[dict[str, Any]]:
    """`prompt_of(prompt_id)` renders a problem's prompt (None: the data holds no such problem)."""
    out = []
    for p in packed:
        prompt = prompt_of(p["prompt_id"])
        if prompt is None:
            raise ValueError(f"{p['prompt_id']}: no such problem in the data; unpack with the source it was mined on")
        out.append(unpack_record(p, prompt))
    return out
