"""Side-by-side CPU benchmark: transformers `generate` (target only, and with `assistant_model`) against
our engine (target only, and speculative with K drafts) on the embedded SmolLM2-135M pair, greedy, same
prompts.

Prints a markdown table of tokens/s, target forwards per token, mean tokens per cycle, output identity with
transformers' target-only greedy output, and memory; then the cost ratios that explain the CPU result (a
verify forward of K+1 tokens vs a single decode step, draft step vs target step). From the repository root:

    PYTHONPATH=. .venv/bin/python benchmarks/engine_bench.py [--json results.json]

Every (method, batch size) runs in its own subprocess (this script re-invoked with `--only`), one after
another, so peak RSS is per method. Methods:

- `hf`: `AutoModelForCausalLM.generate`, target only (left-padded batch with attention mask at batch > 1).
- `hf-assist`: `generate(assistant_model=draft)` with transformers' default assistant settings (up to 20
  draft tokens, drafting stops early when the draft's top probability < 0.4).
- `hf-assist-k`: the same with exactly K draft tokens per cycle (constant schedule, no confidence stop).
- `ours`: our `Engine` without a draft.  `ours-k`: our `Engine` with the int8 draft and K draft tokens.

The draft is the int8 copy of the target (`engine.model.quant.quantize_int8`); transformers' assistant is the
HF target with every `nn.Linear` swapped for the same `Int8Linear`, so both sides run the same pair.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
GSM8K_TEST = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
CPU = torch.device("cpu")
WARMUP_TOKENS = 16
COST_REPEATS = 10
BUSY_THRESHOLD = 0.1  # share of the CPUs other processes may use while a timing still counts
HF_ASSIST_DEFAULT = "hf-assist"
FAMILIES = ("hf", HF_ASSIST_DEFAULT, "hf-assist-k", "ours", "ours-k")
Prompts = list[list[int]]  # token ids per prompt (or generated tokens per prompt)
Row = dict[str, Any]  # one JSON-able record: a run, a summary row, the cost figures
BATCH1_ONLY_REASON = "transformers: assisted generate is only supported for batch_size = 1"


# --- arguments --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from engine.model.assets import default_cache_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=8, help="GSM8K test questions (the first N)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--methods",
        default=",".join(FAMILIES),
        help="comma list of hf, hf-assist, hf-assist-k, ours, ours-k (the -k families expand over --ks), "
        "or single ones such as ours-k4, hf-assist-k2",
    )
    p.add_argument("--batch-sizes", default="1,8", help="comma list; prompts run in groups of this size")
    p.add_argument("--ks", default="2,4,8", help="draft tokens per cycle for the -k methods")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=GSM8K_TEST)
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    p.add_argument("--json", type=Path, help="also write every figure (and the output tokens) as JSON here")
    p.add_argument("--skip-costs", action="store_true", help="skip the cost ratios and the logits check")
    p.add_argument(
        "--idle-wait",
        type=float,
        default=300.0,
        help="seconds to wait before each timing for other processes to leave the CPUs idle (0: never)",
    )
    p.add_argument("--retries", type=int, default=3, help="re-runs of a timing spoiled by other processes")
    p.add_argument("--only", help=argparse.SUPPRESS)  # internal: run one method in this process
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def expand_methods(text: str, ks: list[int]) -> list[str]:
    out: list[str] = []
    for name in (m.strip() for m in text.split(",") if m.strip()):
        if name in ("hf-assist-k", "ours-k"):
            out += [f"{name}{k}" for k in ks]
        elif name in FAMILIES or name.startswith(("hf-assist-k", "ours-k")):
            out.append(name)
        else:
            raise SystemExit(f"unknown method {name!r}; known: {', '.join(FAMILIES)}")
    return out


def method_k(method: str) -> int:
    """K of a `-k` method, 0 for target-only ones and -1 for transformers' default assistant schedule."""
    if method == HF_ASSIST_DEFAULT:
        return -1
    return int(method.rsplit("-k", 1)[1]) if "-k" in method else 0


