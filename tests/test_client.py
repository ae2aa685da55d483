"""AsyncEngine: the engine thread gives the same tokens as driving `Engine` directly, aborts free slots, the queue
bound is exact, an engine fault fails in-flight requests and marks the engine unhealthy, shutdown is clean."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from test_autowindow_engine import DRAFTS_PAY

from conftest import overflowing, run_all
from engine import (
    AsyncEngine,
    CacheConfig,
    Engine,
    EngineConfig,
    EngineDeadError,
    EngineShutdownError,
    QueueFullError,
    Request,
    RequestFailedError,
    SamplingParams,
    SchedulerConfig,
    SpecConfig,
    SpecParams,
    StepStats,
)
from engine.build import engine_info
from engine.client import ProfileInfo
from engine.spec.cost import StepCost
from engine.spec.judging import LOSSLESS, HeadJudge, MismatchJudge

MAX_MODEL_LEN = 160
NAN_TOKEN = 5  # `overflowing`: none of the prompts below but the failing one holds it


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy machine their barriers stall each step."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Gate:
    """An `on_step` hook that can hold the engine thread after a given step, so tests control timing."""

    def __init__(self, then: Callable[[StepStats], None] | None = None) -> None:
        self.then = then
        self.steps = 0
        self.pause_after: int | None = None
        self.opened = threading.Event()
        self.opened.set()

    def hold_after(self, steps: int) -> None:
        self.pause_after = self.steps + steps
        self.opened.clear()

    def release(self) -> None:
        self.opened.set()

    def __call__(self, stats: StepStats) -> None:
        if self.then is not None:
            self.then(stats)
        self.steps += 1
        if self.pause_after is not None and self.steps > self.pause_after:
            assert self.opened.wait(timeout=60), "a test forgot to release the engine"


def tiny_engine(
    target,
    draft,
    *,
    slots: int = 4,
    max_waiting: int = 16,
    judge: MismatchJudge | None = None,
    on_step: Callable[[StepStats], None] | None = None,
    detokenize: Callable[[list[int]], str] | None = None,
    name: str = "tiny",
    step_cost: StepCost | None = None,
) -> tuple[Engine, AsyncEngine]:
    """`step_cost` turns on `auto` windows (capped at 8) with that cost model."""
    auto = step_cost is not None
    config = EngineConfig(
        cache=CacheConfig(max_slots=slots, max_model_len=MAX_MODEL_LEN),
        spec=SpecConfig(max_speculative_tokens=8, default_speculative_tokens=8 if auto else 4, auto_window=auto),
        scheduler=SchedulerConfig(max_waiting=max_waiting),
    )
    engine = Engine(config, target, draft, judge=judge, on_step=on_step, detokenize=detokenize, step_cost=step_cost)
    profiles = (ProfileInfo(LOSSLESS, 0.0),)
    if isinstance(judge, HeadJudge):
        profiles += tuple(
            ProfileInfo(n, h.default_threshold, h.meta["tensors_sha256"], h.layout) for n, h in judge.heads.items()
        )
    return engine, AsyncEngine(engine, engine_info(engine, name, "tiny-draft" if draft else None, profiles))


def wait_for(condition: Callable[[], bool]) -> None:
    """Poll a condition another thread makes true; the limit only turns a hang into a failure."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.005)


async def async_wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.005)


def requests(n: int, max_tokens: int = 20) -> list[Request]:
    out = []
    for i in range(n):
        prompt = tuple((7 * i + 3 * j + 1) % 97 for j in range(3 + i % 5))
        out.append(Request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens), SpecParams()))
    return out


async def collect(client: AsyncEngine, request: Request) -> tuple[list[int], str | None]:
    stream = await client.generate(request)
    tokens: list[int] = []
    reason = None
    try:
        async for out in stream:
            tokens += out.new_token_ids
            reason = out.finish_reason
    finally:
        stream.close()
    return tokens, reason


def test_concurrent_requests_match_the_synchronous_engine(target, draft):
    reqs = requests(10)
    expected, _ = run_all(tiny_engine(target, draft)[0], reqs)
    engine, client = tiny_engine(target, draft)

    async def scenario():
        await client.start()
        results = await asyncio.gather(*(collect(client, r) for r in reqs))
        await client.shutdown(5)
        return results

    results = asyncio.run(scenario())
    assert [tokens for tokens, _ in results] == [expected[r.request_id] for r in reqs]
    assert {reason for _, reason in results} == {"length"}
    assert not engine.has_unfinished() and engine.num_free_slots == 4


def test_closing_a_stream_aborts_and_frees_the_slot(target, draft):
    steps: list[StepStats] = []
    gate = Gate(steps.append)
    engine, client = tiny_engine(target, draft, on_step=gate)
    request = requests(1, max_tokens=100)[0]

    async def scenario():
        await client.start()
        gate.hold_after(1)
        stream = await client.generate(request)
        first = await anext(stream)
        stream.close()
        assert client.health().num_requests == 0
        gate.release()
        await async_wait_for(lambda: not engine.has_unfinished())
        await client.shutdown(5)
        return first

    first = asyncio.run(scenario())
    assert not first.finished and first.new_token_ids
    assert engine.num_free_slots == 4
    assert sum(s.num_generated_tokens for s in steps) < 100, "the request ran to the end instead of aborting"


