"""Semi-greedy search for important mismatches (method §2.2), batched across prompts on our engine.

Each prompt runs its own left-to-right search: the draft, teacher-forced on the current sequence R, finds the
left-most mismatch p >= left; the target continues R[:p] + [d] greedily to the end of the budget; the mismatch is
important iff the task outcome changes from the target's own. Unimportant swaps are kept (R := the rollout),
important ones reverted. Many prompts are in flight at once: their target rollouts share the engine's batches,
and their teacher-forced draft passes share forwards on a slot cache of their own, where each pass feeds only the
positions a kept swap changed.

Output: one JSON line per finished prompt, appended and flushed as it finishes (docs/mining.md); a rerun skips
the prompts already in the file, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engine import CacheConfig, Engine, EngineConfig, Request, SamplingParams, SpecParams
from engine.kv_cache import SlotKVCache
from engine.model.decoder import Decoder
from engine.runner import ModelRunner
from training.data import Problem
from training.jsonlines import check_appendable, open_to_append, read_complete

Outcome = Callable[[Problem, list[int]], str | None]  # (problem, generated token ids) -> task outcome
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MineConfig:
    max_new_tokens: int = 512  # response budget from the end of the prompt (the paper: 2048)
    concurrency: int = 32  # prompts searched at once = target rollouts per engine batch
    draft_batch_tokens: int = 4096  # padded tokens per teacher-forced draft forward

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.concurrency < 1 or self.draft_batch_tokens < 1:
            raise ValueError("max_new_tokens, concurrency and draft_batch_tokens must be >= 1")


@dataclass(slots=True)
class _Search:
    """One prompt's search state. `pred[q]` is the draft's argmax for position q (from its state at q - 1)."""

    problem: Problem
    prompt: list[int]
    slot: int  # row of the draft cache
    current: list[int] = field(default_factory=list)  # R
    reference: list[int] = field(default_factory=list)  # prompt + the target's own response T
    left: int = 0
    target_outcome: str | None = None
    failed: str | None = None  # why the reference rollout gave no outcome, when its numerics failed
    mismatches: list[list[int]] = field(default_factory=list)  # [position, important, current id, draft id]
    pred: list[int] = field(default_factory=list)
    draft_len: int = 0  # positions of `current` in the draft cache
    pending: tuple[int, int] | None = None  # (p, d) whose rollout is running
    generated: list[int] = field(default_factory=list)  # tokens of the running rollout so far
    rollouts: int = 0
    started: float = 0.0


class Miner:
    """Runs the search for many prompts; `run` yields nothing and writes records through `emit`."""

    def __init__(
        self,
        target: Decoder,
        draft: Decoder,
        outcome: Outcome,
        eos_token_ids: tuple[int, ...],
        config: MineConfig,
        max_prompt_len: int,
    ) -> None:
        self.config = config
        self.outcome = outcome
        self.eos = frozenset(eos_token_ids)
        max_len = max_prompt_len + config.max_new_tokens + 1
        engine_config = EngineConfig(cache=CacheConfig(max_slots=config.concurrency, max_model_len=max_len))
        self.engine = Engine(engine_config, target, None, eos_token_ids=eos_token_ids)
        device = target.model.norm.weight.device
        cache: SlotKVCache = draft.new_cache(config.concurrency, max_len + 1)
        self.draft = ModelRunner(draft, cache, device)
        self.max_len = max_len
        self.draining = False  # set by `drain`: no further prompt starts

    def drain(self) -> None:
        """Start no further prompt: `run` returns once the searches in flight have finished and been emitted."""
        self.draining = True

    def run(self, problems: list[tuple[Problem, list[int]]], emit: Callable[[dict[str, Any]], None]) -> None:
        """Search every (problem, prompt ids); `emit` receives each finished prompt's record."""
        todo = list(reversed(problems))
        free_slots = list(range(self.config.concurrency))
        active: dict[str, _Search] = {}
        while (todo and not self.draining) or active:
            while todo and free_slots and not self.draining:
                problem, prompt = todo.pop()
                if len(prompt) + 1 > self.max_len - self.config.max_new_tokens:
                    raise ValueError(f"prompt of {problem.prompt_id} is longer than max_prompt_len")
                s = _Search(problem, prompt, free_slots.pop(), left=len(prompt), started=time.perf_counter())
                active[problem.prompt_id] = s
                self._submit(s, prompt, self.config.max_new_tokens)
            finished = self._step(active)
            self._draft_predictions(finished)
            for s in finished:
                if self._advance(s):
                    emit(self._record(s))
                    del active[s.problem.prompt_id]
                    free_slots.append(s.slot)

    # --- target rollouts on the engine ---------------------------------------------------------------
    def _submit(self, s: _Search, prefix: list[int], budget: int) -> None:
        s.rollouts += 1
        s.generated = []
        request = Request(
            f"{s.problem.prompt_id}#{s.rollouts}",
            tuple(prefix),
            SamplingParams(max_tokens=budget),
            SpecParams(enabled=False),
        )
        self.engine.add_request(request)

    def _step(self, active: dict[str, _Search]) -> list[_Search]:
        """One engine step; the searches whose rollout finished, with their outcome applied."""
        done = []
        for out in self.engine.step():
            s = active[out.request_id.rsplit("#", 1)[0]]
            s.generated.extend(out.new_token_ids)
            if not out.finished:
                continue
            if out.error is not None:  # greedy decoding would fail the same way on every resume
                log.warning("rollout %s gives no label: %s", out.request_id, out.error)
                self._drop_rollout(s, out.error)
                done.append(s)
                continue
            if s.pending is None:
                prefix = s.prompt
            else:
                p, d = s.pending
                prefix = [*s.current[:p], d]
            self._apply_rollout(s, prefix + s.generated)
            done.append(s)
        return done

    # --- the search ----------------------------------------------------------------------------------
    def _drop_rollout(self, s: _Search, error: str) -> None:
        """A rollout whose numerics failed has no outcome: without a reference the search ends unlabelled (as
        for an answer that does not parse, but the record says why); a swap's rollout leaves its mismatch
        unlabelled and the search goes on past it."""
        if s.pending is None:
            s.reference, s.current, s.target_outcome = s.prompt + s.generated, s.prompt + s.generated, None
            s.failed = error
            return
        s.left, s.pending = s.pending[0] + 1, None

    def _apply_rollout(self, s: _Search, full: list[int]) -> None:
        """`full` is the rollout's whole sequence. The first rollout is the reference T, later ones A."""
        result = self.outcome(s.problem, full[len(s.prompt) :])
        if s.pending is None:
            s.reference, s.current, s.target_outcome = full, full, result
            return
        p, d = s.pending
        important = result != s.target_outcome
        s.mismatches.append([p, int(important), s.current[p], d])
        if not important:
            s.current = full
            s.draft_len = min(s.draft_len, p)  # the draft cache is valid before the swap
            del s.pred[p + 1 :]  # predictions past p read the changed tokens
        s.left = p + 1
        s.pending = None

    def _advance(self, s: _Search) -> bool:
        """Start the next rollout of `s`, or return True when its search is over."""
        if s.target_outcome is None and not s.mismatches and s.rollouts == 1:
            return True  # the target's answer does not parse: nothing to compare against
        if s.mismatches and s.mismatches[-1][3] in self.eos:
            return True  # EOS guard: the last swap put an EOS inside the response
        p = next((q for q in range(s.left, len(s.current)) if s.pred[q] != s.current[q]), None)
        if p is None:
            return True
        d = s.pred[p]
        s.pending = (p, d)
        prefix = [*s.current[:p], d]
        if d in self.eos:  # EOS guard: the rollout is the prefix itself, nothing to generate
            self._apply_rollout(s, prefix)
            return self._advance(s)
        self._submit(s, prefix, max(1, self.config.max_new_tokens - (p + 1 - len(s.prompt))))
        return False

    @torch.inference_mode()
    def _draft_predictions(self, searches: list[_Search]) -> None:
        """Bring each search's `pred` up to date: feed the positions its draft cache lacks, take argmaxes."""
        need = [s for s in searches if s.target_outcome is not None and s.draft_len < len(s.current)]
        need.sort(key=lambda s: len(s.current) - s.draft_len)
        while need:
            group = [need.pop()]
            width = len(group[0].current) - group[0].draft_len
            while need and (len(group) + 1) * width <= self.config.draft_batch_tokens:
                group.append(need.pop())
            rows = [s.current[s.draft_len :] for s in group]
            hidden = self.draft.forward(rows, [s.draft_len for s in group], [s.slot for s in group])  # [G, Q, D]
            for g, s in enumerate(group):
                first = max(s.draft_len, len(s.prompt) - 1)  # predictions start at the response
                rows_h = hidden[g, first - s.draft_len : len(rows[g])]  # [n, D] states at first .. len-1
                preds = self.draft.logits(rows_h).argmax(-1).tolist()
                del s.pred[first + 1 :]
                s.pred.extend([-1] * (first + 1 - len(s.pred)))
                s.pred.extend(preds)
                s.draft_len = len(s.current)

    def _record(self, s: _Search) -> dict[str, Any]:
        return {
            "prompt_id": s.problem.prompt_id,
            "task": s.problem.task,
            "prompt_token_ids": s.prompt,
            "target_token_ids": s.reference,
            "final_token_ids": s.current,
            "mismatches": s.mismatches,
            "target_outcome": s.target_outcome,
            "num_rollouts": s.rollouts,
            "seconds": round(time.perf_counter() - s.started, 3),
        } | ({"failed": s.failed} if s.failed else {})