# --- memory and machine -------------------------------------------------------------------------------------
def rss_mb() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size (`ru_maxrss`, KiB on Linux) since start or since `reset_peak_rss`."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux `clear_refs` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def busy_cpu_seconds() -> float:
    """CPU seconds all processes of the machine have spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def machine_busy_share(seconds: float = 3.0) -> float:
    """Fraction of the machine's CPUs busy over `seconds` (call it while this process is idle)."""
    before = busy_cpu_seconds()
    time.sleep(seconds)
    return (busy_cpu_seconds() - before) / (seconds * (os.cpu_count() or 1))


def wait_until_idle(max_wait: float, sample: float = 3.0) -> float:
    """Wait (up to `max_wait` s) until others use under `BUSY_THRESHOLD` of the CPUs; returns their share.

    Other jobs on a 2-CPU machine wreck 2-thread timings (OpenMP threads wait on each other), so each
    method starts on an idle machine when it can; the share other processes took is reported per run."""
    deadline = time.monotonic() + max_wait
    share = machine_busy_share(sample)
    while share > BUSY_THRESHOLD and time.monotonic() < deadline:
        print(f"  machine busy ({share:.0%} of CPUs used by others); waiting", file=sys.stderr, flush=True)
        time.sleep(10)
        share = machine_busy_share(sample)
    return share


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int) -> Row:
    import transformers

    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    return {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "avx2": " avx2" in flags,
        "avx512f": " avx512f" in flags,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": threads,
    }


# --- prompts and models ------------------------------------------------------------------------------------
def model_dir(cache_dir: Path) -> Path:
    """The verified safetensors directory of the embedded target (what `load_model(...).model_dir` returns),
    without building our Decoder, so transformers-only processes do not pay for it in memory."""
    from engine.model.assets import embedded_target_path
    from engine.model.loader import gguf_cache, source_sha256_of

    path = embedded_target_path()
    return gguf_cache(path, source_sha256_of(path, cache_dir), cache_dir)


def load_prompts(tokenizer: Any, data: Path, n: int) -> Prompts:
    """The first `n` GSM8K questions, in the tokenizer's chat template with the generation prompt."""
    with data.open() as f:
        questions = [json.loads(line)["question"] for line, _ in zip(f, range(n), strict=False)]
    rendered = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for q in questions
    ]
    return [tokenizer.encode(r, add_special_tokens=False) for r in rendered]


def load_hf(directory: Path) -> Any:  # a transformers PreTrainedModel in eval mode
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    return model


def hf_int8_copy(model: Any) -> Any:
    """A copy of an HF model with every `nn.Linear` (lm_head included) replaced by our `Int8Linear`: the same
    weights and numerics as `quantize_int8(decoder)`, embeddings kept fp32."""
    from engine.model.quant import Int8Linear

    draft = copy.deepcopy(model)

    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
            else:
                swap(child)

    swap(draft)
    return draft.eval()


def chunks(items: Prompts, size: int) -> list[Prompts]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def cut_at_eos(ids: list[int], eos: int) -> list[int]:
    """Tokens up to and including the first EOS (what every method emits before it stops)."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids


# --- one method's run --------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What one (method, batch size) run measured; tokens are per prompt, in prompt order."""

    method: str
    batch: int
    k: int
    tokens: Prompts = field(default_factory=list)
    seconds: float = 0.0
    target_row_forwards: int = 0  # target forwards that produce tokens, counted once per row they serve
    spec_cycles: int = 0
    spec_emitted: int = 0
    rss_loaded_mb: float = 0.0  # right after loading (safetensors weights are mmapped: not all touched yet)
    rss_warm_mb: float = 0.0  # after the warm-up generation: every weight touched, caches allocated
    peak_load_mb: float = 0.0  # ru_maxrss through loading and warm-up
    peak_gen_mb: float | None = None  # peak RSS during the timed generation only
    load_seconds: float = 0.0
    cpu_seconds: float = 0.0
    loadavg: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before and after the timed part
    others_cpu_share: float = 0.0  # CPU used by other processes during the timed part / (wall x CPUs)
    discarded_runs: int = 0  # group timings thrown away because other processes took the CPUs
    group_seconds: list[float] = field(default_factory=list)
    engine_seconds: dict[str, float] = field(default_factory=dict)  # ours: StepStats seconds per phase
    note: str = ""


