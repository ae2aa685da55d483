"""The `auto` window inside the engine: greedy lossless output equals target-only decoding whatever windows the
planner picks (including rows that stop drafting and catch up later), a row's first step never drafts, a planner
that never drafts runs no draft forward at all, and outputs and step stats report the windows."""

from __future__ import annotations

import random

import pytest
import torch
from test_engine_state import drafted_only
from test_judge_hook import ScriptedJudge
from test_planner import cost
from test_spec_greedy import prompts, requests

from conftest import overflowing, run_all
from engine import CacheConfig, Engine, EngineConfig, Request, SamplingParams, SpecConfig, SpecParams
from engine.config import PlannerConfig
from engine.model.protocol import ForwardBatch
from engine.spec.autowindow import RowInput
from engine.spec.cost import StepCost
from engine.spec.judging import MismatchJudge
from engine.spec.planner import Plan
from engine.types import StepStats

DRAFTS_PAY = cost(0.1, 0.0, 0.005, 0.0)  # memory-bound target, cheap draft: the planner drafts
NEVER_PAYS = cost(0.0, 0.01, 0.004, 0.004)  # compute-bound target: the planner never drafts


def auto_engine(
    target,
    draft,
    step_cost: StepCost,
    bonus: bool = True,
    on_step=None,
    planner: PlannerConfig | None = None,
    judge: MismatchJudge | None = None,
) -> Engine:
    spec = SpecConfig(
        max_speculative_tokens=8,
        default_speculative_tokens=8,
        bonus_token=bonus,
        auto_window=True,
        planner=planner or PlannerConfig(),
    )
    config = EngineConfig(cache=CacheConfig(max_slots=8, max_model_len=160), spec=spec)
    return Engine(config, target, draft, step_cost=step_cost, on_step=on_step, judge=judge)


@pytest.fixture(scope="module")
def reference(target):
    tokens, _ = run_all(auto_engine(target, None, DRAFTS_PAY), requests(prompts(8, seed=3)))
    return tokens


class Counting:
    """Wraps a runner's forward to count calls."""

    def __init__(self, runner) -> None:
        self.runner, self.calls = runner, 0
        self.inner = runner.forward
        runner.forward = self

    def __call__(self, *args):
        self.calls += 1
        return self.inner(*args)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bonus", [True, False])
def test_greedy_output_equals_target_only_whatever_windows_are_picked(target, draft, reference, seed, bonus) -> None:
    engine = auto_engine(target, draft, DRAFTS_PAY, bonus)
    rng = random.Random(seed)
    assert engine.autowindow is not None
    real_plan = engine.autowindow.plan
    picked: list[int] = []

    def random_plan(inputs: list[RowInput]) -> Plan:
        real_plan(inputs)
        # long runs of 0 let the draft fall far behind; the drafter must catch it up when drafting resumes
        windows = tuple(rng.choice([0, 0, 0, r.cap]) if r.cap else 0 for r in inputs)
        picked.extend(windows)
        return Plan(windows, float(len(inputs)), 1.0)

    engine.autowindow.plan = random_plan  # type: ignore[method-assign]
    tokens, finals = run_all(engine, requests(prompts(8, seed=3), width=8))
    assert tokens == reference
    assert 0 in picked and max(picked) > 1
    assert sum(f.spec.num_accepted_tokens for f in finals.values()) > 0


def test_the_real_planner_drafts_when_it_pays_and_stays_exact(target, draft, reference) -> None:
    stats: list[StepStats] = []
    engine = auto_engine(target, draft, DRAFTS_PAY, on_step=stats.append)
    tokens, finals = run_all(engine, requests(prompts(8, seed=3), width=8))
    assert tokens == reference
    assert any(any(s.windows) for s in stats)
    assert all(s.predicted_seconds is not None and s.predicted_seconds > 0 for s in stats)
    for f in finals.values():
        assert f.windows[0] >= 1  # the admitting step
        assert sum(f.windows) == f.spec.num_spec_steps + f.windows[0]


def test_a_rows_first_step_never_drafts(target, draft) -> None:
    stats: list[StepStats] = []
    engine = auto_engine(target, draft, DRAFTS_PAY, on_step=stats.append)
    run_all(engine, requests(prompts(1, seed=5), width=8))
    assert stats[0].windows == (0,) and stats[1].windows[0] > 0
    # the deferred draft prefill is one catch-up forward, on the first drafting step only
    assert stats[1].caught_up == 1 and stats[2].windows[0] > 0 and stats[2].caught_up == 0


