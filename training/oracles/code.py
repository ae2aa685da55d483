"""Code oracle: pull the program out of a response and run unit tests on it in a sandboxed subprocess.

Sandbox per test: a fresh temporary directory as cwd, an isolated interpreter (`-I`: no site, no user paths, no
PYTHON* variables), an environment scrubbed to a fixed minimum, RLIMIT_CPU / RLIMIT_AS / RLIMIT_FSIZE /
RLIMIT_NPROC, its own session, and the whole process group killed on timeout. It stops untrusted model code from
hanging or exhausting the miner; it is not a security boundary against a hostile author (no network or
filesystem namespaces): run mining on a machine you can afford to lose.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

FENCE = "```"


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    timeout_s: float = 6.0  # wall clock per test (the official LiveCodeBench runner uses 6 s)
    cpu_s: int = 10
    memory_bytes: int = 1 << 30
    file_bytes: int = 1 << 20
    max_processes: int = 64


DEFAULT_LIMITS = SandboxLimits()


@dataclass(frozen=True, slots=True)
class TestResult:
    passed: bool
    reason: str  # "ok" | "failed" | "timeout" | "empty"
    detail: str = ""  # last lines of stderr


def extract_program(response: str) -> str:
    """The code between the last two lines that contain a triple backtick; empty with fewer than two."""
    lines = response.split("\n")
    fences = [i for i, line in enumerate(lines) if FENCE in line]
    if len(fences) < 2:
        return ""
    return "\n".join(lines[fences[-2] + 1 : fences[-1]])


def humaneval_program(task_prompt: str, code: str, entry_point: str) -> str:
    """A runnable program: the task's prompt (its imports and signature) then the model's code.

    A response that redefines the function overrides the prompt's stub; one that gives only the body
    continues the prompt's signature.
    """
    if not code.strip():
        return ""
    if f"def {entry_point}" in code:
        return f"{task_prompt}\n    pass\n\n{code}\n"
    return f"{task_prompt}{code}\n"


# The child sets its own limits before running the program: no Python between fork and exec in the miner,
# which has torch's threads running (`preexec_fn` is unsafe there).
_LAUNCHER = """import resource, runpy, sys
for name, value in {limits}:
    resource.setrlimit(getattr(resource, name), (value, value))
runpy.run_path(sys.argv[1], run_name="__main__")
"""


def _launcher(limits: SandboxLimits) -> str:
    pairs = [
        ("RLIMIT_CPU", limits.cpu_s),
        ("RLIMIT_AS", limits.memory_bytes),
        ("RLIMIT_FSIZE", limits.file_bytes),
        ("RLIMIT_NPROC", limits.max_processes),
        ("RLIMIT_CORE", 0),
    ]
    return _LAUNCHER.format(limits=repr(pairs))


def run_test(program: str, test: str, limits: SandboxLimits = DEFAULT_LIMITS) -> TestResult:
    """Run `program` then `test` in a sandboxed interpreter; passed iff it exits 0 within the limits."""
    if not program.strip():
        return TestResult(False, "empty")
    with tempfile.TemporaryDirectory(prefix="autojudge-test-") as tmp:
        path = os.path.join(tmp, "main.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program + "\n\n" + test + "\n")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", _launcher(limits), path],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so a timeout kills every child too
        )
        try:
            _, err = proc.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return TestResult(False, "timeout")
        finally:
            _kill_group(proc)  # reap anything the program left running in its group
        tail = err.decode("utf-8", "replace")[-2000:]
        return TestResult(proc.returncode == 0, "ok" if proc.returncode == 0 else "failed", tail)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_tests(program: str, tests: list[str], limits: SandboxLimits = DEFAULT_LIMITS) -> TestResult:
    """Score 1 iff every test passes; stops at the first failure."""
    result = TestResult(False, "empty")
    for test in tests:
        result = run_test(program, test, limits)
        if not result.passed:
            return result
    return result