@dataclass
class GroupOutput:
    """One group of prompts generated together."""

    tokens: Prompts  # per prompt, EOS included when it stopped there
    row_forwards: int  # target forwards that produced tokens, once per row they served
    spec_cycles: int = 0  # ours: speculation cycles (SpecCounts.num_spec_steps)
    spec_emitted: int = 0  # ours: tokens those cycles emitted (accepted + recovered + bonus)
    engine_seconds: dict[str, float] = field(default_factory=dict)


Generate = Callable[[Prompts, int], GroupOutput]  # (prompts of one group, max new tokens) -> output


class StepSplit:
    """`on_step` hook of our Engine: seconds per phase, summed."""

    PHASES = ("prefill", "draft", "verify", "judge", "step")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.PHASES, 0.0)

    def __call__(self, stats: Any) -> None:
        for phase in self.PHASES:
            self.seconds[phase] += getattr(stats, f"seconds_{phase}")


class ForwardCounter:
    """Counts forward calls of an HF model, weighted by the rows of each call."""

    def __init__(self, model: nn.Module) -> None:
        self.rows = 0
        model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.rows += int(ids.shape[0]) if ids is not None else 1


def hf_generator(method: str, directory: Path, eos: int) -> tuple[Generate, str]:
    """Load transformers' target (and assistant) and return a batch generate function."""
    target = load_hf(directory)
    counter = ForwardCounter(target)
    extra: dict[str, Any] = {}
    note = ""
    if method.startswith(HF_ASSIST_DEFAULT):
        assistant = hf_int8_copy(target)
        k = method_k(method)
        if k > 0:  # exactly K drafts per cycle, as our engine does
            assistant.generation_config.num_assistant_tokens = k
            assistant.generation_config.num_assistant_tokens_schedule = "constant"
            assistant.generation_config.assistant_confidence_threshold = 0.0
        extra["assistant_model"] = assistant
        note = probe_assisted_batch(target, assistant, eos)

    def run(group: Prompts, max_new: int) -> GroupOutput:
        before = counter.rows
        tokens = hf_generate(target, group, max_new, eos, extra)
        return GroupOutput(tokens, counter.rows - before)

    return run, note


def probe_assisted_batch(target: Any, assistant: Any, eos: int) -> str:
    """Ask transformers for a 2-row assisted generation; returns its refusal message (or '' if it runs)."""
    ids = torch.tensor([[1, 2, 3], [1, 2, 3]])
    try:
        target.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            assistant_model=assistant,
            max_new_tokens=1,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    except ValueError as e:
        return f"transformers: {e}"
    return ""


def hf_generate(
    model: Any,
    group: Prompts,
    max_new: int,
    eos: int,
    extra: dict[str, Any],
) -> Prompts:
    """Greedy `generate` on left-padded rows (pad = eos, masked); tokens per row cut after the first EOS."""
    width = max(len(p) for p in group)
    ids = torch.tensor([[eos] * (width - len(p)) + p for p in group])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
            **extra,
        )
    return [cut_at_eos(row, eos) for row in out[:, width:].tolist()]