def test_queue_bound_counts_running_and_waiting(target, draft):
    gate = Gate()
    engine, client = tiny_engine(target, draft, slots=2, max_waiting=1, on_step=gate)

    async def scenario():
        await client.start()
        gate.hold_after(0)
        streams = [await client.generate(r) for r in requests(3, max_tokens=50)]
        with pytest.raises(QueueFullError):
            await client.generate(requests(4)[3])
        streams[0].close()  # a freed place can be taken again
        streams.append(await client.generate(requests(4)[3]))
        for s in streams:
            s.close()
        gate.release()
        await client.shutdown(5)

    asyncio.run(scenario())
    assert not engine.has_unfinished()


def test_bad_request_fails_only_its_stream(target, draft):
    _, client = tiny_engine(target, draft)
    too_long = Request("long", (1,) * MAX_MODEL_LEN, SamplingParams(max_tokens=5))

    async def scenario():
        await client.start()
        with pytest.raises(ValueError, match="context limit"):
            await collect(client, too_long)
        tokens, reason = await collect(client, requests(1, max_tokens=5)[0])
        await client.shutdown(5)
        return tokens, reason

    tokens, reason = asyncio.run(scenario())
    assert len(tokens) == 5 and reason == "length"


def test_engine_fault_fails_in_flight_requests_and_marks_unhealthy(target, draft, monkeypatch):
    engine, client = tiny_engine(target, draft)
    calls = 0
    real_step = engine.step

    def failing_step(arrived=None):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("device lost")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)

    async def scenario():
        await client.start()
        with pytest.raises(EngineDeadError, match="device lost"):
            await collect(client, requests(1, max_tokens=100)[0])
        assert not client.health().healthy
        with pytest.raises(EngineDeadError):
            await client.generate(requests(2)[1])
        await client.shutdown(5)

    asyncio.run(scenario())


def test_shutdown_finishes_in_flight_requests_then_refuses(target, draft):
    engine, client = tiny_engine(target, draft)

    async def scenario():
        await client.start()
        task = asyncio.create_task(collect(client, requests(1, max_tokens=30)[0]))
        await async_wait_for(lambda: client.health().num_requests == 1)
        await client.shutdown(30)
        tokens, reason = await task
        with pytest.raises(EngineShutdownError):
            await client.generate(requests(2)[1])
        return tokens, reason

    tokens, reason = asyncio.run(scenario())
    assert len(tokens) == 30 and reason == "length"
    assert not engine.has_unfinished()


def test_shutdown_past_the_deadline_aborts(target, draft):
    steps: list[StepStats] = []
    gate = Gate(steps.append)
    engine, client = tiny_engine(target, draft, on_step=gate)

    async def scenario():
        await client.start()
        gate.hold_after(1)
        stream = await client.generate(requests(1, max_tokens=100)[0])
        await anext(stream)
        shutdown = asyncio.create_task(client.shutdown(0))
        with pytest.raises(EngineShutdownError):
            await anext(stream)
        gate.release()
        await shutdown

    asyncio.run(scenario())
    assert not engine.has_unfinished() and engine.num_free_slots == 4
    assert sum(s.num_generated_tokens for s in steps) < 100


def test_a_request_posted_during_a_step_cuts_its_drafting_short(target, draft):
    """Under `auto` windows the engine thread asks the inbox between draft forwards: a request that arrives while
    a step runs ends that step before its verify, so the newcomer waits for one draft forward at most."""
    stats: list[StepStats] = []
    engine, client = tiny_engine(target, draft, on_step=stats.append, step_cost=DRAFTS_PAY)
    first, late = requests(2, max_tokens=40)
    real_step, seen, late_streams = engine.step, [], []
    loop: asyncio.AbstractEventLoop | None = None

    def step(arrived: Callable[[], bool] | None = None) -> list:
        assert arrived is not None and loop is not None
        if len(seen) == 3:  # the running row drafts by now: post a request from outside while this step runs
            late_streams.append(asyncio.run_coroutine_threadsafe(client.generate(late), loop).result(10))
        seen.append(arrived())
        return real_step(arrived)

    engine.step = step  # type: ignore[method-assign]

    async def scenario():
        nonlocal loop
        loop = asyncio.get_running_loop()
        await client.start()
        tokens, _ = await collect(client, first)
        await async_wait_for(lambda: bool(late_streams))
        late_tokens = [t async for out in late_streams[0] for t in out.new_token_ids]
        await client.shutdown(5)
        return tokens, late_tokens

    tokens, late_tokens = asyncio.run(scenario())
    assert len(tokens) == 40 and len(late_tokens) == 40
    assert seen[:5] == [False, False, False, True, False]  # the inbox is drained at the top of the next step
    # The step it cut ends before its verify: no row decoded in it, and the newcomer is admitted at the next step.
    assert stats[2].windows[0] > 0 and stats[3].cut_short and stats[3].windows == ()
    assert stats[3].num_generated_tokens == 0 and len(stats[4].windows) == 2


def test_a_request_whose_numerics_fail_fails_alone_and_the_engine_stays_healthy(target, draft):
    _, client = tiny_engine(overflowing(target, NAN_TOKEN), draft)
    bad = Request("bad", (8, NAN_TOKEN, 9), SamplingParams(max_tokens=20))

    async def scenario():
        await client.start()
        results = await asyncio.gather(
            collect(client, bad), *(collect(client, r) for r in requests(2)), return_exceptions=True
        )
        healthy = client.health().healthy
        after = await collect(client, requests(3)[2])
        await client.shutdown(5)
        return results, healthy, after

    (failed, *good), healthy, after = asyncio.run(scenario())
    assert isinstance(failed, RequestFailedError) and "not finite" in str(failed)
    assert healthy and all(reason == "length" and len(ids) == 20 for ids, reason in [*good, after])
