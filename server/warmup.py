"""The start-up warm-up: one short generation through the engine before the server listens."""

from __future__ import annotations

import uuid

from engine import Request, SamplingParams
from server.generation import Context

WARMUP_PROMPT = (1, 2, 3, 4, 5, 6, 7, 8)
WARMUP_TOKENS = 8  # enough for a full speculative cycle at the default window


async def warm_up(ctx: Context) -> float:
    """One short generation on the default profile before the server listens, so that the first client does not
    pay for lazy initialisation (allocator, kernels, the judge head). Its engine steps are kept out of the metrics;
    a failure here fails the start-up. Returns its wall time in seconds."""
    start = ctx.clock()
    prompt = WARMUP_PROMPT[: ctx.info.max_model_len // 2]
    sampling = SamplingParams(max_tokens=min(WARMUP_TOKENS, ctx.info.max_model_len - len(prompt)), ignore_eos=True)
    spec = ctx.profiles.resolve(None, None, None, None).spec
    with ctx.metrics.muted():
        stream = await ctx.client.generate(Request(f"warmup-{uuid.uuid4().hex}", prompt, sampling, spec))
        try:
            async for _ in stream:
                pass
        finally:
            stream.close()
    return ctx.clock() - start
