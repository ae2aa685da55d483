"""The `auto` planner's cost model against measured steps, mode by mode, on the engine the server builds.

The embedded pair's engine (the same settings `autojudge-serve --num-speculative-tokens auto` parses) decodes GSM8K
test questions in the judge's prompt format, `--rows` of them at once, closed loop (a finished row is replaced by
the next question at once), synchronously in this process, for `--steps` steps per mode. Each step's measured time
(the step less its prefill and planning, as the server's metrics take it) is compared with the cost model's
prediction. Steps are grouped by kind (plain, the deepest window, and whether a drafting row had to catch up
first); per mode and kind the table prints the steps, the median measured and predicted ms, and the median and
spread of measured / predicted, plus the tokens the mode emitted per second of whole steps (admissions
included). Fixed windows are costed by the planner like auto rows, so they check the model where it would not go.

`PYTHONPATH=. .venv/bin/python benchmarks/cost_check.py --rows 1,4 --windows 2,4 --steps 120`
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field

from engine import Request, SamplingParams, build_engine
from engine.build import LoadedEngine
from engine.types import SpecParams, StepStats
from server.profiles import ProfileTable
from server.settings import load_settings
from server.text import encode_chat
from training.argtypes import positive, positive_list
from training.data import load_problems


@dataclass(slots=True)
class Tally:
    """Per step kind: measured and predicted seconds."""

    measured: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    predicted: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    tokens: int = 0
    seconds: float = 0.0


def kind(stats: StepStats) -> str:
    """plain, W=<deepest window>, and "+catch-up" when a catch-up forward read a drafting row's lagging draft
    cache first (a new request's deferred draft prefill, or the tokens it emitted while not drafting)."""
    if not any(stats.windows):
        return "plain"
    return f"W={max(stats.windows)}" + (" +catch-up" if stats.caught_up else "")


def run_mode(
    loaded: LoadedEngine, spec: SpecParams, rows: int, steps: int, prompts: list[list[int]], max_tokens: int
) -> Tally:
    engine = loaded.client._engine  # synchronous: this script is the only caller
    tally = Tally()
    collected: list[StepStats] = []
    engine.on_step = collected.append
    nxt = 0

    def submit() -> None:
        nonlocal nxt
        ids = prompts[nxt % len(prompts)]
        engine.add_request(Request(f"r{nxt}", tuple(ids), SamplingParams(max_tokens=max_tokens, temperature=0.0), spec))
        nxt += 1

    for _ in range(rows):
        submit()
    for _ in range(steps):
        t0 = time.perf_counter()
        outs = engine.step()
        tally.seconds += time.perf_counter() - t0
        for out in outs:
            if out.finished:
                submit()
    for stats in collected:
        tally.tokens += stats.num_generated_tokens
        if stats.predicted_seconds and stats.num_prefill_tokens == 0:
            measured = stats.seconds_step - stats.seconds_prefill - stats.seconds_plan  # as the server's metrics
            k = kind(stats)
            tally.measured[k].append(measured)
            tally.predicted[k].append(stats.predicted_seconds)
    for s in [*engine.scheduler.running, *engine.scheduler.waiting]:  # release every slot before the next mode
        engine.abort(s.request_id)
    engine.on_step = None
    return tally


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=positive_list, default=[1, 4], help="rows decoded at once (comma list)")
    p.add_argument("--windows", type=positive_list, default=[2, 4], help="fixed windows beside auto (comma list)")
    p.add_argument("--steps", type=positive, default=120, help="engine steps per mode")
    p.add_argument("--max-tokens", type=positive, default=128)
    args = p.parse_args()
    settings = load_settings(["--max-slots", "16", "--threads", "2", "--num-speculative-tokens", "auto"], {})
    loaded = build_engine(settings.model_source(), settings.engine_config())
    print(loaded.summary)
    table = ProfileTable.from_info(loaded.info, settings.default_profile)
    problems = load_problems("gsm8k-test")[:64]
    prompts = [encode_chat(loaded.tokenizer, [{"role": "user", "content": q.user_turn}]) for q in problems]
    modes: list[tuple[str, str, int | None, str | None]] = [("no-spec", "lossless", 0, None)]
    for profile in ("lossless", "math"):
        modes += [(f"{profile} K={k}", profile, k, "fixed") for k in args.windows]
        modes.append((f"{profile} auto", profile, None, "auto"))
    print("| rows | mode | kind | steps | measured ms | predicted ms | measured / predicted (p10-p90) | tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for rows in args.rows:
        for name, profile, width, window in modes:
            spec = table.resolve(profile, None, width, None, window).spec
            t = run_mode(loaded, spec, rows, args.steps, prompts, args.max_tokens)
            rate = t.tokens / t.seconds if t.seconds else 0.0
            for k in sorted(t.measured):
                ratios = sorted(m / q for m, q in zip(t.measured[k], t.predicted[k], strict=True))
                deciles = statistics.quantiles(ratios, n=10) if len(ratios) > 1 else ratios * 9
                print(
                    f"| {rows} | {name} | {k} | {len(ratios)} | {1000 * statistics.median(t.measured[k]):.1f} | "
                    f"{1000 * statistics.median(t.predicted[k]):.1f} | {statistics.median(ratios):.2f} "
                    f"({deciles[0]:.2f}-{deciles[-1]:.2f}) | {rate:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
