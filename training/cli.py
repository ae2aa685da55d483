"""`autojudge-train`: the training pipeline's commands (mine, features, fit, evaluate); its composition root."""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engine.flags import add_pair_flags
from engine.model.decoder import Decoder
from engine.model.fingerprint import pair_fingerprint
from engine.model.loader import LoadedModel, eos_token_ids, sha256_file, tokenizer_fingerprint
from engine.model.pair import draft_name, load_pair
from judge.features import LAYOUTS
from judge.io import TENSORS, load_head, pair_difference, save_head
from training.argtypes import count, positive
from training.crossfit import (
    DEFAULT,
    PROBLEMS,
    SAME_SETUP,
    Point,
    check_runs,
    judge_rates,
    pool,
    problem_records,
    rates_of,
    read_run,
)
from training.data import DEFAULT_GSM8K_DIR, SOURCES, Problem, load_problems, prompt_token_ids
from training.evaluate import ProblemResult, markdown_table, score_traces, summarise, write_reports
from training.features import collect_features, load_features, read_labels, save_features, without_prompts
from training.folds import Fold, parse_fold
from training.goals import Goal, statements
from training.interrupt import Stopped, drain_on_signal
from training.labelpack import read_packed, unpack_all, write_packed
from training.mine import MineConfig, Miner, label_summary, mine_to_file, read_done
from training.replay import Job, LockstepDecoder, Method
from training.tasks import is_correct, outcome
from training.tracelog import TRACES, decode_with_log, write_baselines
from training.train_judge import FitConfig, fit_head

ORACLE_VERSION = {"math": "gsm8k_cot_llama-strict-then-flexible/1", "code": "last-two-fences+check/1"}


