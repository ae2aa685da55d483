"""Benchmark the int8 SmolLM2 draft (`engine.model.quant`): int8 kernel costs, greedy agreement, step cost.

Prints the tables docs/draft-choice.md quotes. Run from the repository root:
`PYTHONPATH=. .venv/bin/python benchmarks/draft_agreement.py`; a torchao column appears when torchao imports.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from engine.model.assets import default_cache_dir, embedded_target_path
from engine.model.decoder import Decoder
from engine.model.loader import load_model
from engine.model.protocol import ForwardBatch
from engine.model.quant import WEIGHT_QMAX, Int8Linear, quantize_int8

CPU = torch.device("cpu")
GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
SHAPES = ((576, 1536), (1536, 576), (576, 576), (576, 49152))  # SmolLM2: gate/up, down, q/o, lm_head
ROWS = (1, 5, 9, 40)
Kernel = Callable[[torch.Tensor], torch.Tensor]  # [M, K] -> [M, N]
Times = dict[str, list[float]]  # seconds per sample, by model or kernel name


def _weight_int8(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:  # int8 [N, K], scale [N]
    w = linear.weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / WEIGHT_QMAX
    return torch.round(w / scale[:, None]).to(torch.int8), scale


def _row_int8(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:  # int8 [M, K], scale [M, 1]
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
    return torch.round(x / scale).to(torch.int8), scale


class FbgemmLinear(nn.Module):
    """The kernel under `quantize_dynamic`: fbgemm `quantized::linear_dynamic`, per-tensor activations."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        wq, ws = _weight_int8(linear)
        zero = torch.zeros(wq.shape[0], dtype=torch.long)
        bias = None if linear.bias is None else linear.bias.detach().float()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # qint8 tensors are deprecated in torch 2.13
            qweight = torch._make_per_channel_quantized_tensor(wq, ws.double(), zero, 0)
            self.packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = torch.ops.quantized.linear_dynamic(x, self.packed, True)
        return y  # reduce_range: 7-bit activations


def onednn_kernel(linear: nn.Linear) -> Kernel:
    """oneDNN `qlinear_pointwise` (int32 sums) on per-row 7-bit activations, uint8 with zero point 64: AVX2
    without VNNI adds u8*s8 pairs in int16, which 8-bit activations would saturate."""
    wq, ws = _weight_int8(linear)
    packed = torch.ops.onednn.qlinear_prepack(wq, None)
    zero = torch.zeros(wq.shape[0], dtype=torch.long)

    def run(x: torch.Tensor) -> torch.Tensor:
        xq, xs = _row_int8(x, 63)
        xu = (xq.to(torch.int16) + 64).to(torch.uint8)
        y: torch.Tensor = torch.ops.onednn.qlinear_pointwise(
            xu, 1.0, 64, packed, ws, zero, None, 1.0, 0, torch.float32, "none", [], ""
        )
        return y * xs

    return run


def int_mm_kernel(linear: nn.Linear) -> Kernel:
    """`torch._int_mm` s8 x s8 -> s32, per-row 8-bit activations (torchao's CPU path without VNNI)."""
    wq, ws = _weight_int8(linear)
    wq_t = wq.t()  # [K, N] view: faster here than a contiguous copy

    def run(x: torch.Tensor) -> torch.Tensor:
        xq, xs = _row_int8(x, 127)
        return torch._int_mm(xq, wq_t).float() * (xs * ws)

    return run


def int8pack_fp32_kernel(linear: nn.Linear) -> Kernel:
    """`torch._weight_int8pack_mm` with fp32 activations, which the AVX2 build runs as a scalar loop."""
    wq, ws = _weight_int8(linear)

    def run(x: torch.Tensor) -> torch.Tensor:
        xq, xs = _row_int8(x, 127)
        return torch._weight_int8pack_mm(xq.float(), wq, ws) * xs

    return run


