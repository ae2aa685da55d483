"""One cached decode step (forward + logits) of a pair's target and draft (`--pair`: the embedded target and its
int8 twin by default), at a few batch sizes, in the pair's own precision.

Prints one markdown row per run: the median and the fastest step of each, in ms (the fastest is the figure
to compare across runs: this machine's noise only ever adds time). It imports only the engine, so it also times
an older checkout: run it alternately with `PYTHONPATH` on each checkout and compare the rows (an A/B of two
commits on a noisy machine). From the repository root: `PYTHONPATH=. .venv/bin/python benchmarks/step_cost.py`
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from engine.model.assets import default_cache_dir
from engine.model.decoder import Decoder
from engine.model.pair import PAIRS, load_pair
from engine.runner import ModelRunner
from training.argtypes import positive, positive_list

CPU = torch.device("cpu")


def step_ms(model: Decoder, rows: int, context: list[int], steps: int) -> tuple[float, float]:
    """Median and fastest ms of a 1-token step per row after `context` cached tokens (the same position)."""
    runner = ModelRunner(model, model.new_cache(rows, len(context) + 8), CPU)
    slots = list(range(rows))
    runner.forward([context[:-1]] * rows, [0] * rows, slots)
    times = []
    for i in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        runner.logits(runner.forward([context[-1:]] * rows, [len(context) - 1] * rows, slots))
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times), 1000 * min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    p.add_argument("--pair", choices=PAIRS, default=PAIRS[0])
    p.add_argument("--rows", type=positive_list, default=[1, 8], help="batch sizes, a comma list")
    p.add_argument("--context", type=positive, default=96, help="cached tokens per row")
    p.add_argument("--steps", type=positive, default=30, help="timed steps per model and batch size")
    p.add_argument("--threads", type=positive, default=2)
    p.add_argument("--header", action="store_true", help="print the table header first")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded, draft = load_pair(
        pair=args.pair, target=None, draft="int8", dtype="auto", device=CPU, cache_dir=args.cache_dir
    )
    target = loaded.model
    assert draft is not None
    context = [(17 * i + 5) % target.config.vocab_size for i in range(args.context + 1)]
    models = {"draft": draft, "target": target}
    if args.header:
        cols = [f"{n} b={r} ms (median / fastest)" for n in models for r in args.rows]
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    cells = ["{:.1f} / {:.1f}".format(*step_ms(m, r, context, args.steps)) for m in models.values() for r in args.rows]
    print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
