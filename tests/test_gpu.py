"""CUDA paths (skipped without a GPU): greedy equivalence on the device, and the flash-attn cache path."""

from __future__ import annotations

import pytest
import torch

from conftest import make_engine, perturbed, run_all, tiny_decoder
from engine import Request, SamplingParams, SpecParams
from engine.model.attention import flash_available
from engine.model.protocol import ForwardBatch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_greedy_speculation_is_exact_on_cuda():
    target = tiny_decoder(0).cuda()
    draft = perturbed(target, 0.02, seed=1)
    reqs = [
        Request(f"r{i}", tuple(range(i + 1, i + 9)), SamplingParams(max_tokens=20, ignore_eos=True), SpecParams())
        for i in range(4)
    ]
    plain, _ = run_all(make_engine(target, None, device="cuda"), reqs)
    spec, _ = run_all(make_engine(target, draft, device="cuda"), reqs)
    assert plain == spec


@pytest.mark.skipif(not flash_available(torch.device("cuda"), torch.bfloat16), reason="flash-attn not installed")
def test_flash_cache_path_matches_full_forward():
    model = tiny_decoder(0).to("cuda", torch.bfloat16)
    cache = model.new_cache(4, 64)
    ids = torch.randint(0, 97, (2, 20)).tolist()
    dev = torch.device("cuda")
    with torch.no_grad():
        full = model(ForwardBatch.build(ids, [0, 0], [0, 0], dev), None)
        model(ForwardBatch.build([r[:12] for r in ids], [0, 0], [3, 1], dev), cache)
        step = model(ForwardBatch.build([r[12:] for r in ids], [12, 12], [3, 1], dev), cache)
    torch.testing.assert_close(step, full[:, 12:], atol=3e-2, rtol=3e-2)
