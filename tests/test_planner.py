"""The `auto` window planner's pure parts: the cost grid, expected tokens, the depth-by-depth search, the
acceptance tallies, the probe and the guard."""

from __future__ import annotations

import math

import pytest

from engine.config import PlannerConfig
from engine.spec.autowindow import SPEED_RANGE, AutoWindow, RowInput, Tally
from engine.spec.cost import ForwardCost, StepCost, interpolate
from engine.spec.planner import Plan, Row, amortised_catch_up, expected_tokens, horizon, plan_windows, step_seconds
from engine.spec.profiler import draft_tokens, grid


def linear_cost(fixed: float, per_token: float, rows: tuple[int, ...] = (1, 4, 16), tokens=(1, 3, 9)) -> ForwardCost:
    """A forward that costs `fixed` plus `per_token` for each token it computes (rows x tokens)."""
    return ForwardCost(rows, tokens, tuple(tuple(fixed + per_token * b * q for q in tokens) for b in rows))


def cost(target_fixed: float, target_token: float, draft_fixed: float, draft_token: float) -> StepCost:
    return StepCost(linear_cost(target_fixed, target_token), linear_cost(draft_fixed, draft_token), 256)


def test_interpolation_is_exact_on_the_grid_and_linear_between_and_beyond() -> None:
    c = linear_cost(0.01, 0.002)
    assert c(4, 3) == pytest.approx(0.01 + 0.002 * 12)
    assert c(2, 2) == pytest.approx(0.01 + 0.002 * 2 * 2, rel=0.3)  # bilinear through a product: close
    assert c(32, 9) == pytest.approx(0.01 + 0.002 * 32 * 9)  # extrapolated along the last segment
    assert c(0, 5) == 0.0 and c(3, 0) == 0.0
    assert interpolate((1, 2), (1.0, 0.5), 10) == 0.0  # never negative
    assert ForwardCost.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="ascending"):
        ForwardCost((4, 1), (1,), ((1.0,), (1.0,)))
    with pytest.raises(ValueError, match="shape"):
        ForwardCost((1, 4), (1,), ((1.0,),))


def test_profile_grid_spans_one_row_to_all_slots_and_one_token_to_k_plus_one() -> None:
    assert grid(16, 8) == ((1, 2, 4, 8, 16), (1, 2, 3, 5, 9))
    assert grid(6, 4) == ((1, 2, 4, 6), (1, 2, 3, 5))
    assert grid(1, 1) == ((1,), (1, 2))
    assert draft_tokens((1, 2, 3, 5, 9), 8192) == (1, 2, 3, 5, 9, 64, 256)  # catch-up forwards are measured too
    assert draft_tokens((1, 2, 3, 5, 9), 256) == (1, 2, 3, 5, 9, 64)  # what fits half the positions


def test_expected_tokens_follow_the_geometric_model() -> None:
    assert expected_tokens(0.7, 0, bonus=True) == 1.0
    assert expected_tokens(0.7, 1, bonus=True) == pytest.approx(1.7)
    assert expected_tokens(0.7, 1, bonus=False) == pytest.approx(1.0)  # one token either way
    alpha, w = 0.8, 5
    assert expected_tokens(alpha, w, bonus=True) == pytest.approx((1 - alpha ** (w + 1)) / (1 - alpha))
    assert expected_tokens(1.0, 4, bonus=False) == 4.0
    assert expected_tokens(0.0, 4, bonus=True) == 1.0


def test_cheap_drafts_and_a_flat_verify_earn_the_whole_cap() -> None:
    # memory-bound target (verify of 9 tokens costs what one costs), a draft at 5% of it
    c = cost(0.1, 0.0, 0.005, 0.0)
    plan = plan_windows([Row(0.9, 8, 0), Row(0.9, 3, 0)], c, bonus=True, amortize=16)
    assert plan.windows == (8, 3)
    assert plan.seconds == pytest.approx(step_seconds(c, [8, 3], [Row(0.9, 8, 0), Row(0.9, 3, 0)]))
    assert plan.tokens_per_second > 2 / c.target(2, 1)


