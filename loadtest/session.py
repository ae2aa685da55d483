"""One load test end to end over an httpx client: the model (GET /v1/models), the warm-up, the measured run
behind a progress bar, and the report document."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
from tqdm import tqdm

from loadtest import report, runner
from loadtest.client import Target, send
from loadtest.config import LoadConfig, LoadTestError
from loadtest.result import RequestResult


def http_client(cfg: LoadConfig) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    return httpx.AsyncClient(
        base_url=cfg.root_url,
        headers=headers,
        timeout=httpx.Timeout(cfg.timeout),
        # No pool limit: one would queue requests inside the client and add the wait to their latency.
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        trust_env=False,  # a proxy from the environment would be measured instead of the endpoint
    )


async def execute(cfg: LoadConfig, http: httpx.AsyncClient, prompts: list[dict[str, Any]]) -> report.Json:
    """Requests cycle through `prompts`, warm-ups first, so the measured ones do not repeat the warm-ups'."""
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    model = await discover_model(cfg, http)
    version = await server_version(http)
    target = Target.of(cfg, model)

    def sender(offset: int) -> runner.Send:
        return lambda i: send(http, target, prompts[(offset + i) % len(prompts)], offset + i)

    warmup: list[RequestResult] = []
    if cfg.warmup:
        # A closed loop at the run's concurrency, so that the measured run finds its connections open.
        users = min(cfg.warmup, cfg.concurrency or cfg.max_concurrency or 1)
        warm = dataclasses.replace(cfg, concurrency=users, rate=None, max_concurrency=None,
                                   num_requests=cfg.warmup, duration=None)  # fmt: skip
        with progress(cfg, "warm-up", cfg.warmup) as on_result:
            warmup = await runner.run(warm, sender(0), on_result)
    with progress(cfg, "requests", cfg.num_requests) as on_result:
        start = time.perf_counter()
        results = await runner.run(cfg, sender(cfg.warmup), on_result)
        wall = time.perf_counter() - start
    return report.build(report.Run(cfg, model, version, started_at, len(prompts), start, wall, warmup, results))


async def discover_model(cfg: LoadConfig, http: httpx.AsyncClient) -> str:
    """`--model`, else the first id of GET /v1/models; this request also proves the server reachable."""
    url = f"{cfg.root_url}/v1/models"
    try:
        response = await http.get("/v1/models")
    except httpx.HTTPError as e:
        raise LoadTestError(f"cannot reach {cfg.root_url} ({type(e).__name__}: {e})") from e
    if response.status_code in (401, 403):
        raise LoadTestError(f"{url} answered {response.status_code}: check --api-key")
    if cfg.model is not None:
        return cfg.model
    if response.status_code != 200:
        raise LoadTestError(f"{url} answered {response.status_code}; name the model with --model")
    try:
        model = response.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        model = None
    if not isinstance(model, str):
        raise LoadTestError(f"{url} lists no model id; name the model with --model")
    return model


async def server_version(http: httpx.AsyncClient) -> dict[str, Any] | None:
    """GET /version (ours and vLLM's have one), recorded in the report; None for a server without it."""
    try:
        response = await http.get("/version")
        obj = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


@contextlib.contextmanager
def progress(cfg: LoadConfig, desc: str, total: int | None) -> Iterator[Callable[[RequestResult], None]]:
    """A tqdm bar on stderr counting finished requests and failures; off with --no-progress or off a terminal."""
    bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, disable=not cfg.progress or not sys.stderr.isatty())
    failed = 0

    def on_result(result: RequestResult) -> None:
        nonlocal failed
        failed += not result.ok
        bar.set_postfix(failed=failed, refresh=False)
        bar.update()

    try:
        yield on_result
    finally:
        bar.close()
