"""`autojudge generate`: load a draft/target pair (the embedded default unless told otherwise), run a batch of
prompts through the speculative engine, print each completion and the acceptance statistics.

This module is the engine's composition root: with `engine.flags` it alone reads environment variables, and it
loads the checkpoints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from engine import build
from engine.config import CacheConfig, EngineConfig, SpecConfig
from engine.flags import add_pair_flags, env
from engine.model.decoder import Decoder
from engine.model.loader import LoadedModel
from engine.model.pair import load_pair
from engine.scheduler import QueueFullError
from engine.spec.judging import HeadJudge
from engine.types import Request, RequestOutput, SamplingParams, SpecCounts, SpecParams, StepStats
from judge.io import HeadMismatchError

DEFAULT_PROMPT = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="autojudge generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: a GSM8K question")
    p.add_argument("--prompts-file", type=Path, help="one prompt per line")
    p.add_argument("--raw", action="store_true", help="send prompts as is, without the chat template")
    add_pair_flags(p)
    p.add_argument(
        "--heads",
        default=env("HEADS", "shipped"),
        help="judge heads: a directory of <profile>/head.json folders, 'shipped' (the heads that come with the "
        "embedded pair) or 'none'",
    )
    p.add_argument("--profile", default="lossless", help="task profile, e.g. math or code (lossless: no judge)")
    p.add_argument("--judge-threshold", type=float, help="τ in [0, 1]; default: the profile head's default")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    p.add_argument("--no-spec", action="store_true", help="plain target decoding")
    p.add_argument("--no-bonus", action="store_true", help="no bonus token after a fully accepted window")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--slots", type=int, default=int(env("MAX_SLOTS", "8")))
    p.add_argument("--max-model-len", type=int, default=int(env("MAX_MODEL_LEN", "2048")))
    p.add_argument("--json", action="store_true", help="print one JSON object per request instead of text")
    return p.parse_args(argv)


def load_models(args: argparse.Namespace) -> tuple[LoadedModel, Decoder | None]:
    return load_pair(
        pair=args.pair,
        target=args.target,
        draft="none" if args.no_spec else args.draft,
        dtype=args.dtype,
        device=torch.device(args.device),
        cache_dir=args.cache_dir,
        quantize=args.quantize,
    )


def load_judge(args: argparse.Namespace, target: LoadedModel, draft: Decoder | None) -> HeadJudge:
    return build.load_judge(args.heads, args.pair, bool(args.target), target, draft, args.device)


def spec_params(args: argparse.Namespace, judge: HeadJudge) -> SpecParams:
    judge.check_profile(args.profile)
    tau = args.judge_threshold
    if tau is None:
        tau = judge.default_threshold(args.profile)
    return SpecParams(enabled=not args.no_spec, profile=args.profile, judge_threshold=tau)


def encode_prompts(args: argparse.Namespace, tokenizer: Any) -> list[list[int]]:
    texts = list(args.prompt or [])
    if args.prompts_file:
        texts += [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    texts = texts or [DEFAULT_PROMPT]
    if args.raw:
        return [tokenizer.encode(t) for t in texts]
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in texts
    ]
    return [tokenizer.encode(r, add_special_tokens=False) for r in rendered]


class StepTotals:
    """Sums the engine's per-step statistics for the closing report."""

    def __init__(self) -> None:
        self.steps = 0
        self.seconds = {"prefill": 0.0, "draft": 0.0, "verify": 0.0, "judge": 0.0}

    def __call__(self, stats: StepStats) -> None:
        self.steps += 1
        for k in self.seconds:
            self.seconds[k] += getattr(stats, f"seconds_{k}")


def format_counts(c: SpecCounts) -> str:
    per_pos = ", ".join(f"{n}/{c.num_spec_steps}" for n in c.accepted_per_pos if c.num_spec_steps)
    return (
        f"cycles {c.num_spec_steps}, drafted {c.num_draft_tokens}, accepted {c.num_accepted_tokens} "
        f"(judge {c.num_judge_accepted} of {c.num_judged} judged), recovered {c.num_recovered}, "
        f"bonus {c.num_bonus}; acceptance rate {c.draft_acceptance_rate:.3f}, "
        f"mean tokens per cycle {c.mean_acceptance_length:.2f}; accepted by position [{per_pos}]"
    )