def test_a_compute_bound_verify_means_no_row_drafts() -> None:
    # every verified token costs as much as a whole step of one row, as on a busy CPU
    c = cost(0.0, 0.01, 0.004, 0.004)
    plan = plan_windows([Row(0.7, 8, 0)] * 16, c, bonus=True, amortize=16)
    assert plan.windows == (0,) * 16
    assert plan.seconds == pytest.approx(c.target(16, 1))


def test_higher_acceptance_gets_a_window_at_least_as_long_and_caps_hold() -> None:
    c = cost(0.05, 0.001, 0.01, 0.0005)
    rows = [Row(0.3, 8, 0), Row(0.95, 8, 0), Row(0.6, 8, 0), Row(0.95, 2, 0)]
    plan = plan_windows(rows, c, bonus=True, amortize=16)
    by_alpha = sorted(zip([r.alpha for r in rows[:3]], plan.windows[:3], strict=True))
    assert [w for _, w in by_alpha] == sorted(w for _, w in by_alpha)
    assert plan.windows[3] <= 2 and all(w <= r.cap for w, r in zip(plan.windows, rows, strict=True))
    assert plan.windows[1] > 0


def test_a_looser_judge_earns_a_longer_window() -> None:
    c = cost(0.05, 0.002, 0.012, 0.0)
    strict = plan_windows([Row(0.55, 8, 0)], c, bonus=True, amortize=16).windows[0]
    loose = plan_windows([Row(0.9, 8, 0)], c, bonus=True, amortize=16).windows[0]
    assert loose > strict


def test_a_long_catch_up_is_amortised_when_choosing_but_paid_in_full_in_the_prediction() -> None:
    c = cost(0.1, 0.0, 0.005, 0.002)
    row = Row(0.9, 4, 300)
    plan = plan_windows([row], c, bonus=True, amortize=16)
    assert plan.windows == (4,)
    assert plan.seconds == pytest.approx(c.target(1, 5) + c.draft(1, 300) + 4 * c.draft(1, 1))
    assert plan_windows([row], c, bonus=True, amortize=1).windows == (0,)  # paid at once it does not pay


def test_tally_is_the_geometric_evidence_with_a_prior() -> None:
    t = Tally().observe(4, 4, 1.0).observe(4, 1, 1.0)  # 5 accepted, 1 rejected
    assert (t.accepted, t.trials) == (5.0, 6.0)
    assert t.alpha(0.5, 0.0) == pytest.approx(5 / 6)
    assert Tally().alpha(0.6, 4.0) == pytest.approx(0.6)
    decayed = Tally(10.0, 10.0).observe(2, 0, 0.5)
    assert (decayed.accepted, decayed.trials) == (5.0, 6.0)


def observe(aw: AutoWindow, inputs: list[RowInput], plan: Plan, accepted: list[int], seconds: float, emitted: int):
    """`AutoWindow.observe` with a verify that takes what the profile says (a device whose speed holds)."""
    aw.observe(inputs, plan, accepted, seconds, emitted, aw.profile.target(len(inputs), 1 + max(plan.windows)))


def rows_of(n: int, cap: int = 8, profile: str = "lossless") -> list[RowInput]:
    return [RowInput(f"r{i}", (profile, 0.0, True), cap, 0) for i in range(n)]


def test_profile_history_seeds_new_rows_and_finished_rows_are_forgotten() -> None:
    aw = AutoWindow(PlannerConfig(), cost(0.1, 0.0, 0.005, 0.0), bonus=True)
    inputs = rows_of(2)
    plan = aw.plan(inputs)
    observe(aw, inputs, plan, [plan.windows[0], plan.windows[1]], plan.seconds, 10)  # everything accepted
    assert aw.key_alpha(("lossless", 0.0, True)) > PlannerConfig().prior_alpha
    newcomer = RowInput("r9", ("lossless", 0.0, True), 8, 0)
    assert aw.row_alpha(newcomer) == pytest.approx(aw.key_alpha(newcomer.key))
    assert aw.row_alpha(newcomer) > aw.row_alpha(RowInput("x", ("other", 0.0, True), 8, 0))
    aw.plan([newcomer])
    assert set(aw.rows) == set()  # r0 and r1 left; r9 has not drafted yet


