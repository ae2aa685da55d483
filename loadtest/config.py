"""The settings of one load test (a frozen dataclass whose defaults are the CLI's), their checks, and the errors
that end a run with a message instead of a traceback."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ENDPOINTS = ("completions", "chat")
PROMPT_SETS = ("builtin", "gsm8k")
# The project checkout keeps its data next to it, as training/ does; any folder can be given with --data-dir.
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


class LoadTestError(Exception):
    """A run that cannot start or finish (unreachable server, refused credentials, unwritable output)."""

    status = 1


class UsageError(LoadTestError):
    """Bad arguments or prompt files: exit status 2, as argparse's own errors."""

    status = 2


@dataclass(frozen=True)
class LoadConfig:
    base_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    model: str | None = None  # None: the first id of GET /v1/models
    endpoint: str = "completions"
    stream: bool = True
    concurrency: int | None = 1  # closed-loop users; None in an open loop
    rate: float | None = None  # open loop: Poisson arrivals per second
    max_concurrency: int | None = None  # open loop: requests in flight at most
    num_requests: int | None = None
    duration: float | None = None
    grace: float = 10.0  # seconds in-flight requests get after --duration before they are cancelled
    warmup: int = 0
    timeout: float = 600.0
    prompts: str = "builtin"
    prompts_file: Path | None = None
    data_dir: Path = DEFAULT_DATA_DIR
    max_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    task_profile: str | None = None
    judge_threshold: float | None = None
    num_speculative_tokens: int | None = None
    speculative_window: str | None = None  # auto | fixed
    # Goodput SLOs in milliseconds (vLLM bench's `--goodput ttft:... tpot:... e2el:...`); None: not part of it.
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_e2e_ms: float | None = None
    out_json: Path | None = None
    out_md: Path | None = None
    progress: bool = True

    @property
    def root_url(self) -> str:
        """The server's root: `--base-url` with or without the `/v1` that OpenAI SDK base URLs end with."""
        return self.base_url.rstrip("/").removesuffix("/v1")

    def problems(self) -> list[str]:
        """What is wrong with these settings, one message per problem; empty when they can run."""
        out = []
        url = urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            out.append(f"--base-url must be an http(s) URL such as http://127.0.0.1:8000, not {self.base_url!r}")
        if self.num_requests is None and self.duration is None:
            out.append("give --num-requests and/or --duration")
        if self.num_requests is not None and self.num_requests < 1:
            out.append("--num-requests must be >= 1")
        if self.duration is not None and not self.duration > 0:
            out.append("--duration must be > 0")
        if (self.concurrency is None) == (self.rate is None):
            out.append("give one of --concurrency (closed loop) and --rate (open loop)")
        if self.concurrency is not None and self.concurrency < 1:
            out.append("--concurrency must be >= 1")
        if self.rate is not None and not (math.isfinite(self.rate) and self.rate > 0):
            out.append("--rate must be a finite number of requests per second > 0")
        if self.max_concurrency is not None and (self.rate is None or self.max_concurrency < 1):
            out.append("--max-concurrency caps an open loop (--rate) and must be >= 1")
        if self.warmup < 0:
            out.append("--warmup must be >= 0")
        if not self.grace >= 0:
            out.append("--grace must be >= 0")
        if not self.timeout > 0:
            out.append("--timeout must be > 0")
        if self.max_tokens < 1:
            out.append("--max-tokens must be >= 1")
        if not self.temperature >= 0:
            out.append("--temperature must be >= 0")
        if self.judge_threshold is not None and not 0 <= self.judge_threshold <= 1:
            out.append("--judge-threshold must be in [0, 1]")
        if self.speculative_window not in (None, "auto", "fixed"):
            out.append("--speculative-window must be auto or fixed")
        if self.num_speculative_tokens is not None and self.num_speculative_tokens < 0:
            out.append("--num-speculative-tokens must be >= 0")
        for name in ("slo_ttft_ms", "slo_tpot_ms", "slo_e2e_ms"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                out.append(f"--{name.replace('_', '-')} must be a number of milliseconds > 0")
        return out

    def slos(self) -> dict[str, float]:
        """The goodput SLOs given, in seconds, keyed like the latency distributions (ttft, tpot, e2e)."""
        given = {"ttft": self.slo_ttft_ms, "tpot": self.slo_tpot_ms, "e2e": self.slo_e2e_ms}
        return {k: v / 1000 for k, v in given.items() if v is not None}

    def record(self) -> dict[str, Any]:
        """Every setting as JSON values, for the report; the API key itself never leaves the process."""
        out = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}
        out["api_key"] = None if self.api_key is None else "<set>"
        return out
