"""Estimated wall-clock speed-up of a draft/target pair on a device, from an evaluation's tokens per cycle.

The models are built from the pair's `config.json` files (benchmarks/shapes/<pair>/) with random weights: a
forward's time depends on the shapes, not the values, so the weights need not travel to the device. The engine's
own start-up profiler times them there (the target's forward over 1 + W tokens per row with its logits, the draft's
one-token steps), at the row counts and windows asked for. Each method of an evaluation (`results.json` of
`autojudge-train evaluate` or `pool`: tokens per cycle at W = 8, 16, 32, replayed with the real weights) then turns
into tokens per second against target-only decoding at the same batch, with the engine's step-cost formula
(`engine.spec.planner.step_seconds`: W draft steps, then one verify):

    speed-up(b, W) = tokens_per_cycle(W) x target(b, 1) / (sum over depths of draft(b, 1) + target(b, 1 + W))

An estimate: it assumes every row of a batch accepts like the evaluation's average, and leaves out the judge (a
dot product per mismatch) and the engine's bookkeeping between forwards. From the repository root:

    PYTHONPATH=. python benchmarks/pair_speedup_estimate.py --results runs/qwen-coder/eval/code-crossfit/results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig
from engine.model.decoder import Decoder
from engine.spec.cost import StepCost
from engine.spec.planner import Row, step_seconds
from engine.spec.profiler import device_name, profile_step_cost
from training.argtypes import positive_list

SHAPES = Path(__file__).parent / "shapes"
WINDOWS = (8, 16, 32)  # the windows an evaluation replays
Json = dict[str, Any]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=Path, default=SHAPES / "qwen-coder", help="folder of target.json, draft.json")
    p.add_argument("--results", type=Path, required=True, help="an evaluation's results.json")
    p.add_argument("--rows", type=positive_list, default=[1, 4, 16], help="batch sizes")
    p.add_argument("--windows", type=positive_list, default=list(WINDOWS), help="of 8, 16, 32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--out", type=Path, help="also write the profile and the table as JSON here")
    args = p.parse_args(argv)
    if bad := [w for w in args.windows if w not in WINDOWS]:
        p.error(f"--windows: an evaluation replays W in {WINDOWS}, not {bad}")
    if not args.results.is_file():
        p.error(f"--results: no file {args.results}")
    if missing := [n for n in ("target", "draft") if not (args.shapes / f"{n}.json").is_file()]:
        p.error(f"--shapes: {args.shapes} lacks {', '.join(f'{n}.json' for n in missing)}")
    return args


def random_model(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int) -> Decoder:
    """Random weights of `config`'s shapes, built on the device (a 1.5B model never exists on the host)."""
    torch.manual_seed(seed)
    with device:
        model = Decoder(config)
    return model.to(dtype).eval()


def speedup(cost: StepCost, rows: int, window: int, tokens_per_cycle: float) -> float:
    """Tokens per second of speculation with `window` over target-only decoding, both at `rows` rows."""
    row = Row(alpha=0.0, cap=window, catch_up=0)  # alpha does not enter the step's cost
    cycle = step_seconds(cost, [window] * rows, [row] * rows)
    return tokens_per_cycle * cost.target(rows, 1) / cycle


def estimate(cost: StepCost, methods: list[Json], rows: list[int], windows: list[int]) -> list[Json]:
    """One line per method, rows and window: its tokens per cycle, speed-up over target-only and over lossless."""
    lossless = next((m for m in methods if m["method"] == "lossless"), None)
    out = []
    for m in methods:
        for w in windows:
            tpc = m.get(f"tokens_per_cycle_w{w}")
            if tpc is None:
                continue
            for b in rows:
                up = speedup(cost, b, w, tpc)
                base = speedup(cost, b, w, lossless[f"tokens_per_cycle_w{w}"]) if lossless else None
                out.append({"label": m["label"], "method": m["method"], "rows": b, "window": w,
                            "tokens_per_cycle": tpc, "accuracy_drop_points": m.get("accuracy_drop_points"),
                            "agreement": m.get("agreement"), "speedup": up,
                            "x_lossless": None if base is None else up / base})  # fmt: skip
    return out


def render(cost: StepCost, lines: list[Json], where: str) -> str:
    rows = sorted({x["rows"] for x in lines})
    windows = sorted({x["window"] for x in lines})
    head = [f"Step times on {where} (ms, fastest of the profiler's repeats, after {cost.context} cached tokens):", ""]
    head += ["| rows | target 1 tok | " + " | ".join(f"verify W={w}" for w in windows) + " | draft step |"]
    head += ["|---|---|" + "---|" * len(windows) + "---|"]
    for b in rows:
        verify = " | ".join(f"{1000 * cost.target(b, w + 1):.1f}" for w in windows)
        head.append(f"| {b} | {1000 * cost.target(b, 1):.1f} | {verify} | {1000 * cost.draft(b, 1):.1f} |")
    cols = [f"b={b} W={w}" for w in windows for b in rows]
    table = ["", "Estimated speed-up over target-only decoding (x lossless in brackets):", ""]
    table += ["| method | drop (points) | agreement | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    by = {(x["label"], x["rows"], x["window"]): x for x in lines}
    for label in dict.fromkeys(x["label"] for x in lines):
        first = next(x for x in lines if x["label"] == label)
        cells = []
        for w in windows:
            for b in rows:
                x = by.get((label, b, w))
                ratio = "" if x is None or x["x_lossless"] is None else f" ({x['x_lossless']:.2f})"
                cells.append("" if x is None else f"{x['speedup']:.2f}{ratio}")
        drop, agree = first["accuracy_drop_points"], first["agreement"]
        drop_s = "" if drop is None else f"{drop:.1f}"
        agree_s = "" if agree is None else f"{agree:.3f}"
        table.append(f"| {label} | {drop_s} | {agree_s} | " + " | ".join(cells) + " |")
    return "\n".join(head + table) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    configs = {n: ModelConfig.from_hf(json.loads((args.shapes / f"{n}.json").read_text())) for n in ("target", "draft")}
    doc = json.loads(args.results.read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise SystemExit(f"pair_speedup_estimate: {args.results} is not an evaluation's results.json (no rows)")
    methods = doc["rows"]
    start = time.perf_counter()
    target = random_model(configs["target"], device, dtype, seed=0)
    draft = random_model(configs["draft"], device, dtype, seed=1)
    with torch.no_grad():
        cost = profile_step_cost(target, draft, device, max(args.rows), max(args.windows))
    seconds = time.perf_counter() - start
    where = f"{device_name(device)} ({device}, {args.dtype}, random weights of {args.shapes.name}'s shapes)"
    lines = estimate(cost, methods, args.rows, args.windows)
    print(render(cost, lines, where), end="")
    print(f"\nbuilt and profiled in {seconds:.0f} s", file=sys.stderr)
    if args.out:
        doc = {"device": where, "profile": cost.to_dict(), "estimates": lines, "results": str(args.results)}
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
