"""Fused against unfused int8 draft: the cost of one cached draft step (forward + logits), side by side.

Both drafts are `quantize_int8` copies of the embedded target, one with q/k/v and gate/up fused (the engine's
draft) and one with the seven Linears of each layer kept; their outputs are checked bit-identical first. Rounds
alternate the two, so the machine's drift falls on both; prints the median step of each and their ratio.
Run from the repository root: `PYTHONPATH=. .venv/bin/python benchmarks/draft_step.py`
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from engine.model.assets import default_cache_dir, embedded_target_path
from engine.model.loader import load_model
from engine.model.quant import quantize_int8
from engine.runner import ModelRunner
from training.argtypes import positive, positive_list

CPU = torch.device("cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    p.add_argument("--rows", type=positive_list, default=[1, 8], help="batch sizes, a comma list")
    p.add_argument("--context", type=positive, default=96, help="cached tokens per row")
    p.add_argument("--rounds", type=positive, default=15)
    p.add_argument("--steps", type=positive, default=10, help="timed steps per round and draft")
    p.add_argument("--threads", type=positive, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    target = load_model(embedded_target_path(), cache_dir=args.cache_dir).model
    drafts = {"fused": quantize_int8(target), "unfused": quantize_int8(target, fuse=False)}
    context = [(17 * i + 5) % target.config.vocab_size for i in range(args.context)]
    print(f"{torch.get_num_threads()} threads, {args.context} cached tokens, {args.rounds} rounds x {args.steps} steps")
    print("| rows | fused ms | unfused ms | fused / unfused |")
    print("|---|---|---|---|")
    for rows in args.rows:
        runners = {n: ModelRunner(d, d.new_cache(rows, args.context + 8), CPU) for n, d in drafts.items()}
        slots = list(range(rows))
        outs = {}
        for name, runner in runners.items():
            runner.forward([context] * rows, [0] * rows, slots)
            outs[name] = runner.logits(runner.forward([context[-1:]] * rows, [args.context] * rows, slots))
        if not torch.equal(outs["fused"], outs["unfused"]):
            raise SystemExit("fused and unfused drafts disagree")
        times: dict[str, list[float]] = {n: [] for n in runners}
        for _ in range(args.rounds):
            for name, runner in runners.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    runner.logits(runner.forward([context[-1:]] * rows, [args.context] * rows, slots))
                times[name].append((time.perf_counter() - t0) / args.steps)
        fused, unfused = (1000 * statistics.median(times[n]) for n in ("fused", "unfused"))
        print(f"| {rows} | {fused:.1f} | {unfused:.1f} | {fused / unfused:.2f} |")


if __name__ == "__main__":
    main()
