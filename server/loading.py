"""`Deferred`: an ASGI app that listens while the models load. Until the real app is built and its lifespan has
started (engine thread, warm-up), `/health` and `/ready` answer 503 with an empty body and every other route a
503 OpenAI-style error, so container health checks and load balancers see "starting", not "connection refused"."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, error_response

log = logging.getLogger("autojudge.server")

PROBES = ("/health", "/ready")


class Deferred:
    """`load()` runs in a thread after uvicorn's start-up and returns the real app; its lifespan is then driven
    from here. A failure in either is logged and reported through `on_failure` (the server then exits)."""

    def __init__(self, load: Callable[[], ASGIApp], on_failure: Callable[[BaseException], None]) -> None:
        self.load = load
        self.on_failure = on_failure
        self.app: ASGIApp | None = None  # set once its lifespan startup has completed
        self._loading: asyncio.Task[None] | None = None
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()  # lifespan messages to the real app
        self._outbox: asyncio.Queue[Message] = asyncio.Queue()  # its replies
        self._lifespan: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._serve_lifespan(receive, send)
        elif self.app is not None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await self._loading_response(scope, receive, send)
        # a websocket before the app exists: returning without accepting closes it

    async def _loading_response(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] in PROBES:
            await send({"type": "http.response.start", "status": 503, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        error = APIError(503, "the model is loading; retry shortly", "overloaded_error", None, "loading")
        error.headers = {"Retry-After": "5"}
        await error_response(error)(scope, receive, send)

    async def _serve_lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._loading = asyncio.create_task(self._load())
                await send({"type": "lifespan.startup.complete"})  # listen now; the models load behind
            elif message["type"] == "lifespan.shutdown":
                await self._shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _load(self) -> None:
        try:
            app = await self._load_in_thread()
            self._lifespan = asyncio.create_task(self._run_lifespan(app))
            await self._inbox.put({"type": "lifespan.startup"})
            reply = await self._outbox.get()
            if reply["type"] != "lifespan.startup.complete":
                raise RuntimeError(reply.get("message") or "the application's start-up failed")
            self.app = app
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a missing model, a bad head, no memory, a failed warm-up
            self.on_failure(e)

    async def _load_in_thread(self) -> ASGIApp:
        """A daemon thread rather than the default executor, so a stop during loading need not wait for it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ASGIApp] = loop.create_future()

        def settle(result: ASGIApp | BaseException) -> None:
            if future.done():  # cancelled by a shutdown meanwhile
                return
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

        def work() -> None:
            result: ASGIApp | BaseException
            try:
                result = self.load()
            except BaseException as e:
                result = e
            with contextlib.suppress(RuntimeError):  # the loop closed: the server stopped meanwhile
                loop.call_soon_threadsafe(settle, result)

        threading.Thread(target=work, name="autojudge-load", daemon=True).start()
        return await future

    async def _run_lifespan(self, app: ASGIApp) -> None:
        scope: dict[str, Any] = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        try:
            await app(scope, self._inbox.get, self._send_reply)
        except BaseException as e:  # Starlette re-raises a lifespan error after reporting it
            await self._outbox.put({"type": "lifespan.failed", "message": f"{type(e).__name__}: {e}"})

    async def _send_reply(self, message: Message) -> None:
        await self._outbox.put(message)

    async def _shutdown(self) -> None:
        if self._loading is not None and not self._loading.done():
            # NOTE: a load in its thread cannot be interrupted; it is a daemon, so the process still exits.
            self._loading.cancel()
        if self.app is not None and self._lifespan is not None:
            await self._inbox.put({"type": "lifespan.shutdown"})
            reply = await self._outbox.get()
            if reply["type"] != "lifespan.shutdown.complete":
                log.error("shutdown: %s", reply.get("message", reply["type"]))
