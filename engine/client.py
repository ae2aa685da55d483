"""EngineClient: what the server sees of the engine (generate, abort, health, info); AsyncEngine runs `Engine.step`
in one dedicated thread and streams each request's `RequestOutput`s through its own asyncio queue (design §8)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from engine.engine import Engine
from engine.scheduler import QueueFullError
from engine.types import EngineLoad, Request, RequestOutput

__all__ = ["QueueFullError"]


class EngineDeadError(RuntimeError):
    """The engine loop failed; no request can run until the server restarts."""


class EngineShutdownError(RuntimeError):
    """The engine is not accepting work (not started yet, or shutting down)."""


class RequestFailedError(RuntimeError):
    """This request failed in the engine (its numerics); the engine goes on serving the others."""


@dataclass(frozen=True, slots=True)
class ProfileInfo:
    """A task profile as loaded: its head (None for `lossless`), default threshold τ and default window W."""

    name: str
    judge_threshold: float
    head_sha256: str | None = None
    layout: str | None = None
    num_speculative_tokens: int | None = None  # None: the engine's default window
    description: str = ""
    thresholds: tuple[float, ...] = ()  # the head's validation-score quantiles, ascending
    threshold_table: tuple[Mapping[str, float], ...] = ()  # per quantile: accept fraction, recall, ...


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """Static facts about the loaded engine, for validation and the model/profile routes."""

    model_name: str
    draft_name: str | None  # None: no draft, plain decoding only
    vocab_size: int
    max_model_len: int
    max_slots: int
    max_waiting: int
    max_speculative_tokens: int
    default_speculative_tokens: int
    bonus_token: bool
    profiles: tuple[ProfileInfo, ...]
    auto_window: bool = False  # the planner picks each row's window (up to its num_speculative_tokens)
    step_cost: Mapping[str, Any] | None = None  # the planner's step-cost profile (engine.spec.cost.StepCost)
    draft_shares_kv: bool = False  # a twin draft reads the target's K/V for context it has not computed


@dataclass(frozen=True, slots=True)
class Health:
    healthy: bool  # False after an engine fault
    accepting: bool  # started and not shutting down
    num_requests: int  # open streams: running plus waiting
    error: str | None = None


Item = RequestOutput | BaseException


class RequestStream:
    """One request's outputs in order; iteration raises the error that ended it. `close()` aborts it if it is
    still running and is safe to call more than once."""

    def __init__(self, request_id: str, on_close: Callable[[str], None]) -> None:
        self.request_id = request_id
        self.admitted_at: float | None = None  # engine clock at the start of the step that first served it
        self.finished = False
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._on_close = on_close

    def put(self, item: Item, step_started: float | None = None) -> None:
        if self.admitted_at is None:
            self.admitted_at = step_started
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._on_close(self.request_id)


class EngineClient(Protocol):
    async def start(self) -> None: ...

    async def generate(self, request: Request) -> RequestStream:
        """Admit a request or raise at once: ValueError (bad request), QueueFullError, EngineShutdownError,
        EngineDeadError. Iterate the stream for outputs; `close()` it on every path."""
        ...

    def abort(self, request_id: str) -> None: ...

    def stop_accepting(self) -> None: ...

    async def drain(self, timeout: float) -> None:
        """Stop admitting, let in-flight requests finish for up to `timeout` seconds, then fail the rest with
        EngineShutdownError (their slots are freed). The engine keeps running."""
        ...

    async def shutdown(self, timeout: float) -> None:
        """`drain(timeout)`, then stop the engine."""
        ...

    def health(self) -> Health: ...

    def info(self) -> EngineInfo: ...

    def load(self) -> EngineLoad:
        """The engine's load now (any thread): what the running, waiting, batch and KV gauges show."""
        ...


