"""Load report: starts `autojudge-serve` on a model pair (`--pair`, the embedded one by default; 127.0.0.1, a free
port; `auto` windows) and drives it with the project's load generator (`loadtest`), closed loop, streaming chat,
greedy, the `--task`'s problems (GSM8K test questions or HumanEval tasks) in the judge's prompt format, at each
`--concurrency` level and in these modes:

- `no-spec`: `num_speculative_tokens: 0`, plain target decoding on the same engine (the speed reference);
- `lossless K=k` / `judge K=k`: the `lossless` profile (τ = 0) or the task's profile (`math` or `code`) at its
  head's default threshold or `--judge-threshold`, drafting exactly k tokens every cycle
  (`speculative_window: fixed`), for each k of `--windows`;
- `lossless auto` / `judge auto`: the same profiles with the planner choosing each row's window every step.

Cells run for `--duration` seconds each, in `--repeats` rounds; the mode order rotates between rounds so that drift
on a shared machine does not favour one mode. Writes `<out>.json` (every cell's loadtest report, per-request rows
without their metrics blocks) and `<out>.md` (setup, workload, throughput with speed-ups against `no-spec` in the
same round, latency, goodput, acceptance).

    .venv/bin/python benchmarks/load_report.py --out docs/load-report
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import torch

from engine.build import profile_specs
from engine.model.pair import PAIR_DTYPES, PAIRS
from loadtest.cli import run as run_load
from loadtest.config import LoadConfig
from server.settings import load_settings
from server_bench import Server
from training.argtypes import positive, positive_list, unit_float
from training.data import DEFAULT_GSM8K_DIR, load_problems

Json = dict[str, Any]
SERVER_ARGS = ["--threads", "2", "--log-level", "warning", "--num-speculative-tokens", "auto"]
SOURCES = {"math": ("gsm8k-test", "GSM8K test questions"), "code": ("humaneval-all", "HumanEval tasks")}
RESULTS = {"smollm2": "autojudge-results.md", "qwen-coder": "qwen-pair.md"}  # where each pair's curves are


def modes(windows: list[int], task: str, threshold: float | None) -> dict[str, Json]:
    """Mode name -> the request fields that make it; `judge` modes use the `task` profile."""
    judge: Json = {"task_profile": task} | ({} if threshold is None else {"judge_threshold": threshold})
    out: dict[str, Json] = {"no-spec": {"task_profile": "lossless", "num_speculative_tokens": 0}}
    for prefix, fields in (("lossless", {"task_profile": "lossless"}), ("judge", judge)):
        for k in windows:
            out[f"{prefix} K={k}"] = fields | {"num_speculative_tokens": k, "speculative_window": "fixed"}
        out[f"{prefix} auto"] = fields
    return out


def table_of(args: argparse.Namespace) -> dict[str, Json]:
    return modes(args.windows, args.task, args.judge_threshold)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", choices=PAIRS, default=PAIRS[0], help="the served model pair (its shipped heads)")
    p.add_argument("--task", choices=sorted(SOURCES), default="math", help="the judge profile and its prompts")
    p.add_argument("--judge-threshold", type=unit_float, help="τ of the judge modes (default: the head's own)")
    p.add_argument("--max-slots", type=positive, default=16, help="the server's KV slots")
    p.add_argument("--concurrency", type=positive_list, default=[1, 4, 16], help="closed-loop users per level (1,4)")
    p.add_argument("--windows", type=positive_list, default=[2, 4, 8], help="fixed windows measured beside auto (2,4)")
    p.add_argument("--modes", help="measure only these modes (comma list of names as in the table, e.g. "
                   "'lossless auto,judge auto'; no-spec is always measured); default: all")  # fmt: skip
    p.add_argument("--step-log", type=Path, help="the server's per-step JSON lines (its --step-log), for tuning")
    p.add_argument("--duration", type=float, default=40.0, help="seconds per cell")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all cells")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=64, help="problems of the task cycled through")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_GSM8K_DIR)
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=200.0)
    p.add_argument(
        "--reuse-prefix",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the server's prefix reuse; off, every TTFT is a full prefill, not what earlier cells left in the slots",
    )
    p.add_argument("--out", type=Path, default=Path("docs/load-report"), help="writes OUT.json and OUT.md")
    return p.parse_args(argv)


def machine() -> Json:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu,
        "cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit,
    }


async def one_cell(url: str, cfg: LoadConfig, prompts: list[Json]) -> Json:
    doc = await run_load(dataclasses.replace(cfg, base_url=url), prompts)
    for row in doc["per_request"]:
        row.pop("metrics", None)  # summed in doc["acceptance"]; the rows keep timings and counts
    return doc


def mode_names(args: argparse.Namespace, table: dict[str, Json]) -> list[str]:
    """The modes to measure: `--modes` (no-spec first, every ratio is to it), or all of `table`."""
    names = [m.strip() for m in args.modes.split(",")] if args.modes else list(table)
    if unknown := [m for m in names if m not in table]:
        raise SystemExit(f"load_report: unknown modes {unknown}; known: {', '.join(table)}")
    return list(dict.fromkeys(["no-spec", *names]))


def planned_profiles(server_args: list[str], environ: Mapping[str, str]) -> set[str]:
    """The profiles a server started with these flags will serve, given the AUTOJUDGE_* environment it inherits."""
    try:
        return {p.name for p in profile_specs(load_settings(server_args, environ).model_source())}
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"load_report: the server would not start: {e}") from e


def check_modes(args: argparse.Namespace, names: list[str], served: set[str]) -> None:
    """Refuse judge modes for a task the server does not serve a profile for."""
    if args.task not in served and any(m.startswith("judge") for m in names):
        raise SystemExit(f"load_report: the server has no {args.task!r} profile (it serves "
                         f"{', '.join(sorted(served))}); choose another --task, or leave the judge modes out with "
                         "--modes")  # fmt: skip


async def measure(args: argparse.Namespace, server: Server, prompts: list[Json]) -> tuple[Json, list[Json]]:
    levels = args.concurrency
    table = table_of(args)
    names = mode_names(args, table)
    cells: list[Json] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as http:
        await server.wait_ready(http, 600.0)
        version = (await http.get("/version")).json()
        profiles = (await http.get("/v1/profiles")).json()
    check_modes(args, names, {p["name"] for p in profiles["data"]})
    base = LoadConfig(endpoint="chat", max_tokens=args.max_tokens, duration=args.duration, grace=120.0,
                      slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, progress=False)  # fmt: skip
    # One untimed round at the top level first: allocator, caches and slots are warm for every measured cell.
    await one_cell(server.url, dataclasses.replace(base, concurrency=levels[-1], duration=10.0), prompts)
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for c in levels:
            for mode in order:
                cfg = dataclasses.replace(base, concurrency=c, seed=1000 * r + c, **table[mode])
                started, wall = time.perf_counter(), time.time()  # wall: to find the cell in a step log
                doc = await one_cell(server.url, cfg, prompts)
                cells.append({"round": r, "concurrency": c, "mode": mode, "report": doc, "wall": [wall, time.time()]})
                tp = doc["throughput"]["output_tokens_per_s"] or 0.0
                req, took = doc["requests"], time.perf_counter() - started
                print(f"round {r} c={c:<3} {mode:9} {tp:7.2f} out tok/s, {req['ok']} ok, {req['failed']} failed "
                      f"({took:.0f} s)", flush=True)  # fmt: skip
    async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as http:
        metrics = (await http.get("/metrics")).text  # the planner's own counters, summed over the whole run
    return {"version": version, "profiles": profiles, "planner": planner_totals(metrics)}, cells


def planner_totals(text: str) -> Json:
    """Engine time by phase, and the cost model's predicted and measured seconds, from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    phases: dict[str, float] = {}
    out: Json = {"phases": phases}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "autojudge_engine_phase_seconds_total":
                phases[s.labels["phase"]] = phases.get(s.labels["phase"], 0.0) + s.value
            elif s.name in (
                "autojudge_step_cost_predicted_seconds_total",
                "autojudge_step_cost_measured_seconds_total",
            ):
                out[s.name.removeprefix("autojudge_step_cost_").removesuffix("_seconds_total")] = s.value
            elif s.name == "autojudge_step_cost_error_ratio_bucket":
                out.setdefault("error_buckets", {})[s.labels["le"]] = s.value
            elif s.name == "autojudge_engine_steps_without_draft_total":
                out["steps_without_draft"] = s.value
            elif s.name == "autojudge_engine_draft_cuts_total":
                out["draft_cuts"] = s.value
            elif s.name == "autojudge_engine_step_seconds_count":
                out["steps"] = s.value
    return out