def fold_arg(text: str) -> Fold:
    try:
        return parse_fold(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_problem_flags(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--source", choices=SOURCES, default=default)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_GSM8K_DIR, help="folder of GSM8K train/test.jsonl")
    p.add_argument("--offset", type=count, default=0, help="skip this many problems (file order)")
    p.add_argument("--limit", type=count, default=0, help="at most this many problems (0: all)")
    p.add_argument("--size", type=positive, default=1000, help="gsm-symbolic: problems to generate")
    p.add_argument("--seed", type=int, default=0, help="gsm-symbolic: generator seed")


def load_models(args: argparse.Namespace) -> tuple[LoadedModel, Decoder]:
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    target, draft = load_pair(
        pair=args.pair,
        target=args.target,
        draft=args.draft,
        dtype=args.dtype,  # the served precision ("auto": the pair's): labels, features and curves follow it
        device=torch.device(args.device),
        cache_dir=args.cache_dir,
        quantize=args.quantize,
    )
    if draft is None:
        raise ValueError("mining and evaluation need a draft model (--draft none is not allowed here)")
    name = draft_name(args.pair, args.target, args.draft)
    print(f"loaded {target.source} + draft {name} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
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
    add_pair_flags(p)
    add_problem_flags(p, "gsm8k-train")
    p.add_argument("--out", type=Path, required=True, help="label file (JSON lines); resumed when it exists")
    p.add_argument("--max-new-tokens", type=positive, default=512, help="response budget per rollout")
    p.add_argument("--concurrency", type=positive, default=32, help="prompts searched at once")
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
    with drain_on_signal(miner, "searches") as caught:
        totals = mine_to_file(miner, prompts, args.out, meta)
    hours = totals["seconds"] / 3600
    print(
        f"mined {int(totals['prompts'])} prompts in {totals['seconds']:.0f} s: {int(totals['labels'])} labels, "
        f"{totals['important'] / max(totals['labels'], 1):.1%} important, "
        f"{totals['labels'] / max(hours, 1e-9):.0f} labels/hour, {int(totals['rollouts'])} target rollouts, "
        f"{int(totals['dropped'])} prompts dropped (target answer did not parse, or for "
        f"{int(totals['failed'])} of them its logits were not finite) -> {args.out}",
        file=sys.stderr,
    )
    if caught and totals["left"]:
        print(f"stopped by a signal with {int(totals['left'])} prompts left; the same command resumes", file=sys.stderr)
        return 128 + caught[0]
    return 0


def labels(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="autojudge-train labels", description="Summarise label files.")
    p.add_argument("files", type=Path, nargs="+", help="label files (JSON lines)")
    args = p.parse_args(argv)
    for path in args.files:
        if not path.is_file():
            raise FileNotFoundError(f"label file {path} does not exist")
        summary = label_summary(read_done(path)[0])
        print(
            f"{path}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
        )
    return 0


def pack_labels(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="autojudge-train pack-labels", description="Write a label file without its prompts (gzipped)."
    )
    p.add_argument("labels", type=Path, help="label file (JSON lines)")
    p.add_argument("--out", type=Path, required=True, help="packed file (.jsonl.gz)")
    args = p.parse_args(argv)
    if not args.labels.is_file():
        raise FileNotFoundError(f"label file {args.labels} does not exist")
    n = write_packed(args.out, read_done(args.labels)[0])
    print(f"packed {n} records -> {args.out}", file=sys.stderr)
    return 0


def unpack_labels(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="autojudge-train unpack-labels",
        description="Restore a packed label file's prompts from the problems they name (mining then resumes it).",
    )
    p.add_argument("packed", type=Path, help="packed file (.jsonl.gz)")
    p.add_argument("--out", type=Path, required=True, help="label file to write (must not exist)")
    add_pair_flags(p)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_GSM8K_DIR, help="folder of GSM8K train/test.jsonl")
    args = p.parse_args(argv)
    if args.out.exists():
        raise ValueError(f"{args.out} exists; unpack into a new file")
    packed = read_packed(args.packed)
    sources = {r["meta"]["source"] for r in packed}
    problems = {prob.prompt_id: prob for s in sorted(sources) for prob in load_problems(s, data_dir=args.data_dir)}
    target, _ = load_pair(
        pair=args.pair,
        target=args.target,
        draft="none",
        dtype=args.dtype,
        device=torch.device("cpu"),
        cache_dir=args.cache_dir,
    )  # only its tokenizer is used, so no quantized copy

    def prompt_of(prompt_id: str) -> list[int] | None:
        prob = problems.get(prompt_id)
        return None if prob is None else prompt_token_ids(target.tokenizer, prob)

    records = unpack_all(packed, prompt_of)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    print(f"unpacked {len(records)} records -> {args.out}", file=sys.stderr)
    return 0


# --- features ------------------------------------------------------------------------------------------
def features(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="autojudge-train features", description="DD and DT states of mined mismatches.")
    add_pair_flags(p)
    p.add_argument("--labels", type=Path, action="append", required=True, help="label file (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="features file (.safetensors, with a .json beside it)")
    p.add_argument("--group", type=positive, default=8, help="records per forward")
    args = p.parse_args(argv)
    for path in args.labels:
        if not path.is_file():
            raise FileNotFoundError(f"label file {path} does not exist")
    records = read_labels(args.labels)
    if not records:
        raise ValueError("the label files hold no usable prompts")
    target, draft = load_models(args)
    pair = fingerprint(target, draft)
    if records[0]["meta"]["pair"] != pair:
        difference = pair_difference(records[0]["meta"]["pair"], pair)
        raise ValueError(f"the labels were mined with another model pair: {difference}")
    start = time.perf_counter()
    fs = collect_features(records, target.model, draft, args.group)
    fs.meta["labels"] = [{"path": str(path), "sha256": sha256_file(path)} for path in args.labels]
    save_features(fs, args.out)
    print(
        f"{len(fs.labels)} mismatches from {len(fs.prompt_ids)} prompts ({float(fs.labels.float().mean()):.1%} "
        f"important) in {time.perf_counter() - start:.0f} s -> {args.out}",
        file=sys.stderr,
    )
    return 0


# --- fit ------------------------------------------------------------------------------------------------
def fit(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="autojudge-train fit", description="Fit a judge head on mined features.")
    p.add_argument("--features", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="head directory (head.safetensors + head.json)")
    p.add_argument("--layout", choices=LAYOUTS, default="DT", help="DT: target only (no extra draft forward)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split by prompt")
    p.add_argument("--max-iter", type=positive, default=1000)
    p.add_argument("--default-recall", type=float, default=0.9)
    p.add_argument("--refit-all", action="store_true", help="refit on all prompts once C is chosen")
    p.add_argument(
        "--folds", type=int, default=0, help="K-fold cross-validation by prompt instead of one 10%% part (refits all)"
    )
    p.add_argument("--exclude-fold", type=fold_arg, help="F/K: fit without the problems of fold F (cross-fitting)")
    args = p.parse_args(argv)
    if not 0.0 < args.default_recall <= 1.0:
        raise ValueError("--default-recall must be in (0, 1]")
    fs = load_features(args.features)
    if args.exclude_fold is not None:
        fs = without_prompts(fs, args.exclude_fold.holds)
    config = FitConfig(
        layout=args.layout,
        seed=args.seed,
        max_iter=args.max_iter,
        default_recall=args.default_recall,
        refit_all=args.refit_all,
        folds=args.folds,
    )
    provenance = {
        "features": {"path": str(args.features), "sha256": sha256_file(args.features)},
        "labels": fs.meta.get("labels", []),
        "command": "autojudge-train fit " + " ".join(argv),
        "excluded_fold": None if args.exclude_fold is None else str(args.exclude_fold),
    }
    head, report = fit_head(fs, config, provenance)
    save_head(head, args.out)
    c = report["counts"]
    print(
        f"{args.layout} head: C={report['C']:.2g}, validation AUC {report['val_auc']:.3f} (train "
        f"{report['train_auc']:.3f}); {c['train_mismatches']} / {c['val_mismatches']} train / validation mismatches "
        f"from {c['train_prompts']} / {c['val_prompts']} prompts ({report['split']['rule']}); default threshold "
        f"{report['default_threshold']:.3g} -> {args.out}",
        file=sys.stderr,
    )
    for row in report["thresholds"]:
        print(
            f"  q={row['quantile']:.2f} tau={row['threshold']:.4g} accept={row['accept_fraction']:.3f} "
            f"recall_important={row['recall_important']:.3f}",
            file=sys.stderr,
        )
    return 0


# --- evaluate -------------------------------------------------------------------------------------------
def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def check_held_out(head_meta: dict[str, Any], fold: Fold, where: Path) -> None:
    """The head that judges fold F must have been fitted without it (no problem's own labels judge it)."""
    excluded = head_meta.get("provenance", {}).get("excluded_fold")
    if excluded != str(fold):
        raise ValueError(
            f"--fold {fold} needs a head fitted with --exclude-fold {fold}; {where} excluded "
            f"{excluded or 'no fold'}, so it may have seen these problems' labels"
        )


def evaluate(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="autojudge-train evaluate", description="Sweep judge thresholds and baselines on held-out problems."
    )
    add_pair_flags(p)
    add_problem_flags(p, "gsm8k-test")
    p.add_argument("--head", type=Path, help="judge head directory (none: baselines only)")
    p.add_argument("--quantiles", default="0,4,8,10,12,14,16,18,20,22,24", help="head threshold indices (0..25)")
    p.add_argument("--thresholds", default="", help="explicit τ values instead of --quantiles")
    p.add_argument("--topk", default="2,3,5,10", help="top-K baseline values")
    p.add_argument("--prob", default="0.5,0.2,0.1,0.05", help="target-probability thresholds ε")
    p.add_argument("--kl", default="0.01,0.03,0.1,0.3", help="KL bounds (nats), used for both directions")
    p.add_argument("--no-random", action="store_true", help="skip random acceptance at the judge's rates")
    p.add_argument("--random", default="", help="random acceptance at these rates ρ too")
    p.add_argument(
        "--random-from", type=Path, help="random acceptance at the AutoJudge rates of this report (the pooled curve)"
    )
    p.add_argument("--windows", default="8,16,32", help="windows W to count cycles for")
    p.add_argument("--max-new-tokens", type=positive, default=512)
    p.add_argument("--slots", type=positive, default=48, help="sequences decoded at once")
    p.add_argument("--out", type=Path, required=True, help="report directory")
    p.add_argument("--fold", type=fold_arg, help="F/K: only the problems of fold F (the head fitted without it)")
    args = p.parse_args(argv)
    windows = tuple(sorted(int(w) for w in floats(args.windows)))
    if not windows or min(windows) < 1:
        raise ValueError("--windows must list positive integers")
    problems = select_problems(args)
    if args.fold is not None:
        problems = [prob for prob in problems if args.fold.holds(prob.prompt_id)]
    if not problems:
        raise ValueError("no problems selected (check --offset, --limit and --fold)")
    if args.head and args.fold is not None:
        check_held_out(load_head(args.head).meta, args.fold, args.head)
    target, draft = load_models(args)
    pair = fingerprint(target, draft)
    head = load_head(args.head, pair) if args.head else None
    methods = [Method("lossless"), Method("draft")]
    pooled_as: dict[Method, list[int | str]] = {}
    if head is not None:
        if args.thresholds:
            methods += [Method("autojudge", t) for t in floats(args.thresholds)]
        else:
            quantiles = sorted({int(q) for q in floats(args.quantiles)})
            if any(not 0 <= q < len(head.thresholds) for q in quantiles):
                raise ValueError(f"--quantiles must lie in 0..{len(head.thresholds) - 1}, not {args.quantiles}")
            for q in quantiles:
                pooled_as.setdefault(Method("autojudge", float(head.thresholds[q])), []).append(q)
            pooled_as.setdefault(Method("autojudge", head.default_threshold), []).append(DEFAULT)
            methods += list(pooled_as)
    methods += [Method("topk", k) for k in floats(args.topk)] + [Method("prob", e) for e in floats(args.prob)]
    methods += [Method(rule, b) for b in floats(args.kl) for rule in ("kl-qg", "kl-gq")]
    tokenizer = target.tokenizer
    prompts = {prob.prompt_id: tuple(prompt_token_ids(tokenizer, prob)) for prob in problems}
    by_id = {prob.prompt_id: prob for prob in problems}
    max_len = max(len(x) for x in prompts.values()) + args.max_new_tokens + 1
    decoder = LockstepDecoder(target.model, draft, head, eos_token_ids(target), args.slots, max_len)

    def text_outcome(problem: Problem, ids: list[int]) -> str | None:
        return outcome(problem, str(tokenizer.decode(ids, skip_special_tokens=True)))

    log_meta = {
        "pair": pair,
        "head_sha256": sha256_file(args.head / TENSORS) if args.head else None,
        "source": args.source,
        "generator": [args.size, args.seed] if args.source == "gsm-symbolic" else None,
        "max_new_tokens": args.max_new_tokens,
        "oracle": {t: ORACLE_VERSION[t] for t in sorted({prob.task for prob in problems})},
    }
    resumed = 0

    def run(ms: list[Method]) -> dict[Method, list[ProblemResult]]:
        nonlocal resumed
        jobs = [
            Job(f"{m.label}|{pid}", ids, m, args.max_new_tokens, seed=zlib.crc32(pid.encode()))
            for pid, ids in prompts.items()
            for m in ms
        ]
        with tqdm(total=len(jobs), unit="run", desc=f"{len(ms)} methods x {len(prompts)} problems") as bar:

            def from_log(n: int) -> None:  # runs read back count as done but not toward the rate and the ETA
                bar.initial = bar.n = bar.last_print_n = n
                bar.refresh()

            traces, n_logged = decode_with_log(decoder, jobs, args.out / TRACES, log_meta, bar.update, from_log)
        resumed += n_logged
        if decoder.draining:  # stopped by a signal: the log holds what finished, the next run resumes from it
            return {}
        return score_traces(traces, by_id, windows, text_outcome, is_correct)

    start = time.perf_counter()
    with drain_on_signal(decoder, "problems") as caught:
        results = run(methods)
        if not decoder.draining:
            rates = set(floats(args.random)) | (judge_rates(args.random_from) if args.random_from else set())
            if head is not None and not args.no_random:
                rates |= rates_of(summarise(results, Method("lossless"), windows))
            if rates:
                results.update(run([Method("random", rho) for rho in sorted(rates) if rho > 0]))
    if decoder.draining:
        print(
            f"stopped by a signal; the finished runs are in {args.out / TRACES}: the same command resumes",
            file=sys.stderr,
        )
        return 128 + caught[0]
    rows = summarise(results, Method("lossless"), windows)
    meta = {
        "command": "autojudge-train evaluate " + " ".join(argv),
        "pair": pair,
        "head": str(args.head) if args.head else None,
        "source": args.source,
        "fold": None if args.fold is None else str(args.fold),
        "problems": len(problems),
        "max_new_tokens": args.max_new_tokens,
        "windows": windows,
        "seconds": round(time.perf_counter() - start, 1),
        "rows_decoded": decoder.row_steps,
        "jobs_resumed": resumed,
        "decoding": "greedy, no bonus token (paper setting); lockstep replay, exact for every W",
    }
    write_reports(rows, args.out, windows, meta)
    with open(args.out / PROBLEMS, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in problem_records(results, pooled_as))
    print(markdown_table(rows, windows), end="")
    job_tokens = sum(r.num_tokens for res in results.values() for r in res)
    print(
        f"{len(problems)} problems, {len(rows)} method points in {meta['seconds']} s -> {args.out}; "
        f"{decoder.row_steps} rows decoded for {job_tokens} tokens of all methods (shared prefixes)"
        + (f"; {resumed} runs read from {args.out / TRACES}" if resumed else ""),
        file=sys.stderr,
    )
    failed = sum(r.failed for res in results.values() for r in res)
    if failed:
        print(
            f"warning: {failed} runs ended where the target's logits stopped being finite (counted wrong)",
            file=sys.stderr,
        )
    return 0


def pool_runs(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="autojudge-train pool",
        description="Pool cross-fitted evaluation runs (evaluate --fold F/K, and baseline runs) into one curve.",
    )
    p.add_argument("runs", type=Path, nargs="+", help="evaluation directories")
    p.add_argument("--out", type=Path, required=True, help="report directory of the pooled curve")
    args = p.parse_args(argv)
    read = {str(d): read_run(d) for d in args.runs}
    metas = {name: meta for name, (meta, _) in read.items()}
    check_runs(metas)
    results = pool({name: records for name, (_, records) in read.items()})
    lossless = Point("lossless", 0.0, "lossless")
    if lossless not in results:
        raise ValueError("no run holds the lossless reference")
    first = next(iter(metas.values()))
    windows = tuple(first["windows"])
    rows = summarise(results, lossless, windows)
    meta = {
        "command": "autojudge-train pool " + " ".join(argv),
        "runs": {
            name: {"fold": m.get("fold"), "problems": m["problems"], "head": m.get("head")} for name, m in metas.items()
        },
        **{key: first[key] for key in SAME_SETUP},
        "problems": len(results[lossless]),
        "decoding": first.get("decoding"),
    }
    write_reports(rows, args.out, windows, meta)
    print(markdown_table(rows, windows), end="")
    print(f"pooled {len(read)} runs, {meta['problems']} problems -> {args.out}", file=sys.stderr)
    return 0


def goals(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="autojudge-train goals",
        description="State an evaluation's goals: the fastest AutoJudge point within an accuracy drop and an "
        "agreement, against a speed-up; each baseline against the AutoJudge curve at equal speed.",
    )
    p.add_argument("results", type=Path, help="results.json of evaluate or pool")
    p.add_argument("--max-drop", type=float, default=1.0, help="accuracy points lost, at most")
    p.add_argument("--min-agreement", type=float, default=0.95, help="outcome agreement with the target, at least")
    p.add_argument("--speedup", type=float, default=1.3, help="x lossless tokens per cycle, the goal")
    p.add_argument("--window", type=positive, default=32, help="the window W whose tokens per cycle count")
    args = p.parse_args(argv)
    goal = Goal(args.max_drop, args.min_agreement, args.speedup, args.window)
    doc = json.loads(args.results.read_text())
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{args.results} is not an evaluation's results.json (no list of rows)")
    try:
        print("\n".join(statements(rows, goal)))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{args.results}: a row lacks what an evaluation writes ({e!r})") from e
    return 0


def in_folder(folder: Path) -> Path:
    """A run folder's checkpoint: `traces.jsonl`, or `traces.jsonl.gz` as `crossfit-save` stores it."""
    plain, packed = folder / TRACES, folder / (TRACES + ".gz")
    return packed if packed.is_file() and not plain.is_file() else plain


def baselines(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="autojudge-train baselines",
        description="Gather the head-free jobs (lossless, draft, top-K, probability, KL, random) of evaluation "
        "checkpoints that differ only in their head, the folds of a cross-fitting run say, into one baselines-only "
        "checkpoint. An `evaluate` of any head into that folder adopts it and decodes only the AutoJudge jobs.",
    )
    p.add_argument("checkpoints", nargs="+", type=Path, help="traces.jsonl or traces.jsonl.gz files, or run folders")
    p.add_argument("--out", type=Path, required=True, help="run folder to start (its traces.jsonl must not exist)")
    args = p.parse_args(argv)
    paths = [in_folder(c) if c.is_dir() else c for c in args.checkpoints]
    n = write_baselines(paths, args.out / TRACES)
    print(f"{n} head-free jobs of {len(paths)} checkpoints -> {args.out / TRACES}", file=sys.stderr)
    return 0


COMMANDS = {
    "mine": mine,
    "labels": labels,
    "pack-labels": pack_labels,
    "unpack-labels": unpack_labels,
    "features": features,
    "fit": fit,
    "evaluate": evaluate,
    "pool": pool_runs,
    "baselines": baselines,
    "goals": goals,
}


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
    except Stopped as e:  # what finished is in the output file already: the same command resumes from it
        print(f"autojudge-train: {e}; what finished is kept and the same command resumes", file=sys.stderr)
        return 128 + e.signum


if __name__ == "__main__":
    sys.exit(main())