def torchao_kernel(linear: nn.Linear) -> Kernel:
    """torchao `Int8DynamicActivationInt8WeightConfig` (torchao is not a project dependency)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    copy_ = nn.Linear(linear.in_features, linear.out_features, bias=False)
    with torch.no_grad():
        copy_.weight.copy_(linear.weight)
    module = nn.Sequential(copy_)
    quantize_(module, Int8DynamicActivationInt8WeightConfig())
    return module


KERNELS: dict[str, Callable[[nn.Linear], Kernel]] = {
    "fp32 F.linear": lambda lin: lambda x: F.linear(x, lin.weight),
    "Int8Linear (int8pack, bf16 act)": Int8Linear,
    "oneDNN qlinear": onednn_kernel,
    "_int_mm": int_mm_kernel,
    "int8pack, fp32 act": int8pack_fp32_kernel,
    "fbgemm (deprecated)": FbgemmLinear,
    "torchao": torchao_kernel,
}


def _timed(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


@torch.inference_mode()
def kernel_table(rounds: int) -> None:
    """Per-call cost of each candidate vs fp32, interleaved round by round so machine load hits all alike."""
    names = [n for n in KERNELS if n != "torchao" or importlib.util.find_spec("torchao") is not None]
    print(f"\n## int8 kernels, {torch.get_num_threads()} thread(s): us per call, median of {rounds} rounds")
    print("(ratio of medians vs fp32) [ratio of minima]")
    print("| K->N | M | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names))
    for k, n in SHAPES:
        torch.manual_seed(0)
        linear = nn.Linear(k, n, bias=False)
        nn.init.normal_(linear.weight, std=0.02)
        kernels = [KERNELS[name](linear) for name in names]
        for m in ROWS:
            x = torch.randn(m, k)  # [M, K]
            calls = [max(1, min(100, int(0.001 / _timed(partial(f, x), 2)))) for f in kernels]
            times: list[list[float]] = [[] for _ in kernels]
            for _ in range(rounds):
                for f, c, t in zip(kernels, calls, times, strict=True):
                    t.append(_timed(partial(f, x), c))
            cells = _cost_cells(dict(zip(names, times, strict=True)), names[0], unit=1e6, digits=0)
            print(f"| {k}->{n} | {m} | " + " | ".join(cells) + " |", flush=True)


def chat_prompts(tokenizer: PreTrainedTokenizerBase, count: int) -> list[list[int]]:
    """The first `count` GSM8K test questions as chat prompts."""
    with GSM8K_TEST.open() as f:
        questions = [json.loads(line)["question"] for line, _ in zip(f, range(count), strict=False)]
    prompts = []
    for q in questions:
        chat = [{"role": "user", "content": q}]
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer(text, add_special_tokens=False).input_ids)
    return prompts


@torch.inference_mode()
def greedy(model: Decoder, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Batched greedy continuation of every prompt for exactly `new_tokens` tokens (EOS does not stop it)."""
    lens, slots = [len(p) for p in prompts], list(range(len(prompts)))
    cache = model.new_cache(len(prompts), max(lens) + new_tokens)
    hidden = model(ForwardBatch.build(prompts, [0] * len(prompts), slots, CPU), cache)  # [B, Q, D]
    last = hidden[torch.arange(len(prompts)), torch.tensor(lens) - 1]  # [B, D]
    out: list[list[int]] = [[] for _ in prompts]
    for step in range(new_tokens):
        tokens = model.compute_logits(last).argmax(-1).tolist()  # [B]
        for row, t in zip(out, tokens, strict=True):
            row.append(t)
        if step + 1 < new_tokens:
            batch = ForwardBatch.build([[t] for t in tokens], [n + step for n in lens], slots, CPU)
            last = model(batch, cache)[:, -1]
    return out


