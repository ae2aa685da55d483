"""Pure aggregation of request results: percentiles, latency distributions, throughput, errors by kind, and the
server's per-request acceptance statistics summed over the run."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from loadtest.result import RequestResult

Json = dict[str, Any]
QUANTILES = (0.5, 0.9, 0.99)
SPEC_COUNTS = ("num_spec_steps", "num_draft_tokens", "num_accepted_draft_tokens")
JUDGE_COUNTS = ("num_judged", "num_judge_accepted_tokens", "num_recovered_tokens", "num_bonus_tokens")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0 <= q <= 1) by linear interpolation between closest ranks (Hyndman and Fan's type 7,
    numpy's default): rank (n - 1) q of the sorted values. None when there are no values."""
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], not {q}")
    if not values:
        return None
    xs = sorted(values)
    rank = (len(xs) - 1) * q
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


@dataclass(frozen=True)
class Distribution:
    n: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None


def distribution(values: Sequence[float]) -> Distribution:
    mean = sum(values) / len(values) if values else None
    p50, p90, p99 = (percentile(values, q) for q in QUANTILES)
    return Distribution(len(values), mean, p50, p90, p99)


def latency(results: Sequence[RequestResult]) -> dict[str, Json]:
    """Seconds, over successful requests; ITL pools the gaps of every request (so long requests weigh more)."""
    ok = [r for r in results if r.ok]
    return {
        "ttft": asdict(distribution([r.ttft for r in ok if r.ttft is not None])),
        "tpot": asdict(distribution([t for r in ok if (t := r.tpot) is not None])),
        "itl": asdict(distribution([gap for r in ok for gap in r.itl])),
        "e2e": asdict(distribution([r.e2e for r in ok])),
    }


def throughput(results: Sequence[RequestResult], wall: float) -> Json:
    """Successful requests and their tokens per second of the run's wall time; tokens the server did not report
    (no usage) are left out of the sums."""
    ok = [r for r in results if r.ok]
    output = sum(r.output_tokens or 0 for r in ok)
    prompt = sum(r.prompt_tokens or 0 for r in ok)

    def per_s(x: float) -> float | None:
        return x / wall if wall > 0 else None

    return {
        "requests_per_s": per_s(len(ok)),
        "output_tokens_per_s": per_s(output),
        "input_tokens_per_s": per_s(prompt),
        "total_tokens_per_s": per_s(output + prompt),
        "output_tokens": output,
        "input_tokens": prompt,
    }


def goodput(results: Sequence[RequestResult], wall: float, slos: dict[str, float]) -> Json | None:
    """Successful requests meeting every SLO given (seconds; keys ttft, tpot, e2e), per second of wall time. A
    request without the measured quantity (TTFT of a non-streamed one, TPOT of a one-token one) does not meet it."""
    if not slos:
        return None

    def meets(r: RequestResult) -> bool:
        measured = {"ttft": r.ttft, "tpot": r.tpot, "e2e": r.e2e}
        return r.ok and all((v := measured[k]) is not None and v <= limit for k, limit in slos.items())

    good = sum(meets(r) for r in results)
    return {
        "slo_ms": {k: v * 1000 for k, v in slos.items()},
        "requests": good,
        "requests_per_s": good / wall if wall > 0 else None,
        "share_of_requests": good / len(results) if results else None,
    }


def counts(results: Sequence[RequestResult]) -> Json:
    ok = [r for r in results if r.ok]
    sources = Counter(r.output_tokens_source or "unknown" for r in ok)
    return {
        "total": len(results),
        "ok": len(ok),
        "failed": len(results) - len(ok),
        "cancelled": sum(r.error == "cancelled" for r in results),
        "output_tokens_from": dict(sorted(sources.items())),
    }


def errors(results: Sequence[RequestResult]) -> Json:
    """Failures by kind, most frequent first, with the first message of each kind."""
    by_kind = Counter(r.error for r in results if r.error is not None)
    examples: dict[str, str] = {}
    for r in results:
        if r.error is not None and r.error not in examples:
            examples[r.error] = r.message or ""
    return {"by_kind": dict(by_kind.most_common()), "examples": {k: examples[k] for k, _ in by_kind.most_common()}}


def acceptance(results: Sequence[RequestResult]) -> Json | None:
    """Sums of the server's `metrics.speculative_decoding` and `metrics.judge` counts over successful requests,
    and the run's ratios recomputed from the sums (not averaged per request); None when no request had metrics."""
    measured = [r for r in results if r.ok and r.metrics is not None]
    if not measured:
        return None
    sums: Counter[str] = Counter()
    speculating = judged = 0
    cycle_tokens = judged_output = 0.0
    lossy: list[float] = []
    profiles: Counter[str] = Counter()
    windows: Counter[int] = Counter()  # engine steps at each window W, from this server's window_histogram
    for r in measured:
        assert r.metrics is not None
        spec, judge = r.metrics.get("speculative_decoding"), r.metrics.get("judge")
        steps = 0
        if isinstance(spec, dict):
            speculating += 1
            sums.update({k: count(spec, k) for k in SPEC_COUNTS})
            steps = count(spec, "num_spec_steps")
            histogram = spec.get("window_histogram")
            if isinstance(histogram, list):
                windows.update({w: n for w, n in enumerate(histogram) if isinstance(n, int)})
        if isinstance(judge, dict):
            judged += 1
            sums.update({k: count(judge, k) for k in JUDGE_COUNTS})
            # mean_tokens_per_cycle x cycles gives back the tokens this request's cycles emitted.
            cycle_tokens += number(judge, "mean_tokens_per_cycle") * steps
            judged_output += r.output_tokens or 0
            lossy.append(number(judge, "lossy_fraction"))
            profiles[str(judge.get("task_profile"))] += 1
    steps, drafted, accepted = (sums[k] for k in SPEC_COUNTS)
    return {
        "requests_with_metrics": len(measured),
        "requests_speculating": speculating,
        "requests_with_judge": judged,
        **{k: sums[k] for k in (*SPEC_COUNTS, *JUDGE_COUNTS)},
        "draft_acceptance_rate": accepted / drafted if drafted else None,
        "mean_acceptance_length": 1 + accepted / steps if steps else None,
        "mean_tokens_per_cycle": cycle_tokens / steps if steps and judged else None,
        "lossy_fraction": sums["num_judge_accepted_tokens"] / judged_output if judged_output else None,
        "mean_request_lossy_fraction": sum(lossy) / len(lossy) if lossy else None,
        "task_profiles": dict(sorted(profiles.items())),
        "mean_window": sum(w * n for w, n in windows.items()) / total if (total := sum(windows.values())) else None,
        "no_draft_step_fraction": windows[0] / total if total else None,
    }


def count(block: Json, key: str) -> int:
    value = block.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def number(block: Json, key: str) -> float:
    value = block.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
