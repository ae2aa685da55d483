"""Scheduling: a closed loop (N users, each sending its next request when its last one ends) or an open loop
(seeded Poisson arrivals, optionally capped in flight), until --num-requests were sent or --duration passed."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator

from loadtest.config import LoadConfig
from loadtest.result import RequestResult

Send = Callable[[int], Awaitable[RequestResult]]


def poisson_arrivals(rate: float, seed: int) -> Iterator[float]:
    """Arrival times in seconds from the start: the first at 0, then exponential gaps of mean 1/rate, by inverse
    transform of `random.Random(seed)` (whose sequence Python keeps stable), so a seed fixes the schedule."""
    rng = random.Random(seed)
    t = 0.0
    while True:
        yield t
        t += -math.log(1.0 - rng.random()) / rate


async def run(
    cfg: LoadConfig, send: Send, on_result: Callable[[RequestResult], None] | None = None
) -> list[RequestResult]:
    """Send requests 0, 1, ... as `cfg` schedules them; returns their results in completion order. When the
    duration ends, requests in flight get `cfg.grace` seconds more, then are cancelled and recorded as such."""
    loop = asyncio.get_running_loop()
    deadline = math.inf if cfg.duration is None else loop.time() + cfg.duration
    results: list[RequestResult] = []
    issued = 0

    def more() -> bool:
        """Whether neither the count nor the duration is used up."""
        return (cfg.num_requests is None or issued < cfg.num_requests) and loop.time() < deadline

    def take() -> int:
        nonlocal issued  # one event loop: no lock needed
        issued += 1
        return issued - 1

    def record(result: RequestResult) -> None:
        results.append(result)
        if on_result is not None:
            on_result(result)

    async def one(index: int) -> None:
        start = time.perf_counter()
        try:
            result = await send(index)
        except asyncio.CancelledError:
            record(RequestResult(index, start, time.perf_counter() - start, "cancelled", "cut at the end of the run"))
            raise
        record(result)

    async def user() -> None:
        while more():
            await one(take())

    async def capped(index: int, cap: asyncio.Semaphore) -> None:
        try:
            await one(index)
        finally:
            cap.release()

    async def arrivals(rate: float, launched: list[asyncio.Task[None]]) -> None:
        cap = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency is not None else None
        start = loop.time()
        for t in poisson_arrivals(rate, cfg.seed):
            if start + t >= deadline or not more():
                return
            await asyncio.sleep(start + t - loop.time())
            if cap is not None:
                await cap.acquire()  # a full cap delays arrivals; the late ones then leave at once
                if not more():  # the duration may have ended meanwhile
                    return
            index = take()
            launched.append(asyncio.create_task(one(index) if cap is None else capped(index, cap)))

    cutoff = deadline + cfg.grace
    if cfg.rate is None:
        assert cfg.concurrency is not None
        await finish({asyncio.create_task(user()) for _ in range(cfg.concurrency)}, cutoff)
    else:
        launched: list[asyncio.Task[None]] = []
        await finish({asyncio.create_task(arrivals(cfg.rate, launched))}, cutoff)
        await finish(set(launched), cutoff)
    return results


async def finish(tasks: set[asyncio.Task[None]], cutoff: float) -> None:
    """Wait for `tasks` until the loop time `cutoff` (inf: no limit), then cancel what is left and let it unwind."""
    if not tasks:
        return
    timeout = None if math.isinf(cutoff) else max(0.0, cutoff - asyncio.get_running_loop().time())
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()  # a bug in a request surfaces here, not as a warning at exit
