"""Greedy speculation is exact: it reproduces plain greedy target decoding token for token."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, make_engine, run_all
from engine import Request, SamplingParams, SpecParams


def prompts(n: int, seed: int) -> list[tuple[int, ...]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 24, (n,), generator=gen).tolist()
    return [tuple(torch.randint(0, VOCAB, (k,), generator=gen).tolist()) for k in lengths]


def requests(ps, max_tokens=24, width=4, **spec) -> list[Request]:
    return [
        Request(
            f"r{i}",
            p,
            SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            SpecParams(num_speculative_tokens=width, **spec),
        )
        for i, p in enumerate(ps)
    ]


@pytest.fixture(scope="module")
def reference(target):
    """Plain greedy decoding of the target for 8 prompts (no draft model at all)."""
    tokens, _ = run_all(make_engine(target, None), requests(prompts(8, seed=3)))
    return tokens


@pytest.mark.parametrize("width", [1, 2, 4, 8])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_greedy_speculative_equals_target(target, draft, reference, width, batch):
    engine = make_engine(target, draft)
    tokens, finals = run_all(engine, requests(prompts(8, seed=3)[:batch], width=width))
    assert tokens == {k: v for k, v in reference.items() if int(k[1:]) < batch}
    drafted = sum(f.spec.num_draft_tokens for f in finals.values())
    accepted = sum(f.spec.num_accepted_tokens for f in finals.values())
    assert 0 < accepted < drafted, "the tiny pair must both agree and disagree"


@pytest.mark.parametrize("batch", [2, 5, 7])
def test_batch_sizes_and_bonus_off(target, draft, reference, batch):
    tokens, _ = run_all(make_engine(target, draft, bonus=False), requests(prompts(8, seed=3)[:batch]))
    assert tokens == {k: v for k, v in reference.items() if int(k[1:]) < batch}


def test_requests_join_mid_flight_with_mixed_widths(target, draft, reference):
    reqs = requests(prompts(8, seed=3))
    widths = [1, 8, 0, 3, 2, 6, 4, 5]
    reqs = [
        Request(r.request_id, r.prompt_token_ids, r.sampling, SpecParams(num_speculative_tokens=w))
        for r, w in zip(reqs, widths, strict=True)
    ]
    # Slots are fewer than requests, so later ones wait, then join running rows between cycles.
    engine = make_engine(target, draft, slots=3)
    tokens, _ = run_all(engine, reqs[:2], join_at={1: reqs[2:4], 4: reqs[4:6], 9: reqs[6:]})
    assert tokens == reference
    assert engine.num_free_slots == 3


def test_speculation_off_is_plain_decoding(target, draft, reference):
    tokens, finals = run_all(make_engine(target, draft), requests(prompts(8, seed=3), enabled=False))
    assert tokens == reference
    assert all(f.spec is None for f in finals.values())


def test_eos_inside_a_window_stops_there(target, draft, reference):
    ref = reference["r0"]
    eos = ref[9]  # a token the target emits at output position 9
    first = ref.index(eos)
    engine = make_engine(target, draft, eos_token_ids=(eos,))
    req = Request("r0", prompts(8, seed=3)[0], SamplingParams(max_tokens=24), SpecParams(num_speculative_tokens=8))
    tokens, finals = run_all(engine, [req])
    assert tokens["r0"] == ref[: first + 1]
    assert finals["r0"].finish_reason == "stop" and finals["r0"].stop_reason == eos


def test_self_draft_accepts_every_window(target):
    engine = make_engine(target, target)
    reqs = requests(prompts(4, seed=5), max_tokens=37, width=4)
    _, finals = run_all(engine, reqs)
    for f in finals.values():
        c = f.spec
        assert c.draft_acceptance_rate == 1.0
        assert c.num_recovered == 0 and c.num_judged == 0 and c.num_judge_accepted == 0
        # 37 tokens in windows of 4 drafts + bonus: 7 full cycles (35 tokens), then one with W = 1.
        assert c.num_spec_steps == 8 and c.mean_acceptance_length == 37 / 8
        assert c.accepted_per_pos[:4] == (8, 7, 7, 7)


def test_a_vanishing_temperature_decodes_greedily_instead_of_overflowing(target, draft, reference):
    engine = make_engine(target, draft)
    tiny = [
        Request(r.request_id, r.prompt_token_ids, SamplingParams(24, temperature=2.2e-308, ignore_eos=True), r.spec)
        for r in requests(prompts(8, seed=3))
    ]
    tokens, _ = run_all(engine, tiny)  # logits / 2.2e-308 would be inf, and its softmax NaN
    assert tokens == reference