def test_the_guard_backs_off_after_slow_drafting_steps_and_doubles() -> None:
    config = PlannerConfig(guard_steps=3, backoff_steps=4, probe_every=0)
    aw = AutoWindow(config, cost(0.1, 0.0, 0.005, 0.0), bonus=True)
    inputs = rows_of(1)
    for _ in range(3):
        plan = aw.plan(inputs)
        assert plan.windows[0] > 0
        # as predicted, but every draft rejected at once: one token per drafting step, slower than plain decoding
        observe(aw, inputs, plan, [0], seconds=plan.seconds, emitted=1)
    assert aw.backoffs == 1
    for _ in range(4):
        plan = aw.plan(inputs)
        assert plan.windows == (0,)
        observe(aw, inputs, plan, [0], seconds=plan.seconds, emitted=1)
    assert aw.plan(inputs).windows[0] > 0  # drafting again
    assert aw.guard.backoff_len == 8


def test_a_new_or_unmeasured_profile_gets_one_probing_row() -> None:
    config = PlannerConfig(probe_every=5, probe_window=3, probe_budget=0.99)
    aw = AutoWindow(config, cost(0.0, 0.01, 0.004, 0.004), bonus=True)  # the planner never drafts here
    inputs = rows_of(3)
    windows = []
    for _ in range(12):
        plan = aw.plan(inputs)
        windows.append(plan.windows)
        observe(aw, inputs, plan, [0] * 3, plan.seconds, 3)
    probed = [i for i, w in enumerate(windows) if any(w)]
    assert probed == [0, 5, 10]  # a new profile at once, then every probe_every steps
    assert all(sorted(windows[i]) == [0, 0, 3] for i in probed) and aw.probes == 3
    assert not math.isnan(plan.tokens_per_second)


def test_fixed_rows_keep_their_window_and_are_costed() -> None:
    c = cost(0.05, 0.001, 0.01, 0.0005)
    rows = [Row(0.2, 6, 0, fixed=True), Row(0.9, 8, 0), Row(0.1, 3, 0)]
    plan = plan_windows(rows, c, bonus=True, amortize=16)
    assert plan.windows[0] == 6 and plan.windows[1] >= plan.windows[2]  # kept; the better row drafts deeper
    assert plan.seconds == pytest.approx(step_seconds(c, list(plan.windows), rows))
    only_fixed = plan_windows([Row(0.0, 4, 0, fixed=True)], cost(0.0, 0.01, 0.004, 0.004), True, 16)
    assert only_fixed.windows == (4,)  # even where drafting never pays


def test_a_measured_table_is_made_monotone_from_above() -> None:
    from engine.spec.profiler import monotone

    # a disturbed small cell (3.6) falls to its larger neighbours; nothing rises
    assert monotone([[0.25, 3.6, 0.36], [0.3, 0.35, 0.5]]) == ((0.25, 0.35, 0.36), (0.3, 0.35, 0.5))


def test_a_steps_fixed_overhead_makes_drafting_pay_and_is_learned_online() -> None:
    c = cost(0.0, 0.01, 0.004, 0.004)  # drafting does not pay on the forwards alone
    rows = [Row(0.9, 8, 0)]
    assert plan_windows(rows, c, bonus=True, amortize=16).windows == (0,)
    heavy = plan_windows(rows, c, bonus=True, amortize=16, overhead=0.2)
    assert heavy.windows[0] > 0
    assert heavy.seconds == pytest.approx(0.2 + step_seconds(c, list(heavy.windows), rows))
    aw = AutoWindow(PlannerConfig(probe_every=0), c, bonus=True)
    inputs = rows_of(1)
    for _ in range(60):
        plan = aw.plan(inputs)
        observe(aw, inputs, plan, [0], seconds=plan.seconds - aw.overhead + 0.2, emitted=1)
    assert aw.overhead == pytest.approx(0.2, rel=0.01)