def generate(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    target, draft = load_models(args)
    tokenizer = target.tokenizer
    print(
        f"loaded target {target.source} and draft {args.draft if draft is not None else 'none'} "
        f"in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    judge = load_judge(args, target, draft)
    spec = spec_params(args, judge)
    totals = StepTotals()
    config = EngineConfig(
        cache=CacheConfig(max_slots=args.slots, max_model_len=args.max_model_len),
        spec=SpecConfig(
            max_speculative_tokens=max(args.num_speculative_tokens, 1),
            default_speculative_tokens=args.num_speculative_tokens,
            bonus_token=not args.no_bonus,
        ),
    )
    engine = build.pair_engine(config, target, draft, judge, totals, args.device)
    sampling = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    prompts = encode_prompts(args, tokenizer)
    for i, ids in enumerate(prompts):
        engine.add_request(Request(f"req-{i}", tuple(ids), sampling, spec))
    finals: dict[str, RequestOutput] = {}
    tokens: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finals[out.request_id] = out
    elapsed = time.perf_counter() - t0
    report(args, tokenizer, prompts, tokens, finals, totals, elapsed)
    failed = [f"{rid}: {out.error}" for rid, out in finals.items() if out.error is not None]
    for line in failed:
        print(f"autojudge: error: {line}", file=sys.stderr)
    return 1 if failed else 0


def completion_text(tokenizer: Any, ids: list[int], stop: int | str | None) -> str:
    text = str(tokenizer.decode(ids, skip_special_tokens=True))
    if isinstance(stop, str) and stop in text:
        text = text[: text.rfind(stop)]
    return text


def report(
    args: argparse.Namespace,
    tokenizer: Any,
    prompts: list[list[int]],
    tokens: dict[str, list[int]],
    finals: dict[str, RequestOutput],
    totals: StepTotals,
    elapsed: float,
) -> None:
    total = SpecCounts()
    for i in range(len(prompts)):
        rid = f"req-{i}"
        out = finals[rid]
        text = completion_text(tokenizer, tokens[rid], out.stop_reason)
        if out.spec is not None:
            total = total.merge(out.spec)
        if args.json:
            print(
                json.dumps(
                    {
                        "id": rid,
                        "text": text,
                        "finish_reason": out.finish_reason,
                        "error": out.error,
                        "output_tokens": out.num_output_tokens,
                        "spec": asdict(out.spec) if out.spec else None,
                    }
                )
            )
            continue
        print(
            f"=== {rid} ({out.num_prompt_tokens} prompt tokens, {out.num_output_tokens} generated, "
            f"finish: {out.finish_reason})"
        )
        print(text)
        if out.spec is not None:
            print(f"--- {format_counts(out.spec)}")
    generated = sum(len(t) for t in tokens.values())
    s = totals.seconds
    print(
        f"\n{len(prompts)} requests, {generated} tokens in {elapsed:.2f} s "
        f"({generated / elapsed:.1f} tok/s), {totals.steps} engine steps = target forwards "
        f"({totals.steps / max(generated, 1):.3f} per token)",
        file=sys.stderr,
    )
    print(
        f"time: prefill {s['prefill']:.2f} s, draft {s['draft']:.2f} s, verify {s['verify']:.2f} s, "
        f"judge {s['judge']:.3f} s",
        file=sys.stderr,
    )
    if total.num_spec_steps:
        print(f"all requests: {format_counts(total)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "generate":
        print("usage: autojudge generate [options]  (autojudge generate --help)", file=sys.stderr)
        return 2
    try:
        return generate(argv[1:])
    except (ValueError, MemoryError, QueueFullError, FileNotFoundError, HeadMismatchError) as e:
        print(f"autojudge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