@torch.inference_mode()
def forced_argmax(model: Decoder, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """Argmax at each continuation position, one forward over prompt + continuation: [len(continuation)]."""
    hidden = model(ForwardBatch.build([prompt + continuation], [0], [0], CPU), None)[0]  # [L, D]
    return model.compute_logits(hidden[len(prompt) - 1 : -1]).argmax(-1)


@torch.inference_mode()
def forced_argmax_stepwise(model: Decoder, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """The same, but prefill then one token per forward over a cache, as a draft really runs."""
    cache = model.new_cache(1, len(prompt) + len(continuation))
    last = model(ForwardBatch.build([prompt], [0], [0], CPU), cache)[:, -1]  # [1, D]
    out = []
    for i, token in enumerate(continuation):
        out.append(model.compute_logits(last).argmax(-1))
        if i + 1 < len(continuation):
            last = model(ForwardBatch.build([[token]], [len(prompt) + i], [0], CPU), cache)[:, -1]
    return torch.cat(out)


def tokens_per_round(matches: list[bool], gamma: int) -> float:
    """Exact greedy speculative decoding on the target trajectory: accepted drafts plus one target token."""
    pos, rounds = 0, 0
    while pos < len(matches):
        accepted = 0
        while accepted < gamma and pos + accepted < len(matches) and matches[pos + accepted]:
            accepted += 1
        pos += accepted + 1
        rounds += 1
    return len(matches) / rounds


@torch.inference_mode()
def step_costs(models: dict[str, Decoder], prompts: list[list[int]], batch: int, steps: int) -> Times:
    """Seconds of each decode step (forward + logits + argmax) per model, models interleaved each step."""
    rows = [prompts[i % len(prompts)] for i in range(batch)]
    lens, slots = [len(r) for r in rows], list(range(batch))
    caches = {}
    for name, model in models.items():
        caches[name] = model.new_cache(batch, max(lens) + steps + 2)
        model(ForwardBatch.build(rows, [0] * batch, slots, CPU), caches[name])
    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(steps + 2):
        fb = ForwardBatch.build([[r[-1]] for r in rows], [n + step for n in lens], slots, CPU)
        for name, model in models.items():
            start = time.perf_counter()
            model.compute_logits(model(fb, caches[name])[:, -1]).argmax(-1)
            if step >= 2:  # the first steps warm the allocator
                times[name].append(time.perf_counter() - start)
    return times


@torch.inference_mode()
def prefill_costs(models: dict[str, Decoder], prompt: list[int], repeats: int) -> Times:
    """Seconds of each prefill of one prompt into a cache, models interleaved."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            cache = model.new_cache(1, len(prompt))
            start = time.perf_counter()
            model(ForwardBatch.build([prompt], [0], [0], CPU), cache)
            times[name].append(time.perf_counter() - start)
    return times


def _cost_cells(times: Times, base: str, unit: float = 1e3, digits: int = 1) -> list[str]:
    """`median (ratio of medians) [ratio of minima]` per entry; minima are what other processes move least."""
    med, low = statistics.median(times[base]), min(times[base])
    return [
        f"{statistics.median(t) * unit:,.{digits}f} ({statistics.median(t) / med:.2f}) [{min(t) / low:.2f}]"
        for t in times.values()
    ]


def fbgemm_copy(target: Decoder) -> Decoder:
    """The `quantize_dynamic` reference draft: every Linear, lm_head included, as `FbgemmLinear`."""
    draft = copy.deepcopy(target)
    for module in list(draft.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, FbgemmLinear(child))
    return draft


def agreement_table(
    target: Decoder, drafts: dict[str, Decoder], prompts: list[list[int]], new_tokens: int, stepwise: set[str]
) -> None:
    trajectories = greedy(target, prompts, new_tokens)
    wants = [forced_argmax(target, p, c) for p, c in zip(prompts, trajectories, strict=True)]
    print(f"\n## agreement with the fp32 target: {len(prompts)} GSM8K chat prompts x {new_tokens} tokens")
    print("| draft | forwards | agreement | tok/round γ=4 |\n|---|---|---|---|")
    for name, draft in drafts.items():
        modes = {"one forward": forced_argmax} | (
            {"token by token": forced_argmax_stepwise} if name in stepwise else {}
        )
        for mode, run in modes.items():
            matches: list[bool] = []
            for prompt, cont, want in zip(prompts, trajectories, wants, strict=True):
                matches += (run(draft, prompt, cont) == want).tolist()
            agreement = sum(matches) / len(matches)
            print(f"| {name} | {mode} | {agreement:.3f} | {tokens_per_round(matches, 4):.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=25, help="timed decode steps per model and batch size")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds per kernel shape")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--kernel-threads",
        type=int,
        default=2,
        help="threads for the kernel table: 1 suits shared cores, where a 2-thread region can stall ~8 ms",
    )
    parser.add_argument("--skip-kernels", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {capability}")
    print("load average at start: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    if not args.skip_kernels:
        torch.set_num_threads(args.kernel_threads)
        kernel_table(args.rounds)
        torch.set_num_threads(args.threads)

    loaded = load_model(embedded_target_path(install=False), cache_dir=args.cache_dir)
    target = loaded.model.eval()
    drafts = {
        "int8, lm_head int8": quantize_int8(target),
        "int8, lm_head fp32": quantize_int8(target, include_lm_head=False),
        "int8 act_bits=7": quantize_int8(target, act_bits=7),
        "int8 act_bits=6": quantize_int8(target, act_bits=6),
        "fbgemm per-tensor (deprecated)": fbgemm_copy(target),
    }
    prompts = chat_prompts(loaded.tokenizer, args.prompts)
    stepwise = {"int8, lm_head int8", "fbgemm per-tensor (deprecated)"}
    agreement_table(target, drafts, prompts, args.new_tokens, stepwise)

    timed = {"fp32 target": target} | {n: drafts[n] for n in ("int8, lm_head int8", "int8, lm_head fp32")}
    timed["fbgemm (deprecated)"] = drafts["fbgemm per-tensor (deprecated)"]
    print(f"\n## cost: ms, median of {args.steps} decode steps / 5 prefills, interleaved (ratio) [of minima]")
    print("| | " + " | ".join(timed) + " |\n|---|" + "---|" * len(timed))
    rows = {f"decode step, batch {b}": step_costs(timed, prompts, b, args.steps) for b in (1, 8)}
    rows[f"prefill, {len(prompts[0])} tokens"] = prefill_costs(timed, prompts[0], 5)
    for label, times in rows.items():
        print(f"| {label} | " + " | ".join(_cost_cells(times, "fp32 target")) + " |")
    print("load average at end: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