def test_the_devices_speed_is_followed_online_and_one_pause_barely_moves_it() -> None:
    c = cost(0.05, 0.002, 0.01, 0.001)
    aw = AutoWindow(PlannerConfig(probe_every=0), c, bonus=True)
    inputs = rows_of(4)
    for _ in range(80):  # the device now runs 30% faster than at start-up, in every forward
        plan = aw.plan(inputs)
        verify = 0.7 * aw.profile.target(4, 1 + max(plan.windows))
        aw.observe(inputs, plan, list(plan.windows), 0.7 * plan.seconds, sum(plan.windows) + 4, verify)
    assert aw.speed == pytest.approx(0.7, rel=0.02)
    forwards = step_seconds(c, [4] * 4, [Row(0.5, 8, 0)] * 4)  # as profiled
    assert aw.costed(inputs, [4] * 4).seconds == pytest.approx(aw.overhead + aw.speed * forwards)
    assert aw.cost.draft(4, 1) == pytest.approx(aw.speed * c.draft(4, 1)) and aw.profile is c
    before = aw.speed
    plan = aw.plan(inputs)
    aw.observe(inputs, plan, list(plan.windows), 10 * plan.seconds, 4, 10 * aw.profile.target(4, 9))  # a pause
    assert aw.speed == pytest.approx(before * 1.01)
    for _ in range(400):  # a profile from another device: the speed stops at the edge of its range
        plan = aw.plan(inputs)
        aw.observe(inputs, plan, list(plan.windows), plan.seconds, 4, 100 * aw.profile.target(4, 1 + max(plan.windows)))
    assert aw.speed == SPEED_RANGE[1]


def test_a_probe_whose_step_ended_before_its_verify_is_due_again() -> None:
    aw = AutoWindow(PlannerConfig(), cost(0.0, 0.01, 0.004, 0.004), bonus=True)  # drafting never pays
    inputs = rows_of(2, profile="math")
    assert max(aw.plan(inputs).windows) == 4 and aw.probes == 1  # a profile never measured: probed at once
    aw.abandon()  # a newcomer cut the step short: nothing was measured
    assert aw.probes == 0 and max(aw.plan(inputs).windows) == 4  # so it is probed at the next step again
    assert max(aw.plan(inputs).windows) == 0  # once it ran, the probe waits for `probe_every` steps


def test_probes_cost_at_most_their_budget_of_step_time() -> None:
    c = cost(0.0, 0.01, 0.004, 0.004)  # the planner never drafts; every probe is pure cost
    aw = AutoWindow(PlannerConfig(probe_every=1, probe_window=4, probe_budget=0.02), c, bonus=True)
    inputs = rows_of(16)
    spent = base = 0.0
    for _ in range(400):
        plan = aw.plan(inputs)
        unprobed = c.target(16, 1)
        spent += plan.seconds - unprobed
        base += unprobed
        observe(aw, inputs, plan, [0] * 16, plan.seconds, 16)
    assert aw.probes >= 2  # the new profile at once, then as the budget allows
    assert spent / base <= 0.02 + (plan.seconds / base)  # within the budget, but for the last probe's debt


def test_one_unlucky_step_does_not_trip_the_guard() -> None:
    aw = AutoWindow(PlannerConfig(guard_steps=4, probe_every=0), cost(0.1, 0.0, 0.005, 0.0), bonus=True)
    inputs = rows_of(1)
    for i in range(40):
        plan = aw.plan(inputs)
        assert plan.windows[0] > 0
        slow = i % 4 == 0  # one rejected-at-once cycle in four; the rest emit a full window
        observe(aw, inputs, plan, [0 if slow else plan.windows[0]], plan.seconds, 1 if slow else 9)
    assert aw.backoffs == 0


def test_each_draft_depths_own_cost_is_learned_from_drafting_steps_and_shortens_windows() -> None:
    c = cost(0.1, 0.0, 0.005, 0.0)  # a flat verify and cheap drafts: the whole cap, on the forwards alone
    rows = [Row(0.8, 8, 0)]
    assert plan_windows(rows, c, bonus=True, amortize=16).windows == (8,)
    costly = plan_windows(rows, c, bonus=True, amortize=16, per_depth=0.03)
    assert 0 < costly.windows[0] < 8
    assert costly.seconds == pytest.approx(step_seconds(c, list(costly.windows), rows, per_depth=0.03))
    assert step_seconds(c, [3], rows, 0.03) == pytest.approx(c.target(1, 4) + 3 * c.draft(1, 1) + 3 * 0.03)
    aw = AutoWindow(PlannerConfig(probe_every=0), c, bonus=True)
    inputs = rows_of(1)
    for i in range(300):  # drafting steps take 0.02 s per depth more than their forwards; one in ten pauses 1 s
        plan = aw.plan(inputs)
        depth = max(plan.windows)
        forwards = plan.seconds - aw.overhead - depth * aw.per_depth
        pause = 1.0 if i % 10 == 0 else 0.0
        observe(aw, inputs, plan, [depth], seconds=forwards + 0.02 * depth + pause, emitted=depth + 1)
    assert aw.per_depth == pytest.approx(0.02, abs=0.004)  # the median, not dragged up by the pauses


