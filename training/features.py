"""Judge features for mined mismatches: DD and DT states at each mismatch position with the draft token as input.

For a record, the final sequence F holds the draft token at every unimportant position and the current token at
every important one (method §2.5), and F[:p] is exactly the context each label was decided in. So one cached
forward over F gives the states of all unimportant positions; each important position then feeds its draft
token alone at p, in decreasing p, so that no later read sees an overwritten cache row. These are the engine's own
cached forwards, as in serving (tests/test_features.py checks equality with the judge hook's tensors).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from tqdm import tqdm

from engine.model.decoder import Decoder
from engine.runner import ModelRunner


@dataclass(frozen=True)
class FeatureSet:
    dd: torch.Tensor  # [N, Dd] fp32 draft state after reading d at p
    dt: torch.Tensor  # [N, Dt] fp32 target state after reading d at p
    labels: torch.Tensor  # [N] int64, 1 = important
    prompt_index: torch.Tensor  # [N] int64 into `prompt_ids`
    positions: torch.Tensor  # [N] int64
    prompt_ids: list[str]
    meta: dict[str, Any]


def read_labels(paths: list[Path]) -> list[dict[str, Any]]:
    """Records of one or more label files; prompts whose target answer did not parse are skipped."""
    records = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            records += [json.loads(line) for line in f if line.endswith("\n")]
    metas = {json.dumps(r["meta"]["pair"], sort_keys=True) for r in records}
    if len(metas) > 1:
        raise ValueError("label files were mined with different model pairs; features must come from one pair")
    return [r for r in records if r["target_outcome"] is not None]


class _States:
    """One model's states for a group of records, on a slot cache with a row per record."""

    def __init__(self, model: Decoder, slots: int, max_len: int) -> None:
        device = model.model.norm.weight.device
        self.runner = ModelRunner(model, model.new_cache(slots, max_len + 1), device)

    def collect(self, records: list[dict[str, Any]]) -> list[dict[int, torch.Tensor]]:
        """Per record: {position: state after reading the draft token there}."""
        finals = [r["final_token_ids"] for r in records]
        hidden = self.runner.forward(finals, [0] * len(finals), list(range(len(finals))))  # [G, L, D]
        out: list[dict[int, torch.Tensor]] = [{} for _ in records]
        pending: list[list[tuple[int, int]]] = []
        for g, r in enumerate(records):
            for p, important, _, d in r["mismatches"]:
                if not important:
                    assert finals[g][p] == d, "mining invariant: an unimportant position holds the draft token"
                    out[g][p] = hidden[g, p].clone()
            pending.append(sorted(((p, d) for p, imp, _, d in r["mismatches"] if imp), reverse=True))
        while any(pending):
            rows = [g for g in range(len(records)) if pending[g]]
            feeds = [pending[g][0] for g in rows]
            h = self.runner.forward([[d] for _, d in feeds], [p for p, _ in feeds], rows)  # [A, 1, D]
            for a, g in enumerate(rows):
                out[g][feeds[a][0]] = h[a, 0].clone()
                pending[g].pop(0)
        return out


@torch.inference_mode()
def collect_features(records: list[dict[str, Any]], target: Decoder, draft: Decoder, group: int = 8) -> FeatureSet:
    """Both models' states for every mismatch of `records`, `group` records per forward."""
    max_len = max(len(r["final_token_ids"]) for r in records)
    t_states, d_states = _States(target, group, max_len), _States(draft, group, max_len)
    dd, dt, labels, prompt_index, positions = [], [], [], [], []
    for start in tqdm(range(0, len(records), group), unit="group", dynamic_ncols=True):
        chunk = records[start : start + group]
        for g, (tmap, dmap) in enumerate(zip(t_states.collect(chunk), d_states.collect(chunk), strict=True)):
            for p, important, _, _ in chunk[g]["mismatches"]:
                dt.append(tmap[p])
                dd.append(dmap[p])
                labels.append(important)
                prompt_index.append(start + g)
                positions.append(p)
    if not labels:
        raise ValueError("the label files hold no mismatches")
    ids = [r["prompt_id"] for r in records]
    return FeatureSet(
        dd=torch.stack(dd).float(),
        dt=torch.stack(dt).float(),
        labels=torch.tensor(labels),
        prompt_index=torch.tensor(prompt_index),
        positions=torch.tensor(positions),
        prompt_ids=ids,
        meta={"pair": records[0]["meta"]["pair"], "mining": _mining_meta(records), "num_prompts": len(ids)},
    )


def _mining_meta(records: list[dict[str, Any]]) -> dict[str, Any]:
    sources = sorted({r["meta"]["source"] for r in records})
    budgets = sorted({r["meta"]["max_new_tokens"] for r in records})
    return {"sources": sources, "max_new_tokens": budgets, "oracle": records[0]["meta"]["oracle"]}


def without_prompts(fs: FeatureSet, drop: Callable[[str], bool]) -> FeatureSet:
    """The mismatches of the prompts `drop` rejects, re-indexed; `meta` notes how many prompts were dropped."""
    kept = [i for i, pid in enumerate(fs.prompt_ids) if not drop(pid)]
    remap = torch.full((len(fs.prompt_ids),), -1, dtype=torch.int64)  # [P] old prompt index -> new, -1 dropped
    remap[kept] = torch.arange(len(kept))
    new_index = remap[fs.prompt_index]  # [N]
    rows = new_index >= 0  # [N]
    meta = {**fs.meta, "prompts_dropped": len(fs.prompt_ids) - len(kept)}
    ids = [fs.prompt_ids[i] for i in kept]
    return FeatureSet(fs.dd[rows], fs.dt[rows], fs.labels[rows], new_index[rows], fs.positions[rows], ids, meta)


def save_features(fs: FeatureSet, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "dd": fs.dd,
        "dt": fs.dt,
        "labels": fs.labels,
        "prompt_index": fs.prompt_index,
        "positions": fs.positions,
    }
    blob = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()})
    path.write_bytes(blob)
    side = {"prompt_ids": fs.prompt_ids, "meta": fs.meta, "sha256": hashlib.sha256(blob).hexdigest()}
    path.with_suffix(".json").write_text(json.dumps(side) + "\n")


def load_features(path: Path) -> FeatureSet:
    blob = path.read_bytes()
    side = json.loads(path.with_suffix(".json").read_text())
    if hashlib.sha256(blob).hexdigest() != side["sha256"]:
        raise ValueError(f"{path} does not match the sha256 in {path.with_suffix('.json')}")
    t = safetensors.torch.load(blob)
    tensors = (t["dd"], t["dt"], t["labels"], t["prompt_index"], t["positions"])
    return FeatureSet(*tensors, side["prompt_ids"], side["meta"])
