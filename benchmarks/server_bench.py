"""Server benchmark: starts `autojudge-serve` (the embedded SmolLM2 pair unless `--server-args` says otherwise) on
127.0.0.1 and measures it over HTTP with streaming requests, greedy, the same built-in GSM8K-style prompts.

Modes (`--modes`, comma list):

- `throughput`: closed loop at each `--concurrency` level (N workers, each sends a request, reads its stream to
  the end, sends the next) for `--duration` seconds or `--requests` requests per level; aggregate output tokens/s
  (`usage.completion_tokens` of the final usage chunk), its ratio to the 1-stream level, TTFT p50/p90, e2e p50.
- `overhead`: time to first token through HTTP against the same engine built in this process (`build_engine`
  from the same server settings, `AsyncEngine.generate`), same prompt, alternated repetitions; medians,
  difference and ratio.
- `soak`: `--soak-concurrency` streams for `--soak-seconds`; requests, errors by kind, output tokens, and the
  server's RSS every 10 s (first, max, last, slope over the second half), with a zero-error verdict.

From the repository root:

    .venv/bin/python benchmarks/server_bench.py --modes throughput,overhead,soak [--json results.json]

The server is always stopped (SIGTERM, then SIGKILL after a timeout), also on Ctrl-C. Its log goes to a
temporary file whose path is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

Row = dict[str, Any]
MODES = ("throughput", "overhead", "soak")
RSS_INTERVAL = 10.0  # seconds between samples of the server's RSS in soak mode
STOP_TIMEOUT = 60.0  # seconds the server gets to drain and exit after SIGTERM before SIGKILL
DEFAULT_SERVER_ARGS = "--max-slots 16 --threads 2"  # 16 slots: the top concurrency level decodes as one batch

# Written for this benchmark in the style of GSM8K (no data files): short multi-step arithmetic word problems.
MATH = (
    "A baker makes 24 muffins in the morning and 18 in the afternoon. She sells 30 of them. How many are left?",
    "Tom has 3 boxes with 12 pencils each. He gives 7 pencils to his sister. How many pencils does he have now?",
    "A train travels 60 km per hour for 2.5 hours. How far does it go?",
    "Maria earns $15 an hour and works 6 hours a day for 5 days. How much does she earn in total?",
    "A garden has 8 rows of 9 tomato plants. 14 plants die. How many plants are still alive?",
    "A shirt costs $40 and is on sale for 25% off. What is the sale price?",
    "Sam reads 12 pages a day. How many days does he need to finish a 180-page book?",
    "A school orders 5 packs of 48 juice boxes and uses 3/4 of them at a picnic. How many are left?",
)
PROMPT_SETS: dict[str, tuple[str, ...]] = {"math": MATH, "tiny": MATH[:1]}


# --- arguments ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=",".join(MODES), help="comma list of throughput, overhead, soak")
    p.add_argument("--concurrency", default="1,4,16", help="throughput: comma list of concurrent streams")
    p.add_argument("--duration", type=float, default=60.0, help="throughput: seconds per level")
    p.add_argument("--requests", type=int, help="throughput: requests per level instead of --duration")
    p.add_argument("--overhead-reps", type=int, default=10, help="overhead: timed repetitions per path")
    p.add_argument("--soak-seconds", type=float, default=600.0)
    p.add_argument("--soak-concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-set", choices=sorted(PROMPT_SETS), default="math")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    p.add_argument("--task-profile", help="sent as task_profile (default: the server's default profile)")
    p.add_argument("--judge-threshold", type=float, help="sent as judge_threshold (default: the profile's τ)")
    p.add_argument("--server-args", default=DEFAULT_SERVER_ARGS, help="flags passed to autojudge-serve")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for GET /ready")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := set(args.mode_list) - set(MODES):
        p.error(f"unknown modes {', '.join(sorted(unknown))}; known: {', '.join(MODES)}")
    args.levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    return args


# --- the server subprocess ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """`autojudge-serve` as a child process in its own session, so a Ctrl-C reaches only this script, which then
    stops the server itself (one SIGTERM: the server's graceful drain)."""

    def __init__(self, argv: list[str]) -> None:
        self.port = free_port()
        self.argv = [str(Path(sys.executable).parent / "autojudge-serve"), *argv]
        self.argv += ["--host", "127.0.0.1", "--port", str(self.port)]  # last wins over --server-args
        self.url = f"http://127.0.0.1:{self.port}"
        fd, log = tempfile.mkstemp(prefix="server_bench-", suffix=".log")
        self.log = Path(log)
        try:
            self.proc = subprocess.Popen(self.argv, stdout=fd, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            os.close(fd)  # the child holds its own copy
        self.exit_status: int | None = None

    async def wait_ready(self, client: httpx.AsyncClient, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if (await client.get("/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet: the port is bound only after loading and the warm-up
            await asyncio.sleep(0.5)
        raise RuntimeError(f"the server was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                self.proc.kill()
                self.proc.wait()
        self.exit_status = self.proc.returncode


# --- one streaming request ------------------------------------------------------------------------------------
@dataclass
class Outcome:
    error: str | None  # None: a complete stream with its usage chunk; else http_<status>, stream_<type>, exception
    tokens: int  # usage.completion_tokens of the final chunk (0 on error)
    ttft: float | None  # seconds to the first chunk with text
    e2e: float  # seconds to [DONE] (or the failure)


def request_body(args: argparse.Namespace, question: str) -> Row:
    body: Row = {"max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                 "stream_options": {"include_usage": True}}  # fmt: skip
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": question}]
    else:
        body["prompt"] = question
    if args.task_profile is not None:
        body["task_profile"] = args.task_profile
    if args.judge_threshold is not None:
        body["judge_threshold"] = args.judge_threshold
    return body


def chunk_text(choice: Row) -> str:
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def stream_one(client: httpx.AsyncClient, path: str, body: Row) -> Outcome:
    start = time.perf_counter()
    ttft: float | None = None
    tokens: int | None = None
    error: str | None = None
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                error = f"http_{r.status_code}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line.removeprefix("data: ")
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:  # an error after the 200 headers
                        error = f"stream_{event['error'].get('type')}"
                        continue
                    choices = event.get("choices") or []
                    if ttft is None and any(chunk_text(c) for c in choices):
                        ttft = time.perf_counter() - start
                    if not choices and event.get("usage"):
                        tokens = int(event["usage"]["completion_tokens"])
    except Exception as e:  # transport failures, bad JSON: counted by kind, never fatal to the run
        error = type(e).__name__
    if error is None and tokens is None:
        error = "no_usage_chunk"
    return Outcome(error, (tokens or 0) if error is None else 0, ttft, time.perf_counter() - start)


async def closed_loop(
    client: httpx.AsyncClient, args: argparse.Namespace, streams: int, seconds: float | None, requests: int | None
) -> tuple[list[Outcome], float]:
    """`streams` workers, each sending the next prompt of the set when its last request ends, until `requests`
    were sent or `seconds` passed (requests in flight then still finish and count). Returns outcomes and wall s."""
    prompts = PROMPT_SETS[args.prompt_set]
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    outcomes: list[Outcome] = []
    sent = 0
    start = time.perf_counter()
    deadline = start + seconds if seconds is not None else float("inf")

    async def worker() -> None:
        nonlocal sent  # one event loop: no lock needed
        while time.perf_counter() < deadline and (requests is None or sent < requests):
            question = prompts[sent % len(prompts)]
            sent += 1
            outcomes.append(await stream_one(client, path, request_body(args, question)))

    await asyncio.gather(*(worker() for _ in range(streams)))
    return outcomes, time.perf_counter() - start


# --- statistics -----------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarise(outcomes: list[Outcome], wall: float) -> Row:
    ok = [o for o in outcomes if o.error is None]
    tokens = sum(o.tokens for o in ok)
    ttfts = [o.ttft for o in ok if o.ttft is not None]
    return {
        "requests": len(outcomes),
        "errors": len(outcomes) - len(ok),
        "errors_by_kind": dict(Counter(o.error for o in outcomes if o.error is not None)),
        "output_tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p90_s": percentile(ttfts, 0.9),
        "e2e_p50_s": percentile([o.e2e for o in ok], 0.5),
    }


def slope_per_minute(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope (MB/min) of the samples in the second half of the series' time span."""
    if not samples:
        return None
    half = samples[-1][0] / 2
    tail = [(t / 60, mb) for t, mb in samples if t >= half]
    if len(tail) < 2 or tail[-1][0] == tail[0][0]:
        return None
    return statistics.linear_regression([t for t, _ in tail], [mb for _, mb in tail]).slope


# --- modes ----------------------------------------------------------------------------------------------------
async def throughput(client: httpx.AsyncClient, args: argparse.Namespace) -> list[Row]:
    rows = []
    for streams in args.levels:
        print(f"throughput: {streams} streams", file=sys.stderr, flush=True)
        seconds = None if args.requests else args.duration
        outcomes, wall = await closed_loop(client, args, streams, seconds, args.requests)
        rows.append({"streams": streams, **summarise(outcomes, wall)})
    base = next((r["tok_s"] for r in rows if r["streams"] == 1), None)
    for r in rows:
        r["vs_1_stream"] = r["tok_s"] / base if base else None
    return rows


async def overhead(client: httpx.AsyncClient, args: argparse.Namespace, server_argv: list[str]) -> Row:
    """The same settings the server parsed build the same engine here; each repetition times one prompt through
    HTTP and one through `AsyncEngine.generate`, in alternating order, while the other side sits idle."""
    from engine import Request, SamplingParams, build_engine
    from server.profiles import ProfileTable
    from server.settings import load_settings
    from server.text import encode_chat

    print("overhead: building the in-process engine", file=sys.stderr, flush=True)
    settings = load_settings(server_argv, os.environ)
    loaded = build_engine(settings.model_source(), settings.engine_config())
    engine = loaded.client
    await engine.start()
    spec = (
        ProfileTable.from_info(loaded.info, settings.default_profile)
        .resolve(args.task_profile, args.judge_threshold, None, None)
        .spec
    )
    question = PROMPT_SETS[args.prompt_set][0]
    if args.endpoint == "chat":
        ids = encode_chat(loaded.tokenizer, [{"role": "user", "content": question}])
    else:
        ids = list(loaded.tokenizer.encode(question))
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"

    async def direct() -> Outcome:
        start = time.perf_counter()
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
        stream = await engine.generate(Request(f"bench-{uuid.uuid4().hex}", tuple(ids), sampling, spec, start))
        first, tokens = None, 0
        try:
            async for out in stream:
                if first is None and out.new_token_ids:
                    first = time.perf_counter() - start
                tokens = out.num_output_tokens
        finally:
            stream.close()
        return Outcome(None, tokens, first, time.perf_counter() - start)

    async def http() -> Outcome:
        return await stream_one(client, path, request_body(args, question))

    runs: dict[str, list[Outcome]] = {"http": [], "direct": []}
    try:
        await http()  # warm-up: the in-process engine has not generated yet
        await direct()
        for i in range(args.overhead_reps):
            order: list[tuple[str, Callable[[], Awaitable[Outcome]]]] = [("http", http), ("direct", direct)]
            for name, fn in order if i % 2 == 0 else order[::-1]:
                runs[name].append(await fn())
    finally:
        await engine.shutdown(5.0)
    out: Row = {"reps": args.overhead_reps, "prompt_tokens": len(ids)}
    for name, outcomes in runs.items():
        ok = [o for o in outcomes if o.error is None and o.ttft is not None]
        out[name] = {
            "ok": len(ok),
            "errors_by_kind": dict(Counter(o.error for o in outcomes if o.error is not None)),
            "ttft_median_s": statistics.median([o.ttft for o in ok if o.ttft is not None]) if ok else None,
            "e2e_median_s": statistics.median([o.e2e for o in ok]) if ok else None,
            "output_tokens": [o.tokens for o in outcomes],
        }
    h, d = out["http"]["ttft_median_s"], out["direct"]["ttft_median_s"]
    out["ttft_diff_s"] = h - d if h is not None and d is not None else None
    out["ttft_ratio"] = h / d if h is not None and d else None
    return out


async def soak(client: httpx.AsyncClient, args: argparse.Namespace, pid: int) -> Row:
    samples: list[tuple[float, float]] = []
    start = time.perf_counter()

    def sample() -> None:
        samples.append((time.perf_counter() - start, rss_mb(pid)))

    async def sampler() -> None:
        while True:
            sample()
            print(f"soak: {samples[-1][0]:.0f} s, server RSS {samples[-1][1]:.0f} MB", file=sys.stderr, flush=True)
            await asyncio.sleep(RSS_INTERVAL)

    task = asyncio.create_task(sampler())
    try:
        outcomes, wall = await closed_loop(client, args, args.soak_concurrency, args.soak_seconds, None)
    finally:
        task.cancel()
    sample()  # the state at the end, after the last stream
    rss = [mb for _, mb in samples]
    row = {"streams": args.soak_concurrency, "seconds": args.soak_seconds, **summarise(outcomes, wall)}
    row |= {"rss_first_mb": rss[0], "rss_max_mb": max(rss), "rss_last_mb": rss[-1],
            "rss_slope_mb_per_min_2nd_half": slope_per_minute(samples), "rss_samples": samples}  # fmt: skip
    row["verdict"] = "PASS" if row["errors"] == 0 and row["requests"] > 0 else "FAIL"
    return row


# --- report ---------------------------------------------------------------------------------------------------
def ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1000:.0f}"


def num(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def report(args: argparse.Namespace, meta: Row, results: Row) -> str:
    stop = f"{args.requests} requests" if args.requests else f"{args.duration:.0f} s"
    lines = [
        f"Command: `python {shlex.join(sys.argv)}`",
        f"Server: `autojudge-serve {args.server_args}`; model {meta['version'].get('model')}, draft "
        f"{meta['version'].get('draft')}, git {meta['version'].get('git_commit')}; exit status "
        f"{meta.get('server_exit_status')}",
        f"Machine: {meta['cpu']}, {meta['logical_cpus']} logical CPUs, load average {meta['loadavg']:.2f} at start",
        f"Requests: {args.endpoint}, streaming, temperature 0, max_tokens {args.max_tokens}, prompt set "
        f"{args.prompt_set} ({len(PROMPT_SETS[args.prompt_set])}), task_profile {args.task_profile or 'default'}, "
        f"judge_threshold {'profile' if args.judge_threshold is None else args.judge_threshold}",
    ]
    if rows := results.get("throughput"):
        lines += ["", f"Throughput (closed loop, {stop} per level):", ""]
        lines += [md_row(["streams", "requests", "errors", "output tokens", "wall s", "tok/s", "vs 1 stream",
                          "TTFT p50 ms", "TTFT p90 ms", "e2e p50 s"]), md_row(["---"] * 10)]  # fmt: skip
        for r in rows:
            lines.append(md_row([str(r["streams"]), str(r["requests"]), str(r["errors"]), str(r["output_tokens"]),
                                 f"{r['wall_s']:.1f}", f"{r['tok_s']:.2f}", num(r["vs_1_stream"]),
                                 ms(r["ttft_p50_s"]), ms(r["ttft_p90_s"]), num(r["e2e_p50_s"])]))  # fmt: skip
    if o := results.get("overhead"):
        lines += ["", f"Overhead (one prompt of {o['prompt_tokens']} tokens, {o['reps']} alternated reps, medians):",
                  "", md_row(["path", "ok", "TTFT ms", "e2e ms"]), md_row(["---"] * 4)]  # fmt: skip
        for name, label in (("http", "HTTP stream"), ("direct", "engine in-process")):
            r = o[name]
            lines.append(md_row([label, f"{r['ok']}/{o['reps']}", ms(r["ttft_median_s"]), ms(r["e2e_median_s"])]))
        lines.append(md_row(["HTTP − engine", "", ms(o["ttft_diff_s"]), ""]))
        lines.append(md_row(["HTTP / engine", "", num(o["ttft_ratio"]), ""]))
    if s := results.get("soak"):
        lines += ["", f"Soak ({s['streams']} streams, {s['seconds']:.0f} s, server RSS every {RSS_INTERVAL:.0f} s):",
                  "", md_row(["requests", "errors", "output tokens", "tok/s", "RSS first MB", "RSS max MB",
                              "RSS last MB", "slope MB/min (2nd half)"]), md_row(["---"] * 8)]  # fmt: skip
        lines.append(md_row([str(s["requests"]), str(s["errors"]), str(s["output_tokens"]), f"{s['tok_s']:.2f}",
                             f"{s['rss_first_mb']:.0f}", f"{s['rss_max_mb']:.0f}", f"{s['rss_last_mb']:.0f}",
                             num(s["rss_slope_mb_per_min_2nd_half"])]))  # fmt: skip
        kinds = ", ".join(f"{k}: {n}" for k, n in s["errors_by_kind"].items()) or "none"
        lines += ["", f"Errors by kind: {kinds}.", f"Verdict: {s['verdict']} ({s['errors']} errors in "
                  f"{s['requests']} requests; zero errors required)."]  # fmt: skip
    if failed := results.get("failed"):
        lines += ["", f"Not completed: {failed}"]
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --- main -----------------------------------------------------------------------------------------------------
async def run_modes(args: argparse.Namespace, server: Server, server_argv: list[str], meta: Row, results: Row) -> None:
    # Inside the loop a SIGTERM cancels the modes as Ctrl-C does (asyncio.run's own SIGINT handling), which also
    # works where SIGINT is ignored (a background job of a non-interactive shell).
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    streams = max([*args.levels, args.soak_concurrency, 1])
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    # NOTE: trust_env=False keeps proxy variables from routing loopback traffic elsewhere.
    timeout = httpx.Timeout(None, connect=10.0)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=timeout, trust_env=False) as client:
        await server.wait_ready(client, args.startup_timeout)
        meta["version"] = (await client.get("/version")).json()
        print(f"server ready on {server.url}", file=sys.stderr, flush=True)
        # One untimed request, so the first level does not pay for the first HTTP connection and chat template.
        await closed_loop(client, args, 1, None, 1)
        for mode in args.mode_list:
            if mode == "throughput":
                results["throughput"] = await throughput(client, args)
            elif mode == "overhead":
                results["overhead"] = await overhead(client, args, server_argv)
            else:
                results["soak"] = await soak(client, args, server.proc.pid)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server_argv = shlex.split(args.server_args)
    meta: Row = {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "loadavg": os.getloadavg()[0], "version": {}}
    results: Row = {}
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # outside the event loop: a SIGTERM acts as Ctrl-C
    server = Server(server_argv)
    print(f"starting: {shlex.join(server.argv)} (pid {server.proc.pid}, log {server.log})", file=sys.stderr, flush=True)
    status = 0
    try:
        asyncio.run(run_modes(args, server, server_argv, meta, results))
    except (KeyboardInterrupt, asyncio.CancelledError):
        results["failed"] = "interrupted"
        status = 130
    except RuntimeError as e:
        results["failed"] = str(e)
        status = 1
    finally:
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # the loop's handler is gone with the loop
        server.stop()
    meta["server_exit_status"] = server.exit_status
    if status == 0 and server.exit_status == 0:
        server.log.unlink(missing_ok=True)  # nothing went wrong: nothing to read there
    else:
        print(f"server log kept: {server.log}", file=sys.stderr)
    print(report(args, meta, results))
    if args.json:
        document = {"command": sys.argv, "args": {k: str(v) for k, v in vars(args).items()}, "meta": meta}
        args.json.write_text(json.dumps(document | {"results": results}, indent=1, default=str))
    return status


if __name__ == "__main__":
    sys.exit(main())
