"""Precision of the Qwen2.5-Coder pair on this CPU: fp32, bf16 and W8A8 int8 (`Int8Linear`) for target and draft.

For each variant it prints the cached decode step (batch 1 and the mining batch), the verify forward of K+1
tokens per row, and the teacher-forced greedy agreement with the fp32 target: the fp32 target decodes each prompt
greedily once, every variant reads the same sequences, and a position agrees when its argmax is the fp32 target's
token. Prompts: the first GSM8K test problems and HumanEval mining tasks, rendered as the miner renders them.
From the repository root, after `make assets-qwen`: `PYTHONPATH=. .venv/bin/python benchmarks/pair_precision.py`
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from pathlib import Path

import torch
from step_cost import step_ms

from engine.model.assets import default_cache_dir, fetch_qwen_pair
from engine.model.decoder import Decoder
from engine.model.loader import eos_token_ids, load_model
from engine.model.quant import quantize_int8
from engine.runner import ModelRunner
from training.argtypes import positive, positive_list
from training.data import load_problems, prompt_token_ids

CPU = torch.device("cpu")


def verify_ms(model: Decoder, rows: int, context: list[int], k: int, steps: int) -> float:
    """Fastest ms of one forward of K+1 tokens per row after `context` cached tokens (the verify of window K)."""
    runner = ModelRunner(model, model.new_cache(rows, len(context) + k + 8), CPU)
    slots = list(range(rows))
    runner.forward([context] * rows, [0] * rows, slots)
    window = [(7 * i + 3) % model.config.vocab_size for i in range(k + 1)]
    times = []
    for i in range(steps + 1):  # one warm-up
        t0 = time.perf_counter()
        runner.logits(runner.forward([window] * rows, [len(context)] * rows, slots))
        if i:
            times.append(time.perf_counter() - t0)
    return 1000 * min(times)


@torch.inference_mode()
def greedy(model: Decoder, prompt: list[int], max_new: int, eos: set[int]) -> list[int]:
    runner = ModelRunner(model, model.new_cache(1, len(prompt) + max_new + 1), CPU)
    ids, fed = list(prompt), 0
    for _ in range(max_new):
        hidden = runner.forward([ids[fed:]], [fed], [0])
        fed = len(ids)
        tok = int(runner.logits(hidden[0, -1]).argmax())
        ids.append(tok)
        if tok in eos:
            break
    return ids


@torch.inference_mode()
def agreement(model: Decoder, sequences: list[tuple[int, list[int]]]) -> float:
    """Share of response positions where `model`'s argmax equals the reference token (teacher-forced)."""
    hits = total = 0
    for n_prompt, ids in sequences:
        runner = ModelRunner(model, model.new_cache(1, len(ids) + 1), CPU)
        pred = runner.logits(runner.forward([ids[:-1]], [0], [0])[0]).argmax(-1)  # [L-1]
        ref = torch.tensor(ids[1:])
        hits += int((pred[n_prompt - 1 :] == ref[n_prompt - 1 :]).sum())
        total += len(ids) - n_prompt
    return hits / max(total, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    p.add_argument("--rows", type=positive_list, default=[1, 16], help="decode batch sizes, a comma list")
    p.add_argument("--k", type=positive, default=8, help="window K of the verify forward (K+1 tokens a row)")
    p.add_argument("--context", type=positive, default=256, help="cached tokens per row")
    p.add_argument("--steps", type=positive, default=5, help="timed steps per cell")
    p.add_argument("--prompts", type=positive, default=4, help="prompts per task for the agreement")
    p.add_argument("--max-new-tokens", type=positive, default=128, help="fp32 target response length")
    p.add_argument("--threads", type=positive, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    draft_dir, target_dir = fetch_qwen_pair(args.cache_dir)
    target32 = load_model(target_dir, cache_dir=args.cache_dir)
    tok = target32.tokenizer
    eos = set(eos_token_ids(target32))
    problems = load_problems("gsm8k-test")[: args.prompts] + load_problems("humaneval-mining")[: args.prompts]
    t0 = time.perf_counter()
    sequences = []
    for prob in problems:
        prompt = prompt_token_ids(tok, prob)
        sequences.append((len(prompt), greedy(target32.model, prompt, args.max_new_tokens, eos)))
    n_tokens = sum(len(ids) - n for n, ids in sequences)
    print(f"fp32 target reference: {len(sequences)} prompts, {n_tokens} tokens in {time.perf_counter() - t0:.0f} s")
    context = [(17 * i + 5) % target32.model.config.vocab_size for i in range(args.context + 1)]

    def variants(path: Path) -> dict[str, Callable[[], Decoder]]:
        return {
            "fp32": lambda: load_model(path, cache_dir=args.cache_dir).model,
            "bf16": lambda: load_model(path, dtype=torch.bfloat16, cache_dir=args.cache_dir).model,
            "int8": lambda: quantize_int8(load_model(path, cache_dir=args.cache_dir).model),
        }

    cols = [f"decode b={r} ms" for r in args.rows] + [f"verify K={args.k} b={r} ms" for r in args.rows]
    print("| model | " + " | ".join(cols) + " | greedy agreement with fp32 target |")
    print("|---|" + "---|" * (len(cols) + 1))
    del target32
    gc.collect()
    for role, path in (("target 1.5B", target_dir), ("draft 0.5B", draft_dir)):
        for name, build in variants(path).items():
            model = build()
            decode = [step_ms(model, r, context, args.steps)[1] for r in args.rows]
            verify = [verify_ms(model, r, context, args.k, args.steps) for r in args.rows]
            agree = agreement(model, sequences)
            cells = [f"{x:.0f}" for x in decode + verify] + [f"{agree:.3f}"]
            print(f"| {role} {name} | " + " | ".join(cells) + " |", flush=True)
            del model
            gc.collect()


if __name__ == "__main__":
    main()
