"""The server listens while the models load: probes and routes answer 503 until the app has started, a failed
load or start-up is reported and stops the server, and a stop during loading does not wait for the load."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp

from server.loading import Deferred
from server.settings import Settings
from test_client import one_torch_thread, wait_for  # noqa: F401 (an autouse fixture)
from test_server_api import MODEL, PROMPT, build_app


@contextlib.contextmanager
def serving(load: Callable[[], ASGIApp]) -> Iterator[tuple[str, list[BaseException], uvicorn.Server]]:
    failures: list[BaseException] = []

    def on_failure(e: BaseException) -> None:
        failures.append(e)
        server.should_exit = True

    server = uvicorn.Server(uvicorn.Config(Deferred(load, on_failure), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive())
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", failures, server
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    assert not thread.is_alive(), "the server did not shut down"


def test_probes_and_routes_answer_503_while_loading_then_the_app_serves(target, draft):
    release = threading.Event()
    s = build_app(target, draft, Settings())

    def load() -> ASGIApp:
        release.wait(60)
        return s.app

    with serving(load) as (url, failures, _):
        health, ready = httpx.get(f"{url}/health"), httpx.get(f"{url}/ready")
        assert (health.status_code, health.content, ready.status_code) == (503, b"", 503)
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"] == {
            "message": "the model is loading; retry shortly",
            "type": "overloaded_error",
            "param": None,
            "code": "loading",
        }
        assert httpx.get(f"{url}/metrics").status_code == 503  # Prometheus sees the target down, not empty
        release.set()
        wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200)
        assert httpx.get(f"{url}/health").status_code == 200
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert not failures
    # the real app's lifespan ran its shutdown: the engine thread stopped and no slot is held
    assert not s.client.health().accepting
    assert s.engine.num_free_slots == 4


def test_a_failed_load_is_reported_and_stops_the_server():
    release = threading.Event()

    def load() -> ASGIApp:
        release.wait(60)
        raise FileNotFoundError("no model at /models/x")

    with serving(load) as (url, failures, server):
        assert httpx.get(f"{url}/health").status_code == 503
        release.set()
        wait_for(lambda: not any(srv.is_serving() for srv in server.servers))
    assert isinstance(failures[0], FileNotFoundError) and "no model" in str(failures[0])


def test_a_failed_application_start_up_is_reported():
    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("warm-up failed: out of memory")
        yield

    release = threading.Event()

    def load() -> ASGIApp:
        release.wait(60)
        return Starlette(lifespan=lifespan)

    with serving(load) as (url, failures, server):
        assert httpx.get(f"{url}/ready").status_code == 503
        release.set()
        wait_for(lambda: bool(failures))
        wait_for(lambda: not any(srv.is_serving() for srv in server.servers))
    assert isinstance(failures[0], RuntimeError) and "warm-up failed: out of memory" in str(failures[0])


def test_a_stop_during_loading_does_not_wait_for_the_load():
    release = threading.Event()
    loaded = threading.Event()

    def load() -> ASGIApp:
        release.wait(60)
        loaded.set()
        return Starlette()

    with serving(load) as (url, failures, server):
        assert httpx.get(f"{url}/ready").status_code == 503
        server.should_exit = True
        wait_for(lambda: not any(srv.is_serving() for srv in server.servers))
    assert not loaded.is_set() and not failures
    release.set()