def test_a_catch_up_counts_against_the_guard_as_the_planner_amortises_it() -> None:
    """A new request's deferred draft prefill is one long catch-up forward on its first drafting step; charged in
    full to the guard's next steps it looks like slow drafting and stops drafting that pays."""
    c = cost(0.1, 0.0, 0.005, 0.002)
    config = PlannerConfig(guard_steps=4, probe_every=0, amortize=16)
    aw = AutoWindow(config, c, bonus=True)
    lagging = [RowInput("r0", ("lossless", 0.0, True), 8, 3000)]
    steady = [RowInput("r0", ("lossless", 0.0, True), 8, 0)]
    first = Plan((4,), 5.0, c.target(1, 5) + c.draft(1, 3000) + 4 * c.draft(1, 1))
    observe(aw, lagging, first, [4], seconds=first.seconds, emitted=5)
    steps = [first.seconds]
    for _ in range(3):
        plan = Plan((4,), 5.0, c.target(1, 5) + 4 * c.draft(1, 1))
        observe(aw, steady, plan, [4], seconds=plan.seconds, emitted=5)
        steps.append(plan.seconds)
    assert sum(steps) > 20 * c.target(1, 1)  # in full, these 4 steps were slower than plain decoding ...
    assert aw.backoffs == 0  # ... amortised as the planner chose them, they pay
    assert aw.per_depth == 0.0  # measured as predicted; the catch-up step taught it nothing


def test_a_catch_up_is_spread_over_the_cycles_the_rows_remaining_tokens_take() -> None:
    c = cost(0.1, 0.0, 0.005, 0.002)
    catch_up = c.draft(1, 300)  # 0.605 s: six plain steps
    long, short = Row(0.9, 4, 300, remaining=400), Row(0.9, 4, 300, remaining=8)
    per_cycle = expected_tokens(0.9, 4, True)
    assert horizon(long, True, 64) == 64 and horizon(short, True, 64) == pytest.approx(8 / per_cycle)
    assert horizon(Row(0.9, 4, 300), True, 64) == 64  # remaining unknown: the cap
    assert plan_windows([long], c, bonus=True, amortize=64).windows == (4,)
    assert plan_windows([short], c, bonus=True, amortize=64).windows == (0,)  # it would not pay itself back
    assert amortised_catch_up(c, [0], [long], True, 64) == pytest.approx(catch_up / 64)
    assert amortised_catch_up(c, [0, 1], [long, short], True, 64) == pytest.approx(c.draft(2, 300) * per_cycle / 8)


def test_a_floor_starts_the_search_at_one_and_the_estimate_chooses_the_depth() -> None:
    c = cost(0.0, 0.01, 0.004, 0.004)  # drafting never pays on its own here
    assert plan_windows([Row(0.9, 8, 0)], c, bonus=True, amortize=16).windows == (0,)
    floored = plan_windows([Row(0.9, 8, 0, floor=1)], c, bonus=True, amortize=16)
    assert floored.windows == (1,)  # held at its floor, no deeper
    assert floored.seconds == pytest.approx(step_seconds(c, [1], [Row(0.9, 8, 0)]))
    cheap = cost(0.1, 0.0, 0.005, 0.0)  # a flat verify: a floored row goes as deep as it pays
    assert plan_windows([Row(0.9, 8, 0, floor=1)], cheap, bonus=True, amortize=16).windows == (8,)
    assert plan_windows([Row(0.9, 0, 0, floor=1)], cheap, bonus=True, amortize=16).windows == (0,)  # cap first
    mixed = [Row(0.2, 3, 0, fixed=True), Row(0.9, 8, 0, floor=1), Row(0.9, 8, 0, floor=1)]
    plan = plan_windows(mixed, cheap, bonus=True, amortize=16)
    assert plan.windows == (3, 8, 8) and plan.seconds == pytest.approx(step_seconds(cheap, [3, 8, 8], mixed))


