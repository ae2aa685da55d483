"""A task's outcome of a generated response (what mining labels compare) and its ground-truth verdict."""

from __future__ import annotations

from training.data import Problem
from training.oracles.code import DEFAULT_LIMITS, SandboxLimits, extract_program, humaneval_program, run_test
from training.oracles.math import extract_answer


def outcome(problem: Problem, generated: str, limits: SandboxLimits = DEFAULT_LIMITS) -> str | None:
    """math: the final answer (None if none); code: "pass" or "fail" of the task's tests."""
    if problem.task == "math":
        return extract_answer(generated)
    program = humaneval_program(problem.code_prompt, extract_program(generated), problem.entry_point)
    return "pass" if run_test(program, problem.reference, limits).passed else "fail"


def is_correct(problem: Problem, result: str | None) -> bool:
    """Ground truth: the reference answer (math) or all tests passing (code)."""
    if problem.task == "math":
        return result is not None and result == problem.reference
    return result == "pass"