class AsyncEngine:
    """`Engine.step` in one thread. The thread drains an inbox of adds and aborts at the top of each step, sleeps
    on an Event when idle, and hands each step's outputs to the event loop in one `call_soon_threadsafe`."""

    def __init__(self, engine: Engine, info: EngineInfo, clock: Callable[[], float] = time.perf_counter) -> None:
        self._engine = engine
        self._info = info
        self._clock = clock
        self._lock = threading.Lock()
        self._inbox: list[Request | str] = []  # a Request to add or a request id to abort
        self._wake = threading.Event()
        self._arrived = threading.Event()  # a Request waits in the inbox (a step may cut its drafting short)
        self._stop = False
        self._dead = False  # set by the engine thread when a step raised: nothing runs any more
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Event-loop-thread state only:
        self._streams: dict[str, RequestStream] = {}
        self._drained = asyncio.Event()
        self._accepting = False
        self._error: str | None = None

    # --- event loop side ----------------------------------------------------------------------------
    async def start(self) -> None:
        assert self._thread is None, "AsyncEngine.start called twice"
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="autojudge-engine", daemon=True)
        self._thread.start()
        self._accepting = True

    async def generate(self, request: Request) -> RequestStream:
        if self._error is not None:
            raise EngineDeadError(f"the engine failed and is not serving: {self._error}")
        if not self._accepting:
            raise EngineShutdownError("the server is not accepting requests (starting up or shutting down)")
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        # NOTE: aborts are posted before later adds and the inbox is FIFO, so the engine never holds more
        # requests than there are open streams; the bound is exact without asking the engine thread.
        if len(self._streams) >= self._info.max_slots + self._info.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self._info.max_waiting} requests)")
        stream = RequestStream(request.request_id, self.abort)
        self._streams[request.request_id] = stream
        self._drained.clear()
        self._post(request)
        return stream

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._post(request_id)
            self._check_drained()

    def stop_accepting(self) -> None:
        self._accepting = False

    async def drain(self, timeout: float) -> None:
        self._accepting = False
        if self._streams:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout)
        for request_id, stream in list(self._streams.items()):
            stream.put(EngineShutdownError("the server shut down before the request finished"))
            self.abort(request_id)

    async def shutdown(self, timeout: float) -> None:
        await self.drain(timeout)
        with self._lock:
            self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def health(self) -> Health:
        return Health(self._error is None, self._accepting and self._error is None, len(self._streams), self._error)

    def info(self) -> EngineInfo:
        return self._info

    def load(self) -> EngineLoad:
        # A failed step leaves its rows in the engine's scheduler, but every one of them has been failed.
        return EngineLoad() if self._dead else self._engine.load

    def _post(self, item: Request | str) -> None:
        with self._lock:
            self._inbox.append(item)
            if not isinstance(item, str):
                self._arrived.set()
        self._wake.set()

    def _deliver(self, items: list[tuple[str, Item]], step_started: float | None) -> None:
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is None:
                continue  # aborted meanwhile
            if isinstance(item, RequestOutput) and item.error is not None:
                item = RequestFailedError(item.error)
            stream.put(item, step_started)
            if isinstance(item, BaseException) or item.finished:
                del self._streams[request_id]
        self._check_drained()

    def _fail_all(self, error: str) -> None:
        self._error = error
        self._accepting = False
        failure = EngineDeadError(f"the engine failed: {error}")
        self._deliver([(rid, failure) for rid in self._streams], None)

    def _check_drained(self) -> None:
        if not self._streams:
            self._drained.set()

    def _call_in_loop(self, fn: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is left to receive
            self._loop.call_soon_threadsafe(fn, *args)

    # --- engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._cycle():
                pass
        except Exception as e:  # any fault fails every in-flight request and marks the engine unhealthy
            self._dead = True
            self._call_in_loop(self._fail_all, f"{type(e).__name__}: {e}")

    def _cycle(self) -> bool:
        """One turn of the loop; False when asked to stop and nothing is left to run."""
        with self._lock:
            items, self._inbox = self._inbox, []
            self._arrived.clear()
            stop = self._stop
        refused = [r for r in (self._apply(item) for item in items) if r is not None]
        if refused:
            self._call_in_loop(self._deliver, refused, None)
        if not self._engine.has_unfinished():
            if stop:
                return False
            self._wake.wait()
            self._wake.clear()  # the inbox is drained next turn, so a post racing with this is not lost
            return True
        started = self._clock()
        outputs = self._engine.step(self._arrived.is_set)
        if outputs:
            self._call_in_loop(self._deliver, [(o.request_id, o) for o in outputs], started)
        return True

    def _apply(self, item: Request | str) -> tuple[str, Item] | None:
        if isinstance(item, str):
            self._engine.abort(item)
            return None
        try:
            self._engine.add_request(item)
        except (ValueError, QueueFullError) as e:
            return item.request_id, e
        return None
