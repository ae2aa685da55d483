"""Real processes on loopback for the live tests: a free port, a child process with its log, and the argv of an
embedded-pair server sized for two busy cores."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

START_TIMEOUT = 240.0  # loading + warm-up of the embedded pair on 2 busy cores
STOP_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """A child in its own session with its output in a file; `stop` sends SIGTERM, then SIGKILL."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        environ = {**os.environ, **(env or {})}
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=environ
            )

    def wait_until(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.log.name}: exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(url, timeout=5.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.5)
        pytest.fail(f"{self.log.name}: {url} not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def rss_bytes(self) -> int:
        """Resident memory of the child now (Linux)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")


def deploy_tool(name: str, package: str, path: str | None = None) -> str:
    """The binary of a Debian package the deployment tests need; skipped when absent, except in CI
    (AUTOJUDGE_REQUIRE_DEPLOY_TOOLS=1), where that is a failure."""
    found = shutil.which(name) or shutil.which(name, path=path or "/usr/sbin:/sbin")
    if found is None:
        reason = f"no `{name}` binary (Debian package `{package}`)"
        if os.environ.get("AUTOJUDGE_REQUIRE_DEPLOY_TOOLS") == "1":
            pytest.fail(reason + " while AUTOJUDGE_REQUIRE_DEPLOY_TOOLS=1")
        pytest.skip(reason)
    return found


def embedded_server(port: int, model: str, *args: str) -> list[str]:
    """`autojudge-serve` on the embedded pair: 4 slots, a 512-token context, one torch thread."""
    serve = str(Path(sys.executable).parent / "autojudge-serve")
    argv = [serve, "--host", "127.0.0.1", "--port", str(port), "--served-model-name", model]
    return [*argv, "--max-slots", "4", "--max-model-len", "512", "--threads", "1", "--log-level", "warning", *args]
