"""The start-up profile of step cost: time target and draft forwards over a grid of rows x tokens per row on the
device actually used, and cache the table per pair, device, threads and grid (re-profiled on request)."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.model.protocol import LanguageModel
from engine.runner import ModelRunner
from engine.spec.cost import ForwardCost, StepCost

CONTEXT = 256  # cached tokens per row while timing: a typical prompt plus some output
# The draft's extra token counts: a catch-up forward reads a deferred prompt or the tokens emitted while its row did
# not draft, and a line through the small counts alone overstated a 150-token catch-up by 30-70% on the CPU.
CATCH_UP = (64, 256)
CELL_BUDGET = 1.0  # seconds of timed repeats per cell, after the first: the large catch-up cells stop early
PROFILE_FORMAT = 3  # what a cell times (3: catch-up columns): a cached profile of another format is measured again


def grid(max_slots: int, max_speculative: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Row counts (powers of two up to the slots) and tokens per row (1, 2, 3, 5, 9, ... up to K + 1)."""
    rows = sorted({min(2**i, max_slots) for i in range(max_slots.bit_length() + 1)})
    tokens = {1} | {min(1 + 2**i, max_speculative + 1) for i in range(max_speculative.bit_length() + 1)}
    return tuple(rows), tuple(sorted(tokens))


def draft_tokens(tokens: tuple[int, ...], max_position: int) -> tuple[int, ...]:
    """The draft's token axis: the verify grid's plus the catch-up counts that fit half its positions."""
    return tokens + tuple(t for t in CATCH_UP if tokens[-1] < t <= max_position // 2)


def monotone(table: list[list[float]]) -> tuple[tuple[float, ...], ...]:
    """The largest table below `table` that never falls as rows or tokens grow: each cell becomes the least
    measurement at or beyond it. A forward over more tokens cannot cost less, so a cell above its larger
    neighbours was disturbed (another process, a page fault), and noise only ever adds time."""
    out = [list(r) for r in table]
    for i in range(len(out) - 1, -1, -1):
        for j in range(len(out[i]) - 1, -1, -1):
            below = [out[i + 1][j]] if i + 1 < len(out) else []
            right = [out[i][j + 1]] if j + 1 < len(out[i]) else []
            out[i][j] = min([out[i][j], *below, *right])
    return tuple(tuple(r) for r in out)


def time_forwards(
    model: LanguageModel,
    device: torch.device,
    rows: tuple[int, ...],
    tokens: tuple[int, ...],
    context: int,
    all_logits: bool,
    repeats: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> ForwardCost:
    """Fastest of `repeats` forwards per grid cell (after one untimed forward; fewer once they took `CELL_BUDGET`)
    on a scratch cache, made monotone. Each forward includes its logits as the engine computes them: every fed
    position for the target's verify (`all_logits`), the last one per row for a draft step."""
    runner = ModelRunner(model, model.new_cache(max(rows), context + max(tokens) + 1), device)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    table: list[list[float]] = []
    for b in rows:
        line = []
        for q in tokens:
            feeds = torch.randint(vocab, (b, q), generator=gen).tolist()
            times: list[float] = []
            for rep in range(repeats + 1):
                start = clock()
                hidden = runner.forward(feeds, [context] * b, list(range(b)))  # [b, q, D]
                runner.logits(hidden if all_logits else hidden[:, -1])
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if rep:
                    times.append(clock() - start)
                    if sum(times) > CELL_BUDGET:
                        break
            line.append(min(times))
        table.append(line)
    return ForwardCost(rows, tokens, monotone(table))


def profile_step_cost(
    target: LanguageModel, draft: LanguageModel, device: torch.device, max_slots: int, max_speculative: int
) -> StepCost:
    rows, tokens = grid(max_slots, max_speculative)
    positions = min(target.config.max_position_embeddings, draft.config.max_position_embeddings)
    catch_up = draft_tokens(tokens, positions)
    context = min(CONTEXT, positions - catch_up[-1] - 2)
    return StepCost(
        time_forwards(target, device, rows, tokens, context, all_logits=True),
        time_forwards(draft, device, rows, catch_up, context, all_logits=False),
        context,
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def profile_key(pair: dict[str, Any], device: torch.device, max_slots: int, max_speculative: int) -> dict[str, Any]:
    """What a cached profile must match to be reused."""
    return {
        "format": PROFILE_FORMAT,
        "pair": pair,
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "grid": [list(axis) for axis in grid(max_slots, max_speculative)],
    }


def cached_step_cost(
    cache_dir: Path,
    key: dict[str, Any],
    measure: Callable[[], StepCost],
    reprofile: bool = False,
) -> tuple[StepCost, bool]:
    """The cached profile for `key`, else a fresh one (written atomically); returns it and whether it was measured."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / "step-cost" / f"{digest}.json"
    if path.is_file() and not reprofile:
        try:
            stored = json.loads(path.read_text())
            if stored.get("key") == key:
                return StepCost.from_dict(stored["cost"]), False
        except (ValueError, KeyError, TypeError):
            pass  # a damaged file is measured again and replaced
    cost = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "cost": cost.to_dict()}, indent=1))
    tmp.replace(path)
    return cost, True


def describe(cost: StepCost) -> str:
    """One line for the start-up log: a few cells of both tables, in ms."""
    t, d = cost.target, cost.draft
    rows = sorted({t.rows[0], t.rows[-1]})
    cells = [f"target {b}x{q} {1000 * t(b, q):.1f}" for b in rows for q in (1, t.tokens[-1])]
    cells += [f"draft {b}x1 {1000 * d(b, 1):.1f}" for b in rows]
    return ", ".join(cells) + f" ms (context {cost.context})"