def test_optimism_decides_whether_a_row_drafts_and_the_estimate_how_far() -> None:
    c = cost(0.05, 0.004, 0.02, 0.0)
    on_estimate = PlannerConfig(optimism=0.0, probe_every=0)
    hopeful = PlannerConfig(optimism=1.0, probe_every=0)
    key = ("judge", 0.5, True)
    # a thin, unlucky start under a low prior: the estimate says "do not draft", its upper bound says "draft"
    thin = {"r0": Tally(1.0, 3.0)}
    inputs = [RowInput("r0", key, 8, 0)]
    aws = [AutoWindow(cfg, c, bonus=True) for cfg in (on_estimate, hopeful)]
    for aw in aws:
        aw.rows = dict(thin)
        aw.keys = {key: Tally(1.0, 3.0)}
    assert aws[0].plan(inputs).windows == (0,)
    assert aws[1].plan(inputs).windows[0] > 0
    # well measured: the upper bound is longer than the estimate, but the window is the estimate's
    measured = {"r0": Tally(42.0, 50.0)}
    for aw in aws:
        aw.rows = dict(measured)
    chosen = aws[1].plan(inputs).windows[0]
    assert chosen == aws[0].plan(inputs).windows[0] > 0
    upper = plan_windows([Row(aws[1].row_upper(inputs[0]), 8, 0)], c, bonus=True, amortize=64).windows[0]
    assert upper > chosen


def test_a_catch_up_is_spread_over_the_cycles_rows_have_drafted_per_catch_up() -> None:
    """Under a load that flips the plan, a row that starts drafting pays a catch-up that serves only a few cycles
    before it stops again; the planner learns how many and stops starting rows whose catch-up would not pay."""
    c = cost(0.1, 0.0, 0.005, 0.002)
    aw = AutoWindow(PlannerConfig(probe_every=0, amortize=64), c, bonus=True)
    key = ("lossless", 0.0, True)
    lagging = RowInput("r0", key, 4, 3000, remaining=4000)
    assert aw.amortize == 64 and aw.plan([lagging]).windows == (4,)
    for _ in range(30):  # a catch-up, two drafting cycles, then a stop (a window of 0): episodes of 3 cycles
        observe(aw, [lagging], Plan((4,), 5.0, 0.1), [4], 0.1, 5)
        steady = RowInput("r0", key, 4, 0, remaining=4000)
        for _ in range(2):
            observe(aw, [steady], Plan((4,), 5.0, 0.1), [4], 0.1, 5)
        observe(aw, [steady], Plan((0,), 1.0, 0.1), [0], 0.1, 1)
    assert aw.episode_len == pytest.approx(3.0, abs=0.5) and aw.amortize == aw.episode_len
    assert aw.plan([lagging]).windows == (0,)  # the same row no longer pays its catch-up back
    # a row that drafts from its catch-up to its end teaches the long horizon back
    observe(aw, [RowInput("r1", key, 4, 300)], Plan((4,), 5.0, 0.1), [4], 0.1, 5)
    for _ in range(59):
        observe(aw, [RowInput("r1", key, 4, 0)], Plan((4,), 5.0, 0.1), [4], 0.1, 5)
    aw.plan([RowInput("r2", key, 4, 0)])  # r1 has left: its episode of 60 cycles ends
    assert aw.episode_len == pytest.approx(0.8 * 3.0 + 0.2 * 60, abs=0.5)


def test_a_probe_that_stops_at_once_teaches_nothing_of_episode_length() -> None:
    c = cost(0.0, 0.01, 0.004, 0.004)  # the planner never drafts: only the probe does
    aw = AutoWindow(PlannerConfig(probe_every=4, probe_budget=0.99), c, bonus=True)
    inputs = [RowInput("r0", ("lossless", 0.0, True), 8, 50)]
    for _ in range(400):
        plan = aw.plan(inputs)
        observe(aw, inputs, plan, [min(plan.windows[0], 2)], plan.seconds, 1 + min(plan.windows[0], 2))
    assert aw.probes >= 3 and aw.episode_len == 64.0
