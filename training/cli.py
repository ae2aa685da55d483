"""`autojudge-train`: the training pipeline's commands (mine, features, fit, evaluate); its composition root."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from engine.model.decoder import Decoder
from engine.model.fingerprint import pair_fingerprint
from engine.model.loader import LoadedModel, eos_token_ids, tokenizer_fingerprint
from engine.model.pair import DRAFT_CHOICES_HELP, load_pair
from training.data import DEFAULT_GSM8K_DIR, SOURCES, Problem, load_problems, prompt_token_ids
from training.mine import MineConfig, Miner, mine_to_file
from training.tasks import outcome

ORACLE_VERSION = {"math": "gsm8k_cot_llama-strict-then-flexible/1", "code": "last-two-fences+check/1"}


def env(name: str, default: str) -> str:
    return os.environ.get(f"AUTOJUDGE_{name}", default)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pair", choices=("smollm2", "qwen-coder"), default=env("PAIR", "smollm2"))
    p.add_argument("--target", help="target: a Hugging Face directory or a .gguf file (overrides --pair)")
    p.add_argument("--draft", default=env("DRAFT", "int8"), help=DRAFT_CHOICES_HELP)
    p.add_argument("--device", default=env("DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
    p.add_argument("--threads", type=int, default=int(env("THREADS", "0")), help="CPU threads (0: torch's)")
    p.add_argument("--cache-dir", type=Path, default=Path(env("CACHE", str(Path.home() / ".cache/autojudge"))))


def add_problem_flags(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--source", choices=SOURCES, default=default)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_GSM8K_DIR, help="folder of GSM8K train/test.jsonl")
    p.add_argument("--offset", type=int, default=0, help="skip this many problems (file order)")
    p.add_argument("--limit", type=int, default=0, help="at most this many problems (0: all)")
    p.add_argument("--size", type=int, default=1000, help="gsm-symbolic: problems to generate")
    p.add_argument("--seed", type=int, default=0, help="gsm-symbolic: generator seed")


def load_models(args: argparse.Namespace) -> tuple[LoadedModel, Decoder]:
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    target, draft = load_pair(
        pair=args.pair,
        target=args.target,
        draft=args.draft,
        dtype=torch.float32,  # labels and features in fp32 (method §8, pitfall 7)
        device=torch.device(args.device),
        cache_dir=args.cache_dir,
    )
    if draft is None:
        raise ValueError("mining and evaluation need a draft model (--draft none is not allowed here)")
    print(f"loaded {target.source} + draft {args.draft} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return target, draft


def select_problems(args: argparse.Namespace) -> list[Problem]:
    problems = load_problems(args.source, data_dir=args.data_dir, size=args.size, seed=args.seed)
    problems = problems[args.offset :]
    return problems[: args.limit] if args.limit else problems


def fingerprint(target: LoadedModel, draft: Decoder) -> dict[str, Any]:
    return pair_fingerprint(target.model, draft, tokenizer_fingerprint(target.tokenizer))


# --- mine ----------------------------------------------------------------------------------------------
def mine(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="autojudge-train mine", description="Mine important mismatches (labels).")
    add_model_flags(p)
    add_problem_flags(p, "gsm8k-train")
    p.add_argument("--out", type=Path, required=True, help="label file (JSON lines); resumed when it exists")
    p.add_argument("--max-new-tokens", type=int, default=512, help="response budget per rollout")
    p.add_argument("--concurrency", type=int, default=32, help="prompts searched at once")
    args = p.parse_args(argv)
    problems = select_problems(args)
    target, draft = load_models(args)
    tokenizer = target.tokenizer
    prompts = [(prob, prompt_token_ids(tokenizer, prob)) for prob in problems]
    config = MineConfig(max_new_tokens=args.max_new_tokens, concurrency=args.concurrency)
    tasks = sorted({prob.task for prob in problems})
    meta = {
        "pair": fingerprint(target, draft),
        "models": {"target": args.target or args.pair, "draft": args.draft},
        "source": args.source,
        "max_new_tokens": config.max_new_tokens,
        "oracle": {t: ORACLE_VERSION[t] for t in tasks},
    }

    def task_outcome(problem: Problem, generated: list[int]) -> str | None:
        return outcome(problem, str(tokenizer.decode(generated, skip_special_tokens=True)))

    miner = Miner(target.model, draft, task_outcome, eos_token_ids(target), config, max(len(ids) for _, ids in prompts))
    totals = mine_to_file(miner, prompts, args.out, meta)
    hours = totals["seconds"] / 3600
    print(
        f"mined {int(totals['prompts'])} prompts in {totals['seconds']:.0f} s: {int(totals['labels'])} labels, "
        f"{totals['important'] / max(totals['labels'], 1):.1%} important, "
        f"{totals['labels'] / max(hours, 1e-9):.0f} labels/hour, {int(totals['rollouts'])} target rollouts, "
        f"{int(totals['dropped'])} prompts dropped (target answer did not parse) -> {args.out}",
        file=sys.stderr,
    )
    return 0


COMMANDS = {"mine": mine}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: autojudge-train {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ValueError, FileNotFoundError, ImportError, MemoryError) as e:
        print(f"autojudge-train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
