"""Judge head files: `head.safetensors` (float64 tensors) + `head.json` (metadata, the tensors' sha256). No pickle.

Loading checks the file hash and that the head was fitted for the model pair it is about to judge.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from judge.head import JudgeHead

SHIPPED_HEADS = Path(__file__).resolve().parent / "heads"  # <pair>/<profile>/head.{json,safetensors}
TENSORS = "head.safetensors"
METADATA = "head.json"
FORMAT = "autojudge-head/1"


class HeadMismatchError(ValueError):
    """The head was fitted for another model pair (or its files are damaged)."""


def save_head(head: JudgeHead, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        "mean": head.mean.double().contiguous(),
        "scale": head.scale.double().contiguous(),
        "weights": head.weights.double().contiguous(),
        "bias": torch.tensor([head.bias], dtype=torch.float64),
        "thresholds": head.thresholds.double().contiguous(),
    }
    blob = safetensors.torch.save(tensors)
    (directory / TENSORS).write_bytes(blob)
    meta = {
        "format": FORMAT,
        "layout": head.layout,
        "dim": head.dim,
        "default_threshold": head.default_threshold,
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        **head.meta,
    }
    (directory / METADATA).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def load_head(directory: Path, expected_pair: dict[str, Any] | None = None) -> JudgeHead:
    """Read a head; with `expected_pair`, refuse one fitted for another pair, naming what differs."""
    directory = Path(directory)
    if not (directory / METADATA).is_file() or not (directory / TENSORS).is_file():
        raise FileNotFoundError(f"{directory} is not a judge head (expected {METADATA} and {TENSORS})")
    meta = json.loads((directory / METADATA).read_text())
    if meta.get("format") != FORMAT:
        raise HeadMismatchError(f"{directory}: unknown head format {meta.get('format')!r}, expected {FORMAT}")
    blob = (directory / TENSORS).read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta["tensors_sha256"]:
        raise HeadMismatchError(f"{directory}/{TENSORS} does not match the sha256 in {METADATA}: damaged file")
    if expected_pair is not None and meta.get("pair") != expected_pair:
        raise HeadMismatchError(
            f"judge head {directory} was fitted for another model pair: "
            + pair_difference(meta.get("pair") or {}, expected_pair)
        )
    t = safetensors.torch.load(blob)
    rest = {k: v for k, v in meta.items() if k not in ("format", "layout", "dim", "default_threshold")}
    return JudgeHead(
        layout=meta["layout"],
        mean=t["mean"],
        scale=t["scale"],
        weights=t["weights"],
        bias=float(t["bias"][0]),
        thresholds=t["thresholds"],
        default_threshold=float(meta["default_threshold"]),
        meta=rest,
    )


def load_heads(directory: Path, expected_pair: dict[str, Any]) -> dict[str, JudgeHead]:
    """Every head under `directory`, keyed by its subdirectory name (the task profile it serves)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"judge head directory {directory} does not exist")
    return {d.name: load_head(d, expected_pair) for d in sorted(directory.iterdir()) if (d / METADATA).is_file()}


def pair_difference(
    have: dict[str, Any], want: dict[str, Any], prefix: str = "", names: tuple[str, str] = ("head has", "models have")
) -> str:
    """`draft.quantization: head has 'none', models have 'int8-w8a8(...)'; ...` for nested dicts."""
    parts = []
    for key in sorted(set(have) | set(want)):
        a, b = have.get(key), want.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = pair_difference(a, b, f"{prefix}{key}.", names)
            if sub:
                parts.append(sub)
        elif a != b:
            parts.append(f"{prefix}{key}: {names[0]} {a!r}, {names[1]} {b!r}")
    return "; ".join(parts)