def ours_generator(method: str, cache_dir: Path, batch: int, max_len: int) -> tuple[Generate, str]:
    """Load our target (and the int8 draft) and return a function that runs a group through one Engine."""
    from engine import Engine, EngineConfig
    from engine.config import CacheConfig, SpecConfig
    from engine.model.assets import embedded_target_path
    from engine.model.loader import load_model
    from engine.model.quant import quantize_int8

    loaded = load_model(embedded_target_path(), cache_dir=cache_dir)
    k = method_k(method)
    draft = quantize_int8(loaded.model) if k > 0 else None
    config = EngineConfig(
        # transformers keeps no K/V between calls, so every prompt is computed afresh on both sides.
        cache=CacheConfig(max_slots=batch, max_model_len=max_len, reuse_prefix=False),
        spec=SpecConfig(max_speculative_tokens=max(k, 1), default_speculative_tokens=k),
    )
    split = StepSplit()
    eos = loaded.tokenizer.eos_token_id
    engine = Engine(config, loaded.model, draft, eos_token_ids=(eos,), on_step=split)

    def run(group: Prompts, max_new: int) -> GroupOutput:
        split.seconds = dict.fromkeys(StepSplit.PHASES, 0.0)
        out = run_engine(engine, group, max_new, k)
        out.engine_seconds = dict(split.seconds)
        return out

    return run, f"engine: {batch} slots x {max_len} positions"


def run_engine(engine: Any, group: Prompts, max_new: int, k: int) -> GroupOutput:
    """Add every prompt of the group, step until done; count the steps each request took part in."""
    from engine.types import Request, SamplingParams, SpecCounts, SpecParams

    spec = SpecParams(enabled=k > 0, num_speculative_tokens=k)
    for i, prompt in enumerate(group):
        engine.add_request(Request(f"r{i}", tuple(prompt), SamplingParams(max_tokens=max_new), spec))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(group))}
    row_steps = 0
    counts = SpecCounts()
    while engine.has_unfinished():
        outputs = engine.step()
        row_steps += len(outputs)  # one output per running request per step = one verify forward row
        for out in outputs:
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finished and out.spec is not None:
                counts = counts.merge(out.spec)
    emitted = counts.num_accepted_tokens + counts.num_bonus + counts.num_recovered
    per_prompt = [tokens[f"r{i}"] for i in range(len(group))]
    return GroupOutput(per_prompt, row_steps, counts.num_spec_steps, emitted)


