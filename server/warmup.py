"""The start-up warm-up: one short generation per task profile through the engine before the server is ready."""

from __future__ import annotations

import asyncio
import uuid

from engine import Request, SamplingParams
from server.generation import Context

WARMUP_PROMPT = (1, 2, 3, 4, 5, 6, 7, 8)
WARMUP_TOKENS = 8  # enough for a full speculative cycle at the default window


async def warm_up(ctx: Context) -> float:
    """One short generation for every task profile, all in one batch, before the server is ready, so that the first
    client does not pay for lazy initialisation (allocator, kernels, each judge head, batched shapes). Its engine
    steps are kept out of the metrics; a failure here fails the start-up. Returns its wall time in seconds."""
    start = ctx.clock()
    prompt = WARMUP_PROMPT[: ctx.info.max_model_len // 2]
    sampling = SamplingParams(max_tokens=min(WARMUP_TOKENS, ctx.info.max_model_len - len(prompt)), ignore_eos=True)

    async def one(profile: str) -> None:
        spec = ctx.profiles.resolve(profile, None, None, None).spec
        stream = await ctx.client.generate(Request(f"warmup-{profile}-{uuid.uuid4().hex}", prompt, sampling, spec))
        try:
            async for _ in stream:
                pass
        finally:
            stream.close()

    with ctx.metrics.muted():
        await asyncio.gather(*(one(p) for p in ctx.profiles.profiles))
    return ctx.clock() - start
