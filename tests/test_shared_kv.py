"""A twin draft that reads the target's K/V for context it has not computed: no draft prefill and no catch-up
forward ever run, greedy output stays exactly the target's (fixed and `auto` windows, requests joining mid-flight,
prefix reuse), and a draft identical to the target still accepts every window (the copied K/V are the ones the
draft would have computed)."""

from __future__ import annotations

import random

import pytest
from test_autowindow_engine import DRAFTS_PAY
from test_spec_greedy import prompts, requests

from conftest import make_engine, run_all, tiny_decoder
from engine import CacheConfig, Engine, EngineConfig, SpecConfig
from engine.model.pair import draft_name, twin_draft
from engine.spec.autowindow import RowInput
from engine.spec.planner import Plan
from engine.types import StepStats


class Feeds:
    """Wraps a runner's forward to record the longest row each call fed."""

    def __init__(self, runner) -> None:
        self.longest: list[int] = []
        self.inner = runner.forward
        runner.forward = self

    def __call__(self, rows, cache_lens, slots):
        self.longest.append(max(len(r) for r in rows))
        return self.inner(rows, cache_lens, slots)


@pytest.fixture(scope="module")
def reference(target):
    tokens, _ = run_all(make_engine(target, None), requests(prompts(8, seed=3)))
    return tokens


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_fixed_windows_stay_exact_and_never_prefill_the_draft(target, draft, reference, reuse_prefix):
    engine = make_engine(target, draft, slots=3, shares_kv=True, reuse_prefix=reuse_prefix)
    assert engine.draft is not None
    feeds = Feeds(engine.draft)
    reqs = requests(prompts(8, seed=3), width=4)
    tokens, finals = run_all(engine, reqs[:2], join_at={1: reqs[2:4], 4: reqs[4:6], 9: reqs[6:]})
    assert tokens == reference
    assert feeds.longest and max(feeds.longest) <= 2  # step 0 reads the newest token or two, nothing more
    assert sum(f.spec.num_accepted_tokens for f in finals.values()) > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_auto_windows_that_start_and_stop_stay_exact(target, draft, reference, seed):
    spec = SpecConfig(max_speculative_tokens=8, default_speculative_tokens=8, auto_window=True, draft_shares_kv=True)
    stats: list[StepStats] = []
    config = EngineConfig(cache=CacheConfig(max_slots=8, max_model_len=160), spec=spec)
    engine = Engine(config, target, draft, step_cost=DRAFTS_PAY, on_step=stats.append)
    assert engine.autowindow is not None and engine.draft is not None
    feeds = Feeds(engine.draft)
    rng = random.Random(seed)

    def random_plan(inputs: list[RowInput]) -> Plan:
        assert all(r.catch_up == 0 for r in inputs)  # the planner is told catching up costs nothing
        windows = tuple(rng.choice([0, 0, 0, r.cap]) if r.cap else 0 for r in inputs)
        return Plan(windows, float(len(inputs)), 1.0)

    engine.autowindow.plan = random_plan  # type: ignore[method-assign]
    tokens, _ = run_all(engine, requests(prompts(8, seed=3), width=8))
    assert tokens == reference
    assert max(feeds.longest) <= 2 and all(s.caught_up == 0 for s in stats)
    assert any(any(s.windows) for s in stats)


def test_a_draft_equal_to_the_target_accepts_every_window(target):
    _, finals = run_all(make_engine(target, target, shares_kv=True), requests(prompts(4, seed=5), max_tokens=37))
    for f in finals.values():
        assert f.spec.draft_acceptance_rate == 1.0 and f.spec.num_recovered == 0


def test_a_draft_of_another_shape_cannot_share(target):
    with pytest.raises(ValueError, match="cache shape"):
        make_engine(target, tiny_decoder(seed=4, layers=1), shares_kv=True)


def test_only_a_draft_made_from_the_target_is_a_twin():
    assert twin_draft("smollm2", None, "int8") and twin_draft("smollm2", None, "int8-body")
    assert twin_draft("qwen-coder", "some/target.gguf", "int8")  # an int8 copy of the target given
    assert not twin_draft("qwen-coder", None, "int8")  # the pair's own 0.5B draft, quantized
    assert not twin_draft("smollm2", None, "none") and not twin_draft("smollm2", None, "other/draft")


def test_the_draft_is_named_for_what_is_loaded_not_for_the_flag():
    assert draft_name("smollm2", None, "int8") == "int8" and draft_name("smollm2", None, "int8-body") == "int8-body"
    assert draft_name("qwen-coder", None, "int8") == "qwen2.5-coder-0.5b-instruct"  # the pair brings its draft
    assert draft_name("qwen-coder", "t.gguf", "int8") == "int8"  # a target given: its int8 copy
    assert draft_name("smollm2", "t", "/models/small-draft.gguf") == "small-draft"
    assert draft_name("qwen-coder", None, "none") is None