def spread(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def ms(xs: list[float | None]) -> str:
    vals = [x for x in xs if x is not None]
    return f"{1000 * statistics.mean(vals):.0f}" if vals else "n/a"


def render(args: argparse.Namespace, meta: Json, cells: list[Json]) -> str:
    levels = sorted({c["concurrency"] for c in cells})
    names = list(dict.fromkeys(c["mode"] for c in cells if c["round"] == 0))
    names = ["no-spec", *sorted((n for n in names if n != "no-spec"), key=lambda n: (n.split()[0], n))]
    by = {(c["round"], c["concurrency"], c["mode"]): c["report"] for c in cells}
    rounds = sorted({c["round"] for c in cells})
    heads = {p["name"]: p for p in meta["server"]["profiles"]["data"]}
    judge = heads.get(args.task)
    m = meta["machine"]
    fixed = args.windows

    def tput(r: int, c: int, mode: str) -> float:
        return float(by[(r, c, mode)]["throughput"]["output_tokens_per_s"] or 0.0)

    def ttft(r: int, c: int, mode: str) -> float:
        return float(by[(r, c, mode)]["latency_s"]["ttft"]["p50"] or 0.0)

    lines = [
        f"# Load report: auto speculation windows on the {args.pair} pair, this CPU",
        "",
        "Made by `benchmarks/load_report.py` (which starts the server and runs `loadtest` in-process):",
        "",
        "```sh",
        " ".join([".venv/bin/python benchmarks/load_report.py", *meta["argv"]]),
        "```",
        "",
        "## Setup",
        "",
        f"- **Machine:** {m['cpu']}, {m['cpus']} CPUs, no GPU; Python {m['python']}, torch {m['torch']}; "
        f"commit `{m['commit']}`. Load average (1 min) {meta['load_average'][0]:.2f} before the run and "
        f"{meta['load_average'][1]:.2f} after it.",
        f"- **Server:** `autojudge-serve {' '.join(meta['server_args'])}` ({PAIR_DTYPES[args.pair]}, max_model_len "
        f"2048, {args.max_slots} KV slots, window cap 8), target `{meta['server']['version']['model']}`, draft "
        f"`{meta['server']['version']['draft']}`.",
        f"- **Judge head** (`{args.task}` profile): " + head_line(judge, args.judge_threshold),
        "",
        "## Workload",
        "",
        f"- Closed loop at {', '.join(map(str, levels))} users; each cell runs {args.duration:g} s (requests in "
        "flight at the end are awaited and counted), "
        f"{len(rounds)} rounds, mode order rotated per round; one untimed 10 s round first.",
        f"- Streaming `/v1/chat/completions`, greedy (temperature 0), `max_tokens` {args.max_tokens}, EOS ends a "
        f"reply; the first {args.prompts} {SOURCES[args.task][1]} in the judge heads' prompt format "
        "(the user turn the heads were mined with), cycled in order.",
        "- Modes: **no-spec** (`num_speculative_tokens: 0`: target-only decoding through the same engine path), "
        f"**lossless / judge K=k** (`speculative_window: fixed`, k in {', '.join(map(str, fixed))}), "
        "**lossless / judge auto** (the planner picks each row's window every step, 0 included, up to 8).",
        f"- Goodput SLOs: TTFT <= {args.slo_ttft_ms:g} ms and TPOT <= {args.slo_tpot_ms:g} ms.",
        "",
        "## Throughput",
        "",
        "Mean ± standard deviation over the rounds. x no-spec: output tok/s over that of no-spec in the same round and "
        "at the same concurrency; x best fixed: an auto mode's output tok/s over the best fixed window of its profile "
        "in the same round; TTFT x no-spec: TTFT p50 over no-spec's.",
        "",
        "| users | mode | requests/s | output tok/s | x no-spec | x best fixed | TTFT p50 x no-spec | goodput req/s "
        "| errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in levels:
        for mode in names:
            docs = [by[(r, c, mode)] for r in rounds]
            tps = [tput(r, c, mode) for r in rounds]
            ups = [tput(r, c, mode) / tput(r, c, "no-spec") for r in rounds if tput(r, c, "no-spec") > 0]
            best = ""
            prefix = mode.split()[0]
            measured = [k for k in fixed if f"{prefix} K={k}" in names]  # --modes may leave fixed windows out
            if mode.endswith(" auto") and measured:
                ref = [max(tput(r, c, f"{prefix} K={k}") for k in measured) for r in rounds]
                best = spread([a / b for a, b in zip(tps, ref, strict=True) if b > 0])
            first = [ttft(r, c, mode) / ttft(r, c, "no-spec") for r in rounds if ttft(r, c, "no-spec") > 0]
            errors = sum(d["requests"]["failed"] for d in docs)
            lines.append(
                f"| {c} | {mode} | {spread([d['throughput']['requests_per_s'] or 0.0 for d in docs])} | "
                f"{spread(tps)} | {'1' if mode == 'no-spec' else spread(ups)} | {best} | "
                f"{'1' if mode == 'no-spec' else spread(first)} | "
                f"{spread([d['goodput']['requests_per_s'] or 0.0 for d in docs])} | {errors} |"
            )
    lines += ["", *pooled_ttft(cells, levels, names)]
    lines += [
        "",
        "## Latency (ms)",
        "",
        "Each percentile is computed per cell over its successful requests, then averaged over the rounds. ITL is "
        "the gap between content chunks; one chunk can carry several tokens, so ITL and TPOT differ under speculation.",
        "",
        "| users | mode | TTFT p50 | TTFT p90 | TTFT p99 | TPOT p50 | TPOT p90 | TPOT p99 | ITL p50 | ITL p99 "
        "| E2E p50 | E2E p90 | E2E p99 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in levels:
        for mode in names:
            lat = [by[(r, c, mode)]["latency_s"] for r in rounds]
            row = [ms([x[k][q] for x in lat]) for k, qs in
                   (("ttft", "p50 p90 p99"), ("tpot", "p50 p90 p99"), ("itl", "p50 p99"), ("e2e", "p50 p90 p99"))
                   for q in qs.split()]  # fmt: skip
            lines.append(f"| {c} | {mode} | " + " | ".join(row) + " |")
    lines += [
        "",
        "## Speculation, windows and lossiness (from the server's per-request metrics, summed per cell)",
        "",
        "| users | mode | draft acceptance rate | tokens per cycle | mean window | steps without drafting | lossy "
        "fraction | requests |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in levels:
        for mode in names[1:]:
            acc = [by[(r, c, mode)]["acceptance"] for r in rounds]
            acc = [a for a in acc if a is not None]

            def col(key: str, accs: list[Json] = acc) -> list[float]:
                return [a[key] for a in accs if a.get(key) is not None]

            lines.append(
                f"| {c} | {mode} | {spread(col('draft_acceptance_rate'))} | {spread(col('mean_tokens_per_cycle'))} | "
                f"{spread(col('mean_window'))} | {spread([100 * x for x in col('no_draft_step_fraction')])}% | "
                f"{spread([100 * x for x in col('lossy_fraction')])}% | "
                f"{sum(a['requests_with_metrics'] for a in acc)} |"
            )
    lines += ["", *planner_section(meta["server"]["planner"], meta["server"]["version"]["speculation"])]
    lines += [
        "",
        "Answer quality against τ (agreement with the target's own answers, accuracy) is measured offline by the "
        f"evaluation command on held-out problems: [{RESULTS[args.pair]}]({RESULTS[args.pair]}).",
        "",
        f"Raw reports of every cell: [{args.out.with_suffix('.json').name}]({args.out.with_suffix('.json').name}).",
    ]
    return "\n".join(lines) + "\n"


def head_line(judge: Json | None, threshold: float | None) -> str:
    if judge is None:
        return "none served; no judge mode measured."
    at = "that τ." if threshold is None else f"τ = {threshold:g} (`--judge-threshold`)."
    return (f"sha256 `{judge['head_sha256']}`, layout {judge['layout']}, default τ = {judge['judge_threshold']:.3f}; "
            f"the judge modes run at {at}")  # fmt: skip


def pooled_ttft(cells: list[Json], levels: list[int], names: list[str]) -> list[str]:
    """TTFT compared request by request: the i-th request of every cell of a round sends the same prompt, so each
    request of a mode is paired with no-spec's request of the same index, round and level (prompt length drives
    prefill time, and faster modes reach more prompts, so unpaired medians mix different prompts). Reports the
    median of the paired ratios, all rounds pooled, with a 95% bootstrap interval, and each side's median TTFT
    over the same pairs."""
    rng = random.Random(0)

    def ttfts(cell: Json) -> dict[int, float]:
        return {
            row["index"]: row["ttft_s"]
            for row in cell["report"]["per_request"]
            if row["error"] is None and row["ttft_s"] is not None
        }

    by = {(c["round"], c["concurrency"], c["mode"]): ttfts(c) for c in cells}

    def interval(xs: list[float]) -> tuple[float, float]:
        medians = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(2000))
        return medians[49], medians[1949]

    lines = [
        "## TTFT, request by request",
        "",
        "Each request's TTFT over that of no-spec's request with the same index (the same prompt) in the same round "
        "and level; median of those ratios over all rounds (n pairs) with a 95% bootstrap interval (2,000 "
        "resamples), and the median TTFT of each side over the same pairs.",
        "",
        "| users | mode | n pairs | TTFT median ms | no-spec median ms | paired ratio | 95% interval |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in levels:
        for mode in names[1:]:
            pairs = [
                (mine[i], base[i])
                for (r, level, m), mine in by.items()
                if level == c and m == mode
                for base in [by.get((r, c, "no-spec"), {})]
                for i in mine
                if i in base and base[i] > 0
            ]
            if not pairs:
                continue
            ratios = [a / b for a, b in pairs]
            lo, hi = interval(ratios)
            lines.append(
                f"| {c} | {mode} | {len(pairs)} | {1000 * statistics.median(a for a, _ in pairs):.0f} | "
                f"{1000 * statistics.median(b for _, b in pairs):.0f} | {statistics.median(ratios):.2f} | "
                f"{lo:.2f}-{hi:.2f} |"
            )
    return lines


def planner_section(totals: Json, speculation: Json) -> list[str]:
    """The planner's overhead and the cost model's error over the whole run (every mode: fixed windows are
    costed by the planner too), and the start-up profile it used."""
    phases = totals["phases"]
    step = sum(phases.values())
    buckets = {float(k): v for k, v in totals.get("error_buckets", {}).items()}
    count = buckets.get(float("inf"), 0.0)
    within = (buckets.get(1.1, 0.0) - buckets.get(0.9, 0.0)) / count if count else float("nan")
    ratio = totals.get("measured", 0.0) / totals["predicted"] if totals.get("predicted") else float("nan")
    cost = speculation["step_cost"]
    tokens = sorted(set(cost["target"]["tokens"]) | set(cost["draft"]["tokens"]))
    lines = [
        "## The planner and its cost model (server counters over the whole run)",
        "",
        f"- Planner time: {100 * phases.get('plan', 0.0) / step:.2f}% of engine step time "
        f"({phases.get('plan', 0.0):.1f} of {step:.0f} s).",
        f"- Cost model: measured / predicted step time (draft + verify + commit) {ratio:.3f} over "
        f"{count:.0f} steps; {100 * within:.0f}% of steps within ±10%.",
        f"- Steps without drafting: {totals.get('steps_without_draft', 0):.0f} of {totals.get('steps', 0):.0f}; "
        f"steps whose drafting an arriving request cut short: {totals.get('draft_cuts', 0):.0f}.",
        "",
        f"Start-up profile (ms per forward, after {cost['context']} cached tokens per row):",
        "",
        "| model | rows | " + " | ".join(f"{q} tok/row" for q in tokens) + " |",
        "|---|---|" + "---|" * len(tokens),
    ]
    for model in ("target", "draft"):
        table = cost[model]
        for b, row in zip(table["rows"], table["seconds"], strict=True):
            ms = dict(zip(table["tokens"], row, strict=True))  # the draft has catch-up columns the target lacks
            lines.append(f"| {model} | {b} | " + " | ".join(f"{1000 * ms[q]:.1f}" if q in ms else "" for q in tokens)
                         + " |")  # fmt: skip
    return lines


def portable(value: Any) -> Any:
    """`value` with this machine's absolute paths made relative to the checkout where they lie beside it (the data
    sets), else cut to their file name (a step log in a scratch folder): a report goes into the repository."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, str) and value.startswith("/") and Path(value).exists():  # not "/v1/..." nor text
        here = Path.cwd()
        return os.path.relpath(value, here) if Path(value).is_relative_to(here.parent) else Path(value).name
    return value


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    server_args = ["--pair", args.pair, "--max-slots", str(args.max_slots), *SERVER_ARGS]
    server_args += [] if args.reuse_prefix else ["--no-reuse-prefix"]
    server_args += ["--step-log", str(args.step_log)] if args.step_log else []
    check_modes(args, mode_names(args, table_of(args)), planned_profiles(server_args, os.environ))  # no server yet
    problems = load_problems(SOURCES[args.task][0], data_dir=args.data_dir)[: args.prompts]
    prompts = [{"messages": [{"role": "user", "content": p.user_turn}]} for p in problems]
    load_before = os.getloadavg()[0]
    server = Server(server_args)
    print(f"server log: {server.log}", file=sys.stderr)
    try:
        info, cells = asyncio.run(measure(args, server, prompts))
    finally:
        server.stop()
    meta: Json = {
        "argv": argv,
        "machine": machine(),
        "load_average": [load_before, os.getloadavg()[0]],
        "server": info,
        "server_args": server_args,
        "args": vars(args),
    }
    meta["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in meta["args"].items()}
    meta, cells = portable(meta), portable(cells)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(args, meta, cells))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