def run_method(args: argparse.Namespace) -> RunResult:
    """Load, warm up, reset the peak-RSS mark, then time every group of prompts through one method."""
    torch.set_num_threads(args.threads)
    method, batch = args.only, args.batch
    result = RunResult(method=method, batch=batch, k=method_k(method))
    start = time.perf_counter()
    from transformers import AutoTokenizer

    directory = model_dir(args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompts = load_prompts(tokenizer, args.data, args.num_prompts)
    if method.startswith("hf"):
        generate, result.note = hf_generator(method, directory, tokenizer.eos_token_id)
    else:
        max_len = max(len(p) for p in prompts) + args.max_new_tokens
        generate, result.note = ours_generator(method, args.cache_dir, batch, max_len)
    result.load_seconds = time.perf_counter() - start
    result.rss_loaded_mb = rss_mb()
    generate(chunks(prompts, batch)[0], min(WARMUP_TOKENS, args.max_new_tokens))  # warm-up, first group
    result.rss_warm_mb = rss_mb()
    result.peak_load_mb = peak_rss_mb()
    have_reset = reset_peak_rss()
    timed_run(result, generate, chunks(prompts, batch), args)
    result.peak_gen_mb = peak_rss_mb() if have_reset else None
    return result


def timed_run(result: RunResult, generate: Generate, groups: list[Prompts], args: argparse.Namespace) -> None:
    """Time each group on an otherwise idle machine; a group during which other processes took more than
    `BUSY_THRESHOLD` of the CPUs is run again (up to `--retries` times) and the spoiled timing discarded."""
    load_before = os.getloadavg()[0]
    others_cpu = 0.0
    for group in groups:
        clean = uncontended(partial(generate, group, args.max_new_tokens), args.idle_wait, args.retries)
        out: GroupOutput = clean.value
        result.seconds += clean.seconds
        result.group_seconds.append(clean.seconds)
        result.cpu_seconds += clean.cpu_seconds
        result.discarded_runs += clean.discarded
        others_cpu += clean.others_share * clean.seconds * (os.cpu_count() or 1)
        result.tokens += out.tokens
        result.target_row_forwards += out.row_forwards
        result.spec_cycles += out.spec_cycles
        result.spec_emitted += out.spec_emitted
        for phase, seconds in out.engine_seconds.items():
            result.engine_seconds[phase] = result.engine_seconds.get(phase, 0.0) + seconds
        print(
            f"  {result.method} b={result.batch}: {sum(map(len, out.tokens))} tokens "
            f"in {clean.seconds:.1f} s (others {clean.others_share:.0%}, {clean.discarded} discarded)",
            file=sys.stderr,
            flush=True,
        )
    result.loadavg = (load_before, os.getloadavg()[0])
    result.others_cpu_share = others_cpu / (result.seconds * (os.cpu_count() or 1))


@dataclass
class Clean:
    """One timed call that other processes left (mostly) alone."""

    value: Any
    seconds: float
    cpu_seconds: float
    others_share: float  # CPU other processes used meanwhile / (wall x CPUs)
    discarded: int  # earlier attempts thrown away because the machine was busy


def uncontended(fn: Callable[[], Any], idle_wait: float, retries: int) -> Clean:
    """Run `fn` on an idle machine and time it; repeat (up to `retries` times) when others took the CPUs."""
    discarded = 0
    while True:
        if idle_wait > 0:
            wait_until_idle(idle_wait, sample=1.0)
        cpu0, busy0, t0 = time.process_time(), busy_cpu_seconds(), time.perf_counter()
        value = fn()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        others = max(busy_cpu_seconds() - busy0 - cpu, 0.0) / (seconds * (os.cpu_count() or 1))
        if others <= BUSY_THRESHOLD or discarded >= retries:
            return Clean(value, seconds, cpu, others, discarded)
        discarded += 1
        print(f"  others took {others:.0%} of the CPUs: timing discarded, again", file=sys.stderr, flush=True)


# --- cost ratios and the logits check (own subprocess) ---------------------------------------------------
def median_seconds(fn: Callable[[], object], repeats: int = COST_REPEATS, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def forward_cost(model: Any, context: list[int], q_len: int, max_len: int, rows: int) -> float:
    """Median seconds of one cached forward of `q_len` tokens per row after `context` (plus the logits of all
    of them, as the verifier computes), for `rows` rows through the engine's ModelRunner."""
    from engine.runner import ModelRunner

    runner = ModelRunner(model, model.new_cache(rows, max_len), CPU)
    slots = list(range(rows))
    runner.forward([context] * rows, [0] * rows, slots)
    feed = context[-q_len:]

    def step() -> None:
        hidden = runner.forward([feed] * rows, [len(context)] * rows, slots)
        runner.logits(hidden)

    return median_seconds(step)


def costs_at(args: argparse.Namespace, target: Any, draft: Any, prompt: list[int], rows: int) -> Row:
    """Target step, draft step and verify forwards of K+1 tokens at `rows` rows, each timed uncontended."""
    max_len = len(prompt) + 64
    shares: list[float] = []

    def ms(model: Any, q_len: int) -> float:
        timed = partial(forward_cost, model, prompt, q_len, max_len, rows)
        clean = uncontended(timed, args.idle_wait, args.retries)
        shares.append(clean.others_share)
        return 1000 * float(clean.value)

    ks = int_list(args.ks)
    step, draft_ms = ms(target, 1), ms(draft, 1)
    verify = {str(k): ms(target, k + 1) for k in ks}
    return {
        "rows": rows,
        "target_step_ms": step,
        "draft_step_ms": draft_ms,
        "draft_over_target": draft_ms / step,
        "verify_ms": verify,
        "verify_over_step": {k: v / step for k, v in verify.items()},
        "others_cpu_share_max": max(shares),
    }


def measure_costs(args: argparse.Namespace) -> Row:
    """Verify cost ratios (K+1 tokens vs 1), draft vs target step, logits agreement of the two int8 copies."""
    from engine.model.assets import embedded_target_path
    from engine.model.loader import load_model
    from engine.model.quant import quantize_int8

    torch.set_num_threads(args.threads)
    loaded = load_model(embedded_target_path(), cache_dir=args.cache_dir)
    draft = quantize_int8(loaded.model)
    prompt = load_prompts(loaded.tokenizer, args.data, 1)[0]
    batches = {str(b): costs_at(args, loaded.model, draft, prompt, b) for b in int_list(args.batch_sizes)}
    return {
        "context_tokens": len(prompt),
        "batches": batches,
        "logits_check": logits_check(loaded, draft, prompt),
    }


def logits_check(loaded: Any, draft: Any, prompt: list[int]) -> dict[str, float]:
    """Max |logit difference| on one prompt (no cache): our fp32 Decoder vs HF, our int8 draft vs HF int8."""
    from engine.model.protocol import ForwardBatch

    hf = load_hf(loaded.model_dir)
    hf_int8 = hf_int8_copy(hf)
    batch = ForwardBatch.build([prompt], [0], [0], CPU)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        ours_fp32 = loaded.model.compute_logits(loaded.model(batch, None))[0]
        ours_int8 = draft.compute_logits(draft(batch, None))[0]
        hf_fp32 = hf(ids).logits[0].float()
        hf_q = hf_int8(ids).logits[0].float()
    return {
        "positions": len(prompt),
        "fp32_max_abs_diff": float((ours_fp32 - hf_fp32).abs().max()),
        "int8_max_abs_diff": float((ours_int8 - hf_q).abs().max()),
        "int8_argmax_equal": float((ours_int8.argmax(-1) == hf_q.argmax(-1)).float().mean()),
        "int8_vs_fp32_argmax_agreement": float((ours_int8.argmax(-1) == ours_fp32.argmax(-1)).float().mean()),
    }


# --- orchestration -----------------------------------------------------------------------------------------
def child(args: argparse.Namespace, only: str, batch: int) -> Row:
    """Re-invoke this script for one method in a fresh process; returns its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        options = {
            "--only": only,
            "--batch": batch,
            "--result": out,
            "--num-prompts": args.num_prompts,
            "--max-new-tokens": args.max_new_tokens,
            "--ks": args.ks,
            "--batch-sizes": args.batch_sizes,
            "--threads": args.threads,
            "--data": args.data,
            "--cache-dir": args.cache_dir,
            "--idle-wait": args.idle_wait,
            "--retries": args.retries,
        }
        cmd = [sys.executable, str(Path(__file__).resolve())]
        for flag, value in options.items():
            cmd += [flag, str(value)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        subprocess.run(cmd, check=True, env=env)
        return json.loads(out.read_text())


def child_main(args: argparse.Namespace) -> None:
    if args.only == "costs":
        payload: Row = measure_costs(args)
    else:
        payload = asdict(run_method(args))
        payload["peak_process_mb"] = max(payload["peak_load_mb"], payload["peak_gen_mb"] or 0.0)
    assert args.result is not None
    args.result.write_text(json.dumps(payload))


def identity(tokens: Prompts, reference: Prompts | None) -> Row:
    """Prompts whose output equals the reference, and where the others first differ."""
    if reference is None:
        return {"identical": None, "total": len(tokens), "first_diff": []}
    diffs = []
    for i, (a, b) in enumerate(zip(tokens, reference, strict=True)):
        if a != b:
            pos = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            diffs.append({"prompt": i, "position": pos, "len": len(a), "ref_len": len(b)})
    return {"identical": len(tokens) - len(diffs), "total": len(tokens), "first_diff": diffs}


def summarise(run: Row, reference: Prompts | None, hf_same_batch: float | None) -> Row:
    tokens = sum(len(t) for t in run["tokens"])
    tok_s = tokens / run["seconds"] if run["seconds"] else 0.0
    cycles = run["spec_cycles"]
    if run["method"].startswith(HF_ASSIST_DEFAULT):
        mean_accept: float | None = tokens / run["target_row_forwards"]
    else:
        mean_accept = run["spec_emitted"] / cycles if cycles else None
    return {
        **run,
        "num_tokens": tokens,
        "tok_s": tok_s,
        "speedup_vs_hf": tok_s / hf_same_batch if hf_same_batch else None,
        "forwards_per_token": run["target_row_forwards"] / tokens if tokens else None,
        "mean_tokens_per_cycle": mean_accept,
        "identity_vs_hf_b1": identity(run["tokens"], reference),
    }


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def table(rows: list[Row]) -> str:
    head = (
        "| method | batch | tokens | seconds | tok/s | vs hf | target fwd/token | tokens/cycle "
        "| = hf b=1 | RSS loaded MB | RSS warm MB | peak gen MB | peak MB | others' CPU |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        if "na" in r:
            lines.append(f"| {r['method']} | {r['batch']} | n/a: {r['na']} |" + " |" * 11)
            continue
        ident = r["identity_vs_hf_b1"]
        same = "n/a" if ident["identical"] is None else f"{ident['identical']}/{ident['total']}"
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['num_tokens']} | {r['seconds']:.1f} | {r['tok_s']:.2f} "
            f"| {fmt(r['speedup_vs_hf'])} | {fmt(r['forwards_per_token'], '.3f')} "
            f"| {fmt(r['mean_tokens_per_cycle'])} | {same} "
            f"| {r['rss_loaded_mb']:.0f} | {r['rss_warm_mb']:.0f} "
            f"| {fmt(r['peak_gen_mb'], '.0f')} | {r['peak_process_mb']:.0f} | {r['others_cpu_share']:.0%} |"
        )
    return "\n".join(lines)


def md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def draft_cell(cost: Row) -> str:
    return f"{cost['draft_step_ms']:.1f} ({cost['draft_over_target']:.2f})"


def cost_table(costs: Row) -> str:
    batches = costs["batches"]
    cols = list(batches)
    lines = [
        f"Forward costs with {costs['context_tokens']} cached tokens per row, median of {COST_REPEATS} "
        "(forward + logits of every fed token, through the engine's ModelRunner), in ms and as a ratio "
        "to the 1-token target step at the same batch:",
        "",
        md_row(["forward", *(f"batch {b}" for b in cols)]),
        md_row(["---"] * (len(cols) + 1)),
        md_row(["target, 1 token", *(f"{batches[b]['target_step_ms']:.1f} (1.00)" for b in cols)]),
        md_row(["int8 draft, 1 token", *(draft_cell(batches[b]) for b in cols)]),
    ]
    for k in batches[cols[0]]["verify_ms"]:
        cells = [f"{batches[b]['verify_ms'][k]:.1f} ({batches[b]['verify_over_step'][k]:.2f})" for b in cols]
        lines.append(md_row([f"target, K+1 = {int(k) + 1} tokens", *cells]))
    shares = ", ".join(f"batch {b}: {batches[b]['others_cpu_share_max']:.0%}" for b in cols)
    check = costs["logits_check"]
    lines += [
        "",
        f"Most CPU other processes took during one of these timings: {shares}.",
        "",
        f"Logits check ({check['positions']} positions, no cache): ours fp32 vs HF fp32 max |diff| "
        f"{check['fp32_max_abs_diff']:.2e}; ours int8 vs HF int8 copy max |diff| "
        f"{check['int8_max_abs_diff']:.2e}, argmax equal on {check['int8_argmax_equal']:.3f} of positions; "
        f"int8 vs fp32 argmax agreement {check['int8_vs_fp32_argmax_agreement']:.3f}.",
    ]
    return "\n".join(lines)


def split_table(rows: list[Row]) -> str:
    """Where our engine's timed seconds went (StepStats), per ours row."""
    lines = [
        "Our engine's time split (seconds, from StepStats; verify includes commit):",
        "",
        md_row(["method", "batch", "prefill", "draft", "verify", "judge", "outside step()", "total"]),
        md_row(["---"] * 8),
    ]
    for r in rows:
        split = r.get("engine_seconds") or {}
        if not split:
            continue
        phases = [f"{split[p]:.1f}" for p in ("prefill", "draft", "verify", "judge")]
        outside = f"{r['seconds'] - split['step']:.1f}"
        lines.append(md_row([r["method"], str(r["batch"]), *phases, outside, f"{r['seconds']:.1f}"]))
    return "\n".join(lines)


def predicted_speedups(rows: list[Row], costs: Row) -> str:
    """Speedup over plain decoding the costs predict: m * t_step / (K * t_draft + t_verify(K+1)) per cycle."""
    lines = ["Speedup of ours-kK over ours predicted from these costs and the measured tokens per cycle:"]
    for r in rows:
        cost = costs["batches"].get(str(r.get("batch")))
        k = str(r.get("k", 0))
        if cost is None or not r["method"].startswith("ours-k") or k not in cost["verify_ms"]:
            continue
        m = r["mean_tokens_per_cycle"] or 0.0
        cycle = int(k) * cost["draft_step_ms"] + cost["verify_ms"][k]
        lines.append(
            f"- batch {r['batch']}, K={k}: {m:.2f} tokens/cycle x {cost['target_step_ms']:.1f} ms / "
            f"({k} x {cost['draft_step_ms']:.1f} + {cost['verify_ms'][k]:.1f}) ms "
            f"= {m * cost['target_step_ms'] / cycle:.2f}x"
        )
    return "\n".join(lines)


def run_all(args: argparse.Namespace) -> None:
    ks = int_list(args.ks)
    methods = expand_methods(args.methods, ks)
    started = time.perf_counter()
    runs: list[Row] = []
    na_reason = BATCH1_ONLY_REASON
    for batch in int_list(args.batch_sizes):
        for method in methods:
            if method.startswith(HF_ASSIST_DEFAULT) and batch > 1:
                runs.append({"method": method, "batch": batch, "na": na_reason})
                continue
            elapsed = time.perf_counter() - started
            print(f"[{elapsed:.0f} s] {method} batch {batch}", file=sys.stderr, flush=True)
            if args.idle_wait > 0:
                wait_until_idle(args.idle_wait)
            run = child(args, method, batch)
            if method.startswith(HF_ASSIST_DEFAULT) and run["note"]:
                na_reason = run["note"]
            runs.append(run)
    if not args.skip_costs and args.idle_wait > 0:
        wait_until_idle(args.idle_wait)
    costs = None if args.skip_costs else child(args, "costs", 1)
    rows = summarise_all(runs)
    report(args, rows, costs, time.perf_counter() - started)


def summarise_all(runs: list[Row]) -> list[Row]:
    reference = next((r["tokens"] for r in runs if r["method"] == "hf" and r["batch"] == 1), None)
    hf_runs = [r for r in runs if r["method"] == "hf" and "na" not in r]
    hf_tok_s = {r["batch"]: sum(map(len, r["tokens"])) / r["seconds"] for r in hf_runs}
    return [r if "na" in r else summarise(r, reference, hf_tok_s.get(r["batch"])) for r in runs]


def report(args: argparse.Namespace, rows: list[Row], costs: Row | None, wall: float) -> None:
    info = machine_info(args.threads)
    print(
        f"\n{info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']}, transformers "
        f"{info['transformers']}, {args.threads} threads; {args.num_prompts} GSM8K prompts, "
        f"max {args.max_new_tokens} new tokens, greedy; whole run {wall / 60:.1f} min\n"
    )
    print(table(rows))
    for r in rows:
        diffs = [] if "na" in r else r["identity_vs_hf_b1"]["first_diff"]
        if diffs:
            where = ", ".join(f"prompt {d['prompt']} at token {d['position']}" for d in diffs)
            print(f"- {r['method']} b={r['batch']} differs from hf b=1: {where}")
    print("\n" + split_table(rows))
    if costs is not None:
        print("\n" + cost_table(costs) + "\n\n" + predicted_speedups(rows, costs))
    if args.json:
        args.json.write_text(
            json.dumps({"machine": info, "args": vars_json(args), "rows": rows, "costs": costs}, indent=1)
        )


def vars_json(args: argparse.Namespace) -> Row:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.only:
        child_main(args)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
