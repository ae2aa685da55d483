"""A real uvicorn on loopback with a tiny engine: the official `openai` client, streaming and not; 16 concurrent
greedy streams equal 16 sequential requests; a client that disconnects, mid-stream or while waiting for a plain
response, frees its slot at once; a graceful shutdown with a stream in flight."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import threading
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvicorn

from server.main import GracefulServer
from server.settings import Settings
from test_client import one_torch_thread, wait_for  # noqa: F401 (an autouse fixture)
from test_server_api import MODEL, PROMPT, Served, build_app, sample

KEY = "test-key"


def loopback(s: Served) -> uvicorn.Config:
    return uvicorn.Config(s.app, host="127.0.0.1", port=0, log_level="warning")


@contextlib.contextmanager
def running(s: Served, server: uvicorn.Server | None = None) -> Iterator[str]:
    """Serve the app on a free loopback port in a thread (lifespan included); yields the base URL."""
    server = server or uvicorn.Server(loopback(s))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive())
        assert server.started, "uvicorn did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        s.gate.release()
        server.should_exit = True
        thread.join(timeout=60)
    assert not thread.is_alive(), "the server did not shut down"


@pytest.fixture
def server_url(target, draft) -> Iterator[str]:
    with running(build_app(target, draft, Settings(api_key=KEY))) as url:
        yield url


def test_openai_client_completions_and_chat(server_url):
    client = openai.OpenAI(base_url=f"{server_url}/v1", api_key=KEY, max_retries=0)
    extra = {"task_profile": "lossless", "num_speculative_tokens": 3}
    done = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, extra_body=extra)
    assert done.usage is not None and done.usage.completion_tokens == 12
    assert done.choices[0].finish_reason == "length"
    metrics = (done.model_extra or {})["metrics"]
    assert metrics["judge"]["num_speculative_tokens"] == 3

    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, extra_body=extra, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text

    messages = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts = list(stream)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == chat.choices[0].message.content
    assert parts[-1].choices == [] and parts[-1].usage is not None and parts[-1].usage.completion_tokens == 10
    assert "speculative_decoding" in (parts[-1].model_extra or {})["metrics"]


def test_openai_client_sees_typed_errors(server_url):
    client = openai.OpenAI(base_url=f"{server_url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, extra_body={"judge_threshold": 2})
    assert bad.value.body["param"] == "judge_threshold"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server_url}/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(f"{server_url}/health").status_code == 200


def test_sixteen_concurrent_greedy_streams_equal_sequential_requests(target, draft):
    prompts = [f"{PROMPT} {i} " + "ab" * (i % 5) for i in range(16)]
    with running(build_app(target, draft, Settings(), slots=4, max_waiting=16)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        sequential = [
            client.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0).choices[0].text
            for p in prompts
        ]

        async def stream_one(aclient: openai.AsyncOpenAI, prompt: str) -> str:
            chunks = await aclient.completions.create(
                model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True
            )
            return "".join([c.choices[0].text async for c in chunks])

        async def concurrent() -> list[str]:
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as aclient:
                return list(await asyncio.gather(*(stream_one(aclient, p) for p in prompts)))

        streamed = asyncio.run(concurrent())
    assert len(set(sequential)) > 1, "prompts must give different texts"
    assert streamed == sequential


def test_disconnect_mid_stream_aborts_and_frees_the_slot(target, draft):
    s = build_app(target, draft, Settings())
    with running(s) as url:
        s.gate.hold_after(1)  # the engine pauses after its first step, so the request cannot finish meanwhile
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 120, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
        wait_for(lambda: s.client.health().num_requests == 0)
        s.gate.release()
        wait_for(lambda: not s.engine.has_unfinished())
        assert s.engine.num_free_slots == 4
        metrics = httpx.get(f"{url}/metrics").text
    assert '"text"' in first
    labels = {"model_name": MODEL, "task_profile": "lossless"}
    assert sample(metrics, "autojudge_request_success_total", finished_reason="abort", **labels) == 1
    assert sample(metrics, "autojudge_request_success_total", finished_reason="length", **labels) == 0
    assert sample(metrics, "autojudge_generation_tokens_total", **labels) < 120


def test_disconnect_while_waiting_for_a_plain_completion_aborts_it(target, draft):
    s = build_app(target, draft, Settings())
    with running(s) as url:
        s.gate.hold_after(1)  # the engine pauses after one step: the request is mid-generation when the client goes
        body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 120, "temperature": 0}).encode()
        head = "POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\n\r\n"
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head.encode() + body)
            wait_for(lambda: s.gate.steps > 0 and s.client.health().num_requests == 1)
        wait_for(lambda: s.client.health().num_requests == 0)  # released while the engine is still held
        s.gate.release()
        wait_for(lambda: not s.engine.has_unfinished())
        assert s.engine.num_free_slots == 4
        metrics = httpx.get(f"{url}/metrics").text
    labels = {"model_name": MODEL, "task_profile": "lossless"}
    assert sample(metrics, "autojudge_request_success_total", finished_reason="abort", **labels) == 1
    assert sample(metrics, "autojudge_request_success_total", finished_reason="length", **labels) == 0
    assert sample(metrics, "http_requests_total", handler="/v1/completions", status="499") == 1


@pytest.mark.parametrize("in_time", [True, False], ids=["stream-finishes", "deadline-aborts"])
def test_graceful_shutdown_with_a_stream_in_flight(target, draft, in_time):
    s = build_app(target, draft, Settings())
    server = GracefulServer(loopback(s), s.client, drain_timeout=60 if in_time else 0.01)
    with running(s, server) as url:
        s.gate.hold_after(1)  # the stream stays in flight until the test lets the engine go on
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            first = next(lines)
            server.handle_exit(signal.SIGTERM, None)
            if in_time:  # the deadline is far: new work is refused while the listener stays open
                refused = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
                ready, health = httpx.get(f"{url}/ready"), httpx.get(f"{url}/health")
                s.gate.release()
            rest = list(lines)
        wait_for(lambda: not any(srv.is_serving() for srv in server.servers))  # it closes on its own, drained
        s.gate.release()
    assert '"text"' in first and rest[-1] == "data: [DONE]"
    last = json.loads(rest[-2].removeprefix("data: "))
    if in_time:
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "overloaded_error"
        assert ready.status_code == 503 and health.status_code == 200
        assert last["choices"][0]["finish_reason"] == "length"
        assert all("error" not in line for line in rest)
    else:
        assert last["error"]["type"] == "overloaded_error" and "shut down" in last["error"]["message"]
    assert not s.engine.has_unfinished() and s.engine.num_free_slots == 4
    assert s.client.health().num_requests == 0 and not s.client.health().accepting


def test_drain_grace_turns_ready_off_first_and_keeps_serving_until_it_ends(target, draft):
    server: GracefulServer | None = None
    s = build_app(target, draft, Settings(), draining=lambda: server is not None and server.draining)
    server = GracefulServer(loopback(s), s.client, drain_timeout=60, drain_grace=600)
    with running(s, server) as url:
        server.handle_exit(signal.SIGTERM, None)
        ready = httpx.get(f"{url}/ready")
        served = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        server.drain_grace = 0  # the grace ends: the next tick stops admitting and drains
        wait_for(lambda: not s.client.health().accepting)
        wait_for(lambda: not any(srv.is_serving() for srv in server.servers))
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
    assert served.status_code == 200  # a balancer that has not noticed yet loses nothing