@pytest.mark.parametrize("plain_admission", [True, False])
def test_a_step_that_admits_a_request_drafts_for_no_row(target, draft, plain_admission) -> None:
    """So a new request's first token waits for a target-only step, not a verify of the running rows' windows."""
    stats: list[StepStats] = []
    planner = PlannerConfig(plain_admission=plain_admission)
    engine = auto_engine(target, draft, DRAFTS_PAY, on_step=stats.append, planner=planner)
    first, late = requests(prompts(2, seed=5), width=8)
    run_all(engine, [first], join_at={4: [late]})
    admitting = stats[4]
    assert len(admitting.windows) == 2 and admitting.windows[1] == 0  # the newcomer never drafts at once
    assert (admitting.windows[0] == 0) == plain_admission, admitting.windows
    assert stats[3].windows[0] > 0 and stats[5].windows[0] > 0  # the running row drafts before and after


def test_a_planner_that_never_drafts_runs_no_draft_forward(target, draft, reference) -> None:
    engine = auto_engine(target, draft, NEVER_PAYS, planner=PlannerConfig(probe_every=0))
    assert engine.draft is not None
    counting = Counting(engine.draft)
    tokens, finals = run_all(engine, requests(prompts(8, seed=3)[:4], width=8))
    assert tokens == {k: v for k, v in reference.items() if int(k[1:]) < 4}
    assert counting.calls == 0  # no draft prefill either: it waits for a drafting cycle
    assert all(f.windows[1:] == (0,) * 8 for f in finals.values())


def test_auto_without_a_step_cost_profiles_the_models(target, draft) -> None:
    spec = SpecConfig(max_speculative_tokens=4, auto_window=True)
    engine = Engine(EngineConfig(cache=CacheConfig(max_slots=4, max_model_len=160), spec=spec), target, draft)
    assert engine.autowindow is not None
    c = engine.autowindow.cost
    assert c.target.rows == (1, 2, 4) and c.target.tokens == (1, 2, 3, 5)
    assert all(x > 0 for row in c.target.seconds for x in row)


class Arrivals:
    """An `arrived` callback that says yes at random (seeded): before drafting or after some draft steps. Without
    fixed-window rows, a step it cuts ends before its verify and emits nothing (the newcomer is admitted next)."""

    def __init__(self, seed: int, p: float = 0.3) -> None:
        self.rng, self.p, self.asked = random.Random(seed), p, 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.rng.random() < self.p


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_arrival_cuts_drafting_short_and_output_stays_exact(target, draft, reference, seed) -> None:
    stats: list[StepStats] = []
    engine = auto_engine(target, draft, DRAFTS_PAY, on_step=stats.append, planner=PlannerConfig(probe_every=0))
    arrivals = Arrivals(seed)
    tokens, finals = run_all(engine, requests(prompts(8, seed=3)[:4], width=8), arrived=arrivals)
    assert tokens == {k: v for k, v in reference.items() if int(k[1:]) < 4}
    ended = [i for i, s in enumerate(stats) if s.cut_short and not s.num_generated_tokens]  # before the verify
    assert ended and all(stats[i].windows == () and not stats[i].rows for i in ended)
    assert any(stats[i].seconds_draft > 0 for i in ended)  # after some draft steps
    # Never two such steps running: the next cut step verifies what its rows hold, so arrivals cannot stall.
    assert all(stats[i - 1].cut_short for i, s in enumerate(stats) if s.cut_short and s.num_generated_tokens)
    assert not any(i + 1 in ended for i in ended)
    for s in stats:  # the stats report the windows that ran
        drafting = [w for w in s.windows if w]
        assert [row.counts.num_draft_tokens for row in s.rows] == drafting
        assert all(row.counts.num_accepted_tokens <= row.counts.num_draft_tokens for row in s.rows)
    for f in finals.values():
        assert sum(f.windows) == f.spec.num_spec_steps + f.windows[0]