LABEL_FIELDS = frozenset(
    {"prompt_id", "task", "mismatches", "target_outcome", "num_rollouts", "seconds", "meta", "target_token_ids"}
)


def read_done(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records already in a label file, and the byte length of its complete lines (a torn tail is cut)."""
    records, good = read_complete(path, "a label record")
    for n, record in enumerate(records, 1):
        if not isinstance(record, dict) or not record.keys() >= LABEL_FIELDS:
            raise ValueError(f"{path}:{n} is not a label record (it needs {', '.join(sorted(LABEL_FIELDS))})")
    return records, good


def label_summary(records: list[dict[str, Any]]) -> dict[str, float]:
    """Totals of a label file: what a report on mining quotes (rates use the prompts' own wall times)."""
    labels = [m for r in records for m in r["mismatches"]]
    parsed = [r for r in records if r["target_outcome"] is not None]
    lengths = [len(r["target_token_ids"]) - len(r["prompt_token_ids"]) for r in parsed]
    return {
        "prompts": len(records),
        "dropped": len(records) - len(parsed),
        "failed": sum("failed" in r for r in records),  # of the dropped: the target's numerics, not its answer
        "labels": len(labels),
        "important": sum(m[1] for m in labels),
        "important_share": sum(m[1] for m in labels) / len(labels) if labels else 0.0,
        "labels_per_prompt": len(labels) / len(parsed) if parsed else 0.0,
        "rollouts": sum(r["num_rollouts"] for r in records),
        "mean_response_tokens": sum(lengths) / len(lengths) if lengths else 0.0,
        "max_response_tokens": max(lengths, default=0),
        "prompt_seconds": sum(r["seconds"] for r in records),
    }


def mine_to_file(
    miner: Miner,
    problems: list[tuple[Problem, list[int]]],
    path: Path,
    meta: dict[str, Any],
) -> dict[str, float]:
    """Mine the problems not yet in `path`, appending a record (plus `meta`) per prompt; returns the run's totals.

    `meta` (models, mining config) must equal that of the records already there: labels of two setups never mix.
    """
    check_appendable(path, "mining")
    done, good = read_done(path)
    for r in done:
        if r["meta"] != meta:
            raise ValueError(
                f"{path} holds labels mined with another setup ({r['prompt_id']}: {r['meta']}); "
                "write to a new file or rerun with the same models and settings"
            )
    seen = {r["prompt_id"] for r in done}
    todo = [(p, ids) for p, ids in problems if p.prompt_id not in seen]
    totals = {"prompts": 0.0, "labels": 0.0, "important": 0.0, "dropped": 0.0, "failed": 0.0, "rollouts": 0.0}
    started = time.perf_counter()
    with open_to_append(path, good) as f:
        bar = tqdm(total=len(problems), initial=len(problems) - len(todo), unit="prompt", dynamic_ncols=True)

        def emit(record: dict[str, Any]) -> None:
            record["meta"] = meta
            f.write((json.dumps(record) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
            totals["prompts"] += 1
            totals["labels"] += len(record["mismatches"])
            totals["important"] += sum(m[1] for m in record["mismatches"])
            totals["dropped"] += record["target_outcome"] is None
            totals["failed"] += "failed" in record
            totals["rollouts"] += record["num_rollouts"]
            hours = (time.perf_counter() - started) / 3600
            bar.update(1)
            bar.set_postfix(
                labels=int(totals["labels"]),
                important=f"{totals['important'] / max(totals['labels'], 1):.1%}",
                per_hour=f"{totals['labels'] / max(hours, 1e-9):.0f}",
            )

        miner.run(todo, emit)
        bar.close()
    totals["seconds"] = time.perf_counter() - started
    totals["left"] = len(todo) - totals["prompts"]
    return totals
