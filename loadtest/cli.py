"""`autojudge-loadtest` / `python -m loadtest`: flags -> a checked `LoadConfig` -> the run -> the report files and
a summary on stdout. Bad arguments exit 2, a run that cannot start or finish exits 1, both with a message."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from loadtest import report, session
from loadtest.config import ENDPOINTS, PROMPT_SETS, LoadConfig, LoadTestError
from loadtest.prompts import load_prompts

PROG = "autojudge-loadtest"
D = LoadConfig()  # the defaults


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Load-test an OpenAI-compatible endpoint (this project's server, vLLM, ...): closed or open "
        "loop, streaming or not; reports throughput, TTFT/TPOT/ITL/E2E percentiles, errors by kind and the "
        "server's speculative-decoding acceptance statistics.",
    )
    server = p.add_argument_group("server")
    server.add_argument("--base-url", default=D.base_url, help="server root; a trailing /v1 is accepted (%(default)s)")
    server.add_argument("--api-key", default=D.api_key, help="sent as 'Authorization: Bearer <key>'")
    server.add_argument("--model", default=D.model, help="model id (default: the first of GET /v1/models)")
    server.add_argument("--endpoint", choices=ENDPOINTS, default=D.endpoint, help="API route (%(default)s)")
    server.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=D.stream,
        help="SSE streaming; TTFT, ITL and TPOT need it (on)",
    )
    server.add_argument("--timeout", type=float, default=D.timeout, help="seconds one request may take (%(default)s)")

    load = p.add_argument_group("load (one of --concurrency and --rate; --num-requests and/or --duration)")
    loop = load.add_mutually_exclusive_group()
    loop.add_argument(
        "--concurrency",
        type=int,
        default=D.concurrency,
        help="closed loop: users, each sending its next request when its last one ends (%(default)s)",
    )
    loop.add_argument("--rate", type=float, help="open loop: Poisson arrivals, requests per second")
    load.add_argument("--max-concurrency", type=int, help="open loop: at most this many requests in flight")
    load.add_argument("--num-requests", type=int, help="measured requests to send")
    load.add_argument("--duration", type=float, help="seconds to send requests for")
    load.add_argument(
        "--grace",
        type=float,
        default=D.grace,
        help="seconds in-flight requests get after --duration before they are cancelled (%(default)s)",
    )
    load.add_argument(
        "--warmup", type=int, default=D.warmup, help="requests sent first, left out of the stats (%(default)s)"
    )
    load.add_argument(
        "--seed",
        type=int,
        default=D.seed,
        help="seeds the arrival schedule; request i gets sampling seed + i (%(default)s)",
    )

    work = p.add_argument_group("requests")
    prompts = work.add_mutually_exclusive_group()
    prompts.add_argument(
        "--prompts",
        choices=PROMPT_SETS,
        default=D.prompts,
        help="built-in short prompts, or GSM8K test questions (%(default)s)",
    )
    prompts.add_argument("--prompts-file", type=Path, help="JSONL, one object per line with 'prompt' or 'messages'")
    work.add_argument(
        "--data-dir",
        type=Path,
        default=D.data_dir,
        help="folder of GSM8K's test.jsonl (default: shared/data/gsm8k beside the checkout)",
    )
    work.add_argument("--max-tokens", type=int, default=D.max_tokens, help="per request (%(default)s)")
    work.add_argument("--temperature", type=float, default=D.temperature, help="(%(default)s: greedy)")
    work.add_argument("--task-profile", help="extension field, sent only when given")
    work.add_argument("--judge-threshold", type=float, help="extension field, sent only when given")
    work.add_argument("--num-speculative-tokens", type=int, help="extension field, sent only when given")
    work.add_argument("--speculative-window", help="extension field (auto | fixed), sent only when given")

    slo = p.add_argument_group("goodput: requests/s meeting every SLO given (milliseconds)")
    slo.add_argument("--slo-ttft-ms", type=float, help="time to first token at most this")
    slo.add_argument("--slo-tpot-ms", type=float, help="time per output token at most this")
    slo.add_argument("--slo-e2e-ms", type=float, help="end-to-end latency at most this")

    out = p.add_argument_group("output")
    out.add_argument("--out-json", type=Path, help="write the full report (with every request) as JSON")
    out.add_argument("--out-md", type=Path, help="write the report as markdown tables")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    return p


def parse_config(argv: list[str] | None) -> LoadConfig:
    p = parser()
    args = vars(p.parse_args(argv))
    if args["rate"] is not None:
        args["concurrency"] = None  # its default belongs to the closed loop
    cfg = LoadConfig(**args)
    if problems := cfg.problems():
        p.error("; ".join(problems))  # exits 2
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    try:
        prompts = load_prompts(cfg)
        document = asyncio.run(run(cfg, prompts))
        report.write(document, cfg.out_json, cfg.out_md)
    except LoadTestError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(report.summary(document))
    return 0


async def run(cfg: LoadConfig, prompts: list[dict[str, Any]]) -> report.Json:
    async with session.http_client(cfg) as http:
        return await session.execute(cfg, http, prompts)