def test_full_slots_or_the_setting_off_never_cut_and_fixed_rows_keep_their_window(target, draft) -> None:
    def cut_steps(planner: PlannerConfig, n: int, **spec) -> list[StepStats]:
        stats: list[StepStats] = []
        engine = auto_engine(target, draft, DRAFTS_PAY, on_step=stats.append, planner=planner)
        run_all(engine, requests(prompts(n, seed=3), width=8, **spec), arrived=lambda: True)
        return [s for s in stats if s.cut_short]

    assert cut_steps(PlannerConfig(probe_every=0), 2)  # a free slot: every step cuts at once
    full = cut_steps(PlannerConfig(probe_every=0), 8)
    assert all(len(s.windows) < 8 for s in full)  # never while all 8 slots are taken: nobody could be admitted
    assert not cut_steps(PlannerConfig(probe_every=0, yield_to_arrivals=False), 2)
    assert not cut_steps(PlannerConfig(probe_every=0), 2, fixed_window=True)  # a fixed window is what was asked


@pytest.mark.parametrize("seed", [0, 1])
def test_a_cut_step_gives_the_judge_states_of_the_tokens_that_were_drafted(target, draft, seed) -> None:
    """DD layout: after a cut the extra draft forward still reads the last kept token, so slot i's features are
    the full-sequence states after reading d_{i+1} (as in test_judge_hook)."""
    prompt = (5, 17, 33, 2, 90, 41)
    judge = ScriptedJudge({("a", p) for p in range(len(prompt), len(prompt) + 40, 2)})
    stats: list[StepStats] = []
    planner = PlannerConfig(probe_every=0)
    engine = auto_engine(target, draft, DRAFTS_PAY, False, stats.append, planner, judge)
    req = Request(
        "a",
        prompt,
        SamplingParams(max_tokens=40, ignore_eos=True),
        SpecParams(num_speculative_tokens=8, judge_threshold=0.5, profile="math"),
    )
    fixed = Request("b", prompt[::-1], SamplingParams(max_tokens=40, ignore_eos=True),
                    SpecParams(num_speculative_tokens=8, fixed_window=True))  # fmt: skip
    tokens, finals = run_all(engine, [req, fixed], arrived=Arrivals(seed))
    # A fixed-window row keeps the step going: the cut rows' drafts are verified as far as they got.
    assert any(s.cut_short and 0 < s.windows[0] < 8 for s in stats)
    assert finals["a"].spec.num_judge_accepted > 0
    sequence = [*prompt, *tokens["a"]]  # committed tokens never change, so each call's prefix is in here
    for call in judge.calls:
        assert call.draft_hidden is not None and call.draft_hidden.shape[1] == call.draft_token_ids.shape[1]
        start = int(call.positions[0, 0])
        judged = call.mismatch[0].nonzero()  # row 0 is "a"; past its window (a cut one) the slots are padding
        for i in range(int(judged.max()) + 1 if len(judged) else 0):
            ids = [*sequence[:start], *call.draft_token_ids[0, : i + 1].tolist()]
            batch = ForwardBatch.build([ids], [0], [0], torch.device("cpu"))
            with torch.no_grad():
                full_t, full_d = target(batch, None)[0, -1], draft(batch, None)[0, -1]
            torch.testing.assert_close(call.target_hidden[0, i], full_t, atol=1e-5, rtol=0)
            torch.testing.assert_close(call.draft_hidden[0, i], full_d, atol=1e-5, rtol=0)


def test_a_step_that_verifies_again_for_overflowed_drafts_teaches_no_step_time(target, draft, monkeypatch) -> None:
    request = Request("g", (1, 2, 3), SamplingParams(max_tokens=30))
    want, only_drafted = drafted_only(target, draft, request, monkeypatch)
    stats: list[StepStats] = []
    engine = auto_engine(overflowing(target, only_drafted[0]), draft, DRAFTS_PAY, on_step=stats.append)
    assert engine.autowindow is not None
    dropped, timed = [], []
    drop, observe = engine._drop_overflowed_drafts, engine.autowindow.observe

    def drop_spy(*args):
        out = drop(*args)
        dropped.append(bool(out))
        return out

    def observe_spy(inputs, plan, accepted, seconds, emitted, verify):
        timed.append(seconds)
        return observe(inputs, plan, accepted, seconds, emitted, verify)

    monkeypatch.setattr(engine, "_drop_overflowed_drafts", drop_spy)
    monkeypatch.setattr(engine.autowindow, "observe", observe_spy)
    tokens, finals = run_all(engine, [request])
    assert tokens["g"] == want and finals["g"].error is None
    assert any(dropped) and not all(dropped)
    verified = [s for s in stats if s.windows]  # the steps that reached a verify, as `dropped` and `timed` count
    assert [t == 0.0 for t in timed] == dropped
    assert [s.predicted_seconds is None for s in verified] == dropped
