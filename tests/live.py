"""Real processes on loopback for the live tests: a free port, a child process with its log, the argv of an
embedded-pair server sized for two busy cores, and a set of such servers as replicas."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import httpx
import pytest

from test_server_api import sample

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


def missing(reason: str) -> NoReturn:
    """A deployment tool the test needs is absent: a skip, except in CI (AUTOJUDGE_REQUIRE_DEPLOY_TOOLS=1), where
    it is a failure."""
    if os.environ.get("AUTOJUDGE_REQUIRE_DEPLOY_TOOLS") == "1":
        pytest.fail(reason + " while AUTOJUDGE_REQUIRE_DEPLOY_TOOLS=1")
    pytest.skip(reason)


def deploy_tool(name: str, package: str, path: str | None = None) -> str:
    """The binary of a Debian package the deployment tests need."""
    found = shutil.which(name) or shutil.which(name, path=path or "/usr/sbin:/sbin")
    if found is None:
        missing(f"no `{name}` binary (Debian package `{package}`)")
    return found


def embedded_server(port: int, model: str, *args: str) -> list[str]:
    """`autojudge-serve` on the embedded pair: 4 slots, a 512-token context, one torch thread."""
    serve = str(Path(sys.executable).parent / "autojudge-serve")
    argv = [serve, "--host", "127.0.0.1", "--port", str(port), "--served-model-name", model]
    return [*argv, "--max-slots", "4", "--max-model-len", "512", "--threads", "1", "--log-level", "warning", *args]


@dataclass
class Replicas:
    """Named embedded-pair servers on loopback, each restartable on its own port; read through their metrics."""

    work: Path
    model: str
    args: tuple[str, ...]
    ports: dict[str, int]
    procs: dict[str, Process] = field(default_factory=dict)

    def start(self, name: str) -> None:
        argv = embedded_server(self.ports[name], self.model, *self.args)
        self.procs[name] = Process(argv, self.work / f"{name}-{time.monotonic_ns()}.log")

    def start_all(self) -> None:
        for name in self.ports:
            self.start(name)
        for name in self.ports:
            self.wait_ready(name)

    def wait_ready(self, name: str) -> None:
        self.procs[name].wait_until(self.url(name) + "/ready", START_TIMEOUT)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.stop()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def metric(self, name: str, series: str, **labels: str) -> float:
        """One sample of a replica's `/metrics`, summed over the label values not given."""
        text = httpx.get(self.url(name) + "/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith((series + "{", series + " ")):
                total += sample(line, series, **labels)
        return total

    def served(self, name: str) -> float:
        """Requests a replica has finished."""
        return self.metric(name, "autojudge_request_success_total")

    def running(self, name: str) -> float:
        return self.metric(name, "autojudge_num_requests_running", model_name=self.model)
