"""The report of a run: one JSON document (configuration, throughput, latency, errors, acceptance, every request),
rendered as markdown tables and as a short summary for stdout, and written where --out-json / --out-md say."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest import stats
from loadtest.config import LoadConfig, LoadTestError
from loadtest.result import RequestResult

Json = dict[str, Any]
LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E"))
PERCENTILES = "linear interpolation between closest ranks (numpy's default)"


@dataclass(frozen=True)
class Run:
    """What a session measured."""

    cfg: LoadConfig
    model: str
    server_version: Json | None  # GET /version, when the server has one
    started_at: str  # ISO 8601, UTC
    num_prompts: int
    start: float  # time.perf_counter() when the measured requests began
    wall: float  # seconds from then until the last one ended or was cancelled
    warmup: Sequence[RequestResult]
    results: Sequence[RequestResult]


def build(run: Run) -> Json:
    cfg = run.cfg
    return {
        "config": cfg.record(),
        "run": {
            "base_url": cfg.root_url,
            "model": run.model,
            "server_version": run.server_version,
            "started_at": run.started_at,
            "wall_s": run.wall,
            "load": load_text(cfg),
            "num_prompts": run.num_prompts,
            "warmup_requests": len(run.warmup),
            "warmup_failed": sum(not r.ok for r in run.warmup),
            "percentiles": PERCENTILES,
        },
        "requests": stats.counts(run.results),
        "throughput": stats.throughput(run.results, run.wall),
        "goodput": stats.goodput(run.results, run.wall, cfg.slos()),
        "latency_s": stats.latency(run.results),
        "errors": stats.errors(run.results),
        "acceptance": stats.acceptance(run.results),
        "per_request": [request_row(r, run.start) for r in sorted(run.results, key=lambda r: r.index)],
    }


def load_text(cfg: LoadConfig) -> str:
    if cfg.rate is None:
        return f"closed loop, {cfg.concurrency} user{'s' if cfg.concurrency != 1 else ''}"
    cap = f", at most {cfg.max_concurrency} in flight" if cfg.max_concurrency is not None else ""
    return f"open loop, Poisson arrivals at {cfg.rate:g} requests/s (seed {cfg.seed}){cap}"


def request_row(r: RequestResult, start: float) -> Json:
    return {
        "index": r.index,
        "error": r.error,
        "message": r.message,
        "start_s": r.start - start,
        "ttft_s": r.ttft,
        "tpot_s": r.tpot,
        "e2e_s": r.e2e,
        "chunks": r.chunks,
        "prompt_tokens": r.prompt_tokens,
        "output_tokens": r.output_tokens,
        "output_tokens_source": r.output_tokens_source,
        "metrics": r.metrics,
    }


# --- rendering -------------------------------------------------------------------------------------------------


def ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1000:.1f}"


def num(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def cell(x: object) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def workload(report: Json) -> str:
    c = report["config"]
    source = f"file {c['prompts_file']}" if c["prompts_file"] else c["prompts"]
    extensions = [
        f"{k} {c[k]}"
        for k in ("task_profile", "judge_threshold", "num_speculative_tokens", "speculative_window")
        if c.get(k) is not None
    ]
    return ", ".join([
        c["endpoint"], "streaming" if c["stream"] else "not streaming", f"max_tokens {c['max_tokens']}",
        f"temperature {c['temperature']:g}", f"seed {c['seed']}", f"prompts {source} ({report['run']['num_prompts']})",
        *extensions,
    ])  # fmt: skip


def markdown(report: Json) -> str:
    run, req, tp, acc = report["run"], report["requests"], report["throughput"], report["acceptance"]
    sources = ", ".join(f"{k} {n}" for k, n in req["output_tokens_from"].items()) or "n/a"
    lines = ["# Load test", ""]
    lines += table(["", ""], [
        ["server", run["base_url"]], ["model", run["model"]],
        ["server version", json.dumps(run["server_version"]) if run["server_version"] else "n/a"],
        ["started", run["started_at"]], ["wall time", f"{run['wall_s']:.2f} s"], ["load", run["load"]],
        ["workload", workload(report)],
        ["requests", f"{req['total']} measured ({req['ok']} ok, {req['failed']} failed of which {req['cancelled']} "
                     f"cancelled), {run['warmup_requests']} warm-up ({run['warmup_failed']} failed)"],
        ["output tokens from", sources],
    ])  # fmt: skip
    lines += ["", "## Throughput", ""]
    lines += table(
        ["requests/s", "output tok/s", "input tok/s", "total tok/s", "output tokens", "input tokens"],
        [[num(tp["requests_per_s"]), num(tp["output_tokens_per_s"]), num(tp["input_tokens_per_s"]),
          num(tp["total_tokens_per_s"]), tp["output_tokens"], tp["input_tokens"]]],
    )  # fmt: skip
    if (good := report["goodput"]) is not None:
        slo = ", ".join(f"{k.upper()} <= {v:g} ms" for k, v in good["slo_ms"].items())
        lines += ["", f"Goodput ({slo}): {good['requests']} requests, {num(good['requests_per_s'])} requests/s, "
                      f"{num(good['share_of_requests'], '.1%')} of the measured requests."]  # fmt: skip
    lines += ["", "## Latency (ms, successful requests)", ""]
    rows = []
    for key, label in LATENCIES:
        d = report["latency_s"][key]
        rows.append([label, d["n"], ms(d["mean"]), ms(d["p50"]), ms(d["p90"]), ms(d["p99"])])
    lines += table(["metric", "n", "mean", "p50", "p90", "p99"], rows)
    lines += ["", f"Percentiles: {run['percentiles']}.", "", "## Errors", ""]
    errors = report["errors"]
    if errors["by_kind"]:
        lines += table(["kind", "count", "first message"],
                       [[k, n, errors["examples"][k]] for k, n in errors["by_kind"].items()])  # fmt: skip
    else:
        lines.append("None.")
    lines += ["", "## Speculative decoding (reported by the server)", ""]
    if acc is None:
        lines.append("The server returned no per-request `metrics`.")
    else:
        lines += table(["quantity", "value"], [
            ["requests with metrics / speculating / with judge",
             f"{acc['requests_with_metrics']} / {acc['requests_speculating']} / {acc['requests_with_judge']}"],
            ["spec steps", acc["num_spec_steps"]], ["draft tokens", acc["num_draft_tokens"]],
            ["accepted draft tokens", acc["num_accepted_draft_tokens"]],
            ["draft acceptance rate", num(acc["draft_acceptance_rate"], ".3f")],
            ["mean acceptance length", num(acc["mean_acceptance_length"])],
            ["mean tokens per cycle", num(acc["mean_tokens_per_cycle"])],
            ["judged mismatches", acc["num_judged"]], ["judge-accepted tokens", acc["num_judge_accepted_tokens"]],
            ["recovered / bonus tokens", f"{acc['num_recovered_tokens']} / {acc['num_bonus_tokens']}"],
            ["lossy fraction (of output tokens)", num(acc["lossy_fraction"], ".4f")],
            ["mean lossy fraction (per request)", num(acc["mean_request_lossy_fraction"], ".4f")],
            ["task profiles", ", ".join(f"{k} {n}" for k, n in acc["task_profiles"].items()) or "n/a"],
        ])  # fmt: skip
    lines += ["", "## Configuration", ""]
    lines += table(["setting", "value"], [[k, "" if v is None else v] for k, v in report["config"].items()])
    return "\n".join(lines) + "\n"


def summary(report: Json) -> str:
    run, req, tp, acc = report["run"], report["requests"], report["throughput"], report["acceptance"]
    errors = ", ".join(f"{k} {n}" for k, n in report["errors"]["by_kind"].items())
    lines = [
        f"{req['total']} requests to {run['model']} at {run['base_url']} in {run['wall_s']:.2f} s ({run['load']}): "
        f"{req['ok']} ok, {req['failed']} failed" + (f" ({errors})" if errors else ""),
        f"throughput: {num(tp['requests_per_s'])} req/s, {num(tp['output_tokens_per_s'], '.1f')} output tok/s, "
        f"{num(tp['input_tokens_per_s'], '.1f')} input tok/s",
    ]
    if (good := report["goodput"]) is not None:
        lines.append(f"goodput: {good['requests']} requests meeting the SLOs, {num(good['requests_per_s'])} req/s")
    for key, label in LATENCIES:
        d = report["latency_s"][key]
        lines.append(f"{label + ' ms':8} mean {ms(d['mean']):>8}  p50 {ms(d['p50']):>8}  p90 {ms(d['p90']):>8}  "
                     f"p99 {ms(d['p99']):>8}  (n {d['n']})")  # fmt: skip
    if acc is not None:
        lines.append(
            f"acceptance: {num(acc['draft_acceptance_rate'], '.3f')} of {acc['num_draft_tokens']} draft tokens, "
            f"mean acceptance length {num(acc['mean_acceptance_length'])}, tokens/cycle "
            f"{num(acc['mean_tokens_per_cycle'])}, lossy fraction {num(acc['lossy_fraction'], '.4f')}"
        )
    return "\n".join(lines)


def write(report: Json, json_path: Path | None, md_path: Path | None) -> None:
    for path, text in ((json_path, json.dumps(report, indent=1) + "\n"), (md_path, markdown(report))):
        if path is None:
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError as e:
            raise LoadTestError(f"cannot write {path}: {e}") from e
