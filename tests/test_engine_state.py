"""Engine state: KV rollback, sampling determinism and distribution, slots, aborts, stops, bad requests."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import VOCAB, make_engine, overflowing, perturbed, run_all, tiny_decoder
from engine import Request, SamplingParams, SpecParams
from engine.model.protocol import ForwardBatch
from engine.scheduler import QueueFullError
from engine.spec.judging import HeadJudge
from engine.types import StepStats
from judge.head import JudgeHead

NAN_TOKEN = 5  # see `overflowing`: the prompts below and the clean rows' outputs never hold it


def fresh_next_logits(model, ids):
    batch = ForwardBatch.build([ids], [0], [0], torch.device("cpu"))
    with torch.no_grad():
        return model.compute_logits(model(batch, None))[0, -1]


@pytest.mark.parametrize("bonus", [True, False])
def test_logits_after_rollback_equal_fresh_prefill(target, draft, bonus):
    engine = make_engine(target, draft, slots=3, bonus=bonus)
    for i in range(3):
        engine.add_request(
            Request(
                f"r{i}",
                (7, i, 3, 9)[: i + 2],
                SamplingParams(max_tokens=60, ignore_eos=True),
                SpecParams(num_speculative_tokens=6),
            )
        )
    for _ in range(5):
        engine.step()
    rows = engine.scheduler.running
    assert any(s.counts.num_recovered for s in rows), "some cycles must have rolled back"
    for runner, attr, model in ((engine.target, "target_len", target), (engine.draft, "draft_len", draft)):
        for s in rows:
            cached = getattr(s, attr)
            hidden = runner.forward([s.token_ids[cached:]], [cached], [s.slot])
            got = runner.logits(hidden[0, -1])
            torch.testing.assert_close(got, fresh_next_logits(model, s.token_ids), atol=1e-5, rtol=0)


def sampled(i: int, seed: int | None, **kw) -> Request:
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.95, top_k=40, seed=seed, ignore_eos=True)
    return Request(f"s{i}", (4, 8, 15, 16, 23, 42), params, SpecParams(**kw))


def test_seeded_sampling_is_deterministic_and_batch_independent(target, draft):
    alone, _ = run_all(make_engine(target, draft), [sampled(0, seed=11)])
    crowd, _ = run_all(make_engine(target, draft), [sampled(i, seed=11 + i) for i in range(5)])
    again, _ = run_all(make_engine(target, draft), [sampled(0, seed=11)])
    assert alone["s0"] == crowd["s0"] == again["s0"]
    assert crowd["s1"] != crowd["s0"]


def test_speculative_sampling_matches_target_distribution(target):
    """The first token's empirical distribution matches the target's, not the (very different) draft's."""
    far_draft = perturbed(target, 0.3, seed=7)
    prompt = (4, 8, 15, 16, 23, 42)
    logits = fresh_next_logits(target, list(prompt))
    q = torch.softmax(logits / 2.0, -1)
    g = torch.softmax(fresh_next_logits(far_draft, list(prompt)) / 2.0, -1)
    n = 1500
    params = SamplingParams(max_tokens=2, temperature=2.0, seed=0, ignore_eos=True)
    reqs = [
        Request(
            f"q{i}",
            prompt,
            SamplingParams(**{**_fields(params), "seed": i}),
            SpecParams(num_speculative_tokens=1),
        )
        for i in range(n)
    ]
    engine = make_engine(target, far_draft)
    engine.scheduler.max_waiting = n
    tokens, finals = run_all(engine, reqs)
    first = torch.tensor([tokens[f"q{i}"][0] for i in range(n)])
    freq = torch.bincount(first, minlength=VOCAB).float() / n
    tv_target = (freq - q).abs().sum().item() / 2
    tv_draft = (freq - g).abs().sum().item() / 2
    assert sum(f.spec.num_recovered for f in finals.values()) > n / 4, "many drafts must be rejected"
    assert tv_target < 0.12 and tv_target < tv_draft / 3


def _fields(params: SamplingParams) -> dict:
    return {k: getattr(params, k) for k in params.__slots__}


def test_slots_never_leak_after_finish_or_abort(target, draft):
    rng = random.Random(0)
    engine = make_engine(target, draft, slots=4)
    live: list[str] = []
    for i in range(100):
        width = rng.choice([0, 1, 3, 8])
        length = rng.randint(1, 12)
        engine.add_request(
            Request(
                f"x{i}",
                tuple(rng.randrange(VOCAB) for _ in range(length)),
                SamplingParams(max_tokens=rng.randint(1, 10), temperature=rng.choice([0.0, 1.0]), seed=i),
                SpecParams(num_speculative_tokens=width),
            )
        )
        live.append(f"x{i}")
        if rng.random() < 0.3:
            victim = live.pop(rng.randrange(len(live)))
            engine.abort(victim)
        for out in engine.step():
            assert len(engine.scheduler.running) <= 4
            if out.finished and out.request_id in live:
                live.remove(out.request_id)
    while engine.has_unfinished():
        engine.step()
    assert engine.num_free_slots == 4 and not engine.scheduler.running and not engine.scheduler.waiting


def test_abort_returns_final_output_and_frees_slot(target, draft):
    engine = make_engine(target, draft, slots=1)
    engine.add_request(Request("a", (1, 2), SamplingParams(max_tokens=50)))
    engine.add_request(Request("b", (3, 4), SamplingParams(max_tokens=5)))
    engine.step()
    out = engine.abort("a")
    assert out is not None and out.finished and out.finish_reason == "abort"
    assert engine.num_free_slots == 1
    assert engine.abort("a") is None
    assert engine.abort("b").finish_reason == "abort"  # a waiting request aborts too
    assert not engine.has_unfinished()


def test_max_tokens_and_stop_strings_truncate_inside_a_window(target, draft):
    def detok(ids: list[int]) -> str:
        return "".join(chr(65 + i % 26) for i in ids)

    plain, _ = run_all(
        make_engine(target, None), [Request("p", (9, 9, 1), SamplingParams(max_tokens=30, ignore_eos=True))]
    )
    text = detok(plain["p"])
    stop = text[12:15]
    cut = text.find(stop) + len(stop)
    engine = make_engine(target, draft, detokenize=detok)
    req = Request(
        "p",
        (9, 9, 1),
        SamplingParams(max_tokens=30, stop=(stop,), ignore_eos=True),
        SpecParams(num_speculative_tokens=8),
    )
    tokens, finals = run_all(engine, [req])
    assert tokens["p"] == plain["p"][:cut]
    assert finals["p"].finish_reason == "stop" and finals["p"].stop_reason == stop
    tokens, finals = run_all(
        make_engine(target, draft),
        [
            Request(
                "m",
                (9, 9, 1),
                SamplingParams(max_tokens=7, ignore_eos=True),
                SpecParams(num_speculative_tokens=8),
            )
        ],
    )
    assert tokens["m"] == plain["p"][:7] and finals["m"].finish_reason == "length"


def test_bad_requests_are_refused_clearly(target, draft):
    engine = make_engine(target, draft)
    with pytest.raises(ValueError, match="context limit"):
        engine.add_request(Request("long", (1,) * 100, SamplingParams(max_tokens=100)))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request(Request("v", (VOCAB,), SamplingParams()))
    with pytest.raises(ValueError, match="server limit"):
        engine.add_request(Request("w", (1,), SamplingParams(max_tokens=4), SpecParams(num_speculative_tokens=9)))
    with pytest.raises(ValueError, match="judge_threshold"):
        SpecParams(judge_threshold=1.5)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    engine.add_request(Request("dup", (1,), SamplingParams(max_tokens=4)))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(Request("dup", (1,), SamplingParams(max_tokens=4)))
    engine.scheduler.max_waiting = 1
    with pytest.raises(QueueFullError):
        engine.add_request(Request("full", (1,), SamplingParams(max_tokens=4)))


def test_context_longer_than_model_is_refused(target):
    from engine import CacheConfig, Engine, EngineConfig

    with pytest.raises(ValueError, match="longer than the target model allows"):
        Engine(EngineConfig(cache=CacheConfig(max_model_len=10_000)), target)
    with pytest.raises(MemoryError, match="KV cache needs"):
        Engine(EngineConfig(cache=CacheConfig(max_slots=10**7, max_model_len=256)), target)


@pytest.mark.parametrize("slots", [[0, 1, 2], [5, 3, 4], [0, 15, 7]])  # in place, in place unordered, gathered
def test_cached_forward_matches_full_forward_for_any_slot_layout(target, slots):
    rows = [[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82, 81], [1, 41, 42, 13, 56, 23]]
    cache = target.new_cache(16, 32)
    dev = torch.device("cpu")
    with torch.no_grad():
        batch = ForwardBatch.build([r[:-2] for r in rows], [0, 0, 0], slots, dev)
        assert (batch.slot_range is None) == (slots == [0, 15, 7])
        assert (batch.scatter_rows is None) == (slots != [5, 3, 4])  # only in place out of order scatters q
        target(batch, cache)
        step = target(ForwardBatch.build([r[-2:] for r in rows], [len(r) - 2 for r in rows], slots, dev), cache)
        for b, r in enumerate(rows):
            full = target(ForwardBatch.build([r], [0], [0], dev), None)
            torch.testing.assert_close(step[b], full[0, -2:], atol=1e-5, rtol=0)


def test_a_slot_prefix_is_reused_and_outputs_do_not_change(target, draft):
    """A request that extends a finished one lands on its slot and computes only the new prompt tokens."""
    steps: list[StepStats] = []
    engine = make_engine(target, draft, slots=2, on_step=steps.append)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    first = Request("a", (5, 9, 13, 2, 77, 31, 8), params)
    tokens, _ = run_all(engine, [first])
    assert (steps[0].num_prefix_query_tokens, steps[0].num_prefix_hit_tokens) == (7, 0)
    follow = (*first.prompt_token_ids, *tokens["a"][:6], 41, 42)  # new tokens after a shared prefix
    steps.clear()
    got, finals = run_all(engine, [Request("b", follow, params, SpecParams(num_speculative_tokens=3))])
    assert steps[0].num_prefill_tokens == 1  # only the new token before the last; 13 positions came from the slot
    assert (steps[0].num_prefix_query_tokens, steps[0].num_prefix_hit_tokens) == (15, 13)
    assert all(s.num_prefix_query_tokens == 0 for s in steps[1:])  # counted at admission only
    fresh, _ = run_all(
        make_engine(target, draft, slots=2), [Request("b", follow, params, SpecParams(num_speculative_tokens=3))]
    )
    assert got == fresh
    plain, _ = run_all(make_engine(target, None), [Request("b", follow, params)])
    assert got == plain and finals["b"].finish_reason == "length"


def test_a_retained_prefix_is_not_given_up_for_another_prompts_first_token(target, draft):
    """Two prompts that share only their first token keep a slot each, so both are reused when they come back,
    in either order; with no empty slot left, the prompt goes where its prefix is."""
    steps: list[StepStats] = []
    engine = make_engine(target, draft, slots=3, on_step=steps.append)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    a, b, c = (5, 9, 13, 2, 77, 31, 8), (5, 40, 41, 42, 43, 44, 45), (6, 50, 51, 52, 53, 54, 55)
    hits: list[int] = []
    for i, prompt in enumerate((a, b, c, b, a, c, a)):
        steps.clear()
        run_all(engine, [Request(str(i), prompt, params)])
        hits.append(steps[0].num_prefix_hit_tokens)
    assert hits == [0, 0, 0, 6, 6, 6, 6]


def test_without_prefix_reuse_every_prompt_is_computed_again(target, draft):
    prefills: list[int] = []
    engine = make_engine(
        target, draft, slots=1, reuse_prefix=False, on_step=lambda s: prefills.append(s.num_prefill_tokens)
    )
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompt = (5, 9, 13, 2, 77, 31, 8)
    first, _ = run_all(engine, [Request("a", prompt, params)])
    prefills.clear()
    again, _ = run_all(engine, [Request("b", prompt, params)])
    assert prefills[0] == len(prompt) - 1  # the slot kept nothing for the same prompt
    assert again["b"] == first["a"]


def test_a_row_with_non_finite_logits_fails_alone_and_the_batch_goes_on(target, draft):
    good = [
        Request("g", (1, 2, 3), SamplingParams(max_tokens=20)),
        Request("s", (4, 6, 7), SamplingParams(max_tokens=20, temperature=1.0, seed=3)),
    ]
    bad = Request("bad", (8, NAN_TOKEN, 9), SamplingParams(max_tokens=20, temperature=1.0, seed=4))
    want, _ = run_all(make_engine(target, draft, slots=4), good)
    assert all(NAN_TOKEN not in ids for ids in want.values())
    engine = make_engine(overflowing(target, NAN_TOKEN), draft, slots=4)
    tokens, finals = run_all(engine, [good[0], bad, good[1]])
    assert finals["bad"].finish_reason == "error" and "not finite" in finals["bad"].error
    assert tokens["bad"] == [] and tokens["g"] == want["g"] and tokens["s"] == want["s"]
    assert all(finals[r].error is None for r in ("g", "s"))
    assert engine.num_free_slots == 4
    assert all(NAN_TOKEN not in ids for ids, _, _ in engine.scheduler.retained.values())  # its cache is not reused


def test_a_row_whose_draft_logits_overflow_drafts_no_more_and_stays_lossless(target, draft):
    prompts = [(8, NAN_TOKEN, 9), (NAN_TOKEN, 1)]
    plain = [
        Request(f"p{i}", p, SamplingParams(max_tokens=20), SpecParams(enabled=False)) for i, p in enumerate(prompts)
    ]
    want, _ = run_all(make_engine(target, None), plain)
    spec = [Request(f"p{i}", p, SamplingParams(max_tokens=20)) for i, p in enumerate(prompts)]
    spec.append(Request("s", prompts[0], SamplingParams(max_tokens=20, temperature=1.0, seed=5)))
    engine = make_engine(target, overflowing(draft, NAN_TOKEN))
    proposed: list[list[int]] = []
    propose = engine.drafter.propose

    def spy(*args, **kwargs):
        proposal = propose(*args, **kwargs)
        proposed.extend(proposal.token_ids)
        return proposal

    engine.drafter.propose = spy
    tokens, finals = run_all(engine, spec)
    assert all(f.error is None for f in finals.values()) and len(tokens["s"]) == 20
    assert not any(proposed)  # every draft forward of these prompts overflows: nothing from NaN logits is proposed
    assert all(bool(kv.isfinite().all()) for kv in (*engine.draft.cache.k, *engine.draft.cache.v))  # cleared
    assert {k: tokens[k] for k in want} == want


def test_a_judge_never_accepts_a_token_drawn_from_overflowed_draft_logits(target, draft):
    """A head that accepts every mismatch gives the target's own tokens when the draft only overflows."""
    prompt = (8, NAN_TOKEN, 9)
    want, _ = run_all(make_engine(target, None), [Request("p", prompt, SamplingParams(max_tokens=20))])
    zeros = torch.zeros(32, dtype=torch.float64)
    head = JudgeHead("DT", zeros, torch.ones(32, dtype=torch.float64), zeros, -20.0, torch.linspace(0, 1, 26), 0.5)
    engine = make_engine(target, overflowing(draft, NAN_TOKEN), judge=HeadJudge({"math": head}))
    lossy = SpecParams(num_speculative_tokens=4, profile="math", judge_threshold=0.5)
    tokens, finals = run_all(engine, [Request("p", prompt, SamplingParams(max_tokens=20), lossy)])
    assert finals["p"].error is None and tokens["p"] == want["p"]
    assert finals["p"].spec.num_judge_accepted == 0


def test_a_failed_rows_slot_is_clean_for_the_next_request(target, draft):
    """Attention reads masked positions too, and a masked NaN still poisons: the failed row's K/V must go."""
    long = Request("long", (1, 2, 3, 4, 6, 7, 8, 9), SamplingParams(max_tokens=60))
    bad = Request("bad", (8, NAN_TOKEN, 9, 10, 11, 12, 13), SamplingParams(max_tokens=20))
    # Admitted into the slot `bad` freed; without drafts, its verify reads that slot's stale positions.
    late = Request("late", (2, 3), SamplingParams(max_tokens=20), SpecParams(enabled=False))
    want, _ = run_all(make_engine(target, draft, slots=2), [long], join_at={3: [late]})
    tokens, finals = run_all(make_engine(overflowing(target, NAN_TOKEN), draft, slots=2), [long, bad], {3: [late]})
    assert finals["bad"].finish_reason == "error"
    assert finals["late"].error is None and tokens["late"] == want["late"] and tokens["long"] == want["long"]


def test_a_draft_token_that_overflows_the_target_is_rejected_not_fatal(target, draft, monkeypatch):
    request = Request("g", (1, 2, 3), SamplingParams(max_tokens=30))
    want, only_drafted = drafted_only(target, draft, request, monkeypatch)
    assert only_drafted  # the draft proposes tokens the target never emits
    tokens, finals = run_all(make_engine(overflowing(target, only_drafted[0]), draft), [request])
    assert finals["g"].error is None and tokens["g"] == want


def drafted_only(target, draft, request: Request, monkeypatch) -> tuple[list[int], list[int]]:
    """The target's own greedy tokens for `request`, and tokens the draft proposes that the target never emits."""
    want, _ = run_all(make_engine(target, None), [request])
    engine = make_engine(target, draft)
    drafted: set[int] = set()
    propose = engine.drafter.propose

    def spy(*args, **kwargs):
        proposal = propose(*args, **kwargs)
        drafted.update(t for row in proposal.token_ids for t in row)
        return proposal

    monkeypatch.setattr(engine.drafter, "propose", spy)
    run_all(engine, [request])
    return want[request.request_id], sorted(drafted - set(want[request.request_id]) - set(request.prompt_token_ids))


def test_a_token_that_overflows_both_models_leaves_no_nan_in_the_draft_cache(target, monkeypatch):
    draft = tiny_decoder(7, layers=1)
    request = Request("g", (1, 2, 3), SamplingParams(max_tokens=30))
    want, only_drafted = drafted_only(target, draft, request, monkeypatch)
    engine = make_engine(overflowing(target, only_drafted[0]), overflowing(draft, only_drafted[0]), slots=2)
    tokens, finals = run_all(engine, [request])
    assert finals["g"].error is None and tokens["g"] == want
    assert all(bool(kv.isfinite().all()) for kv in (*engine.draft.cache.k, *engine.draft.cache.v))


def test_an_overflowing_draft_does_not_break_a_dd_dt_judge(target, monkeypatch):
    """The dropped row was the widest: the judge must get the draft states at the new width."""
    draft = tiny_decoder(7, layers=1)
    a = Request("A", (1, 2, 3), SamplingParams(max_tokens=30), SpecParams(num_speculative_tokens=4))
    b = Request(
        "B",
        (50, 51, 52),
        SamplingParams(max_tokens=60),
        SpecParams(num_speculative_tokens=2, profile="math", judge_threshold=0.6),
    )
    want, only_drafted = drafted_only(target, draft, a, monkeypatch)
    zeros = torch.zeros(64, dtype=torch.float64)
    head = JudgeHead("DD-DT", zeros, torch.ones(64, dtype=torch.float64), zeros, 0.0, torch.linspace(0, 1, 26), 0.5)
    engine = make_engine(overflowing(target, only_drafted[0]), draft, judge=HeadJudge({"math": head}))
    tokens, finals = run_all(engine, [a, b])
    assert tokens["A"] == want and all(f.error is None for f in finals.values())
    assert finals["B"].spec.num_judge_accepted > 0  # the judge ran beside the dropped row


def test_a_sampled_row_whose_drafts_overflow_the_target_keeps_the_targets_distribution(target):
    """Its first draft gets one speculative step against the target's distribution, as a rejection would not."""
    far_draft = perturbed(target, 0.3, seed=7)
    prompt = (4, 8, 15, 16, 23, 42)
    q = torch.softmax(fresh_next_logits(target, list(prompt)) / 2.0, -1)
    g = torch.softmax(fresh_next_logits(far_draft, list(prompt)) / 2.0, -1)
    # A token the draft proposes more often than the target emits it: a residual never gives it back.
    x = max((t for t in range(VOCAB) if g[t] > q[t] and t not in prompt), key=lambda t: float(q[t] * g[t]))
    n = 1500
    reqs = [
        Request(
            f"q{i}",
            prompt,
            SamplingParams(max_tokens=2, temperature=2.0, seed=i, ignore_eos=True),
            SpecParams(num_speculative_tokens=1),
        )
        for i in range(n)
    ]
    engine = make_engine(overflowing(target, x), far_draft)
    engine.scheduler.max_waiting = n
    tokens, finals = run_all(engine, reqs)
    first = torch.tensor([tokens[f"q{i}"][0] for i in range(n)])
    freq = torch.bincount(first, minlength=VOCAB).float() / n
    sd = float(q[x] * (1 - q[x]) / n) ** 0.5
    assert abs(float(freq[x] - q[x])) < 4 * sd and float(g[x] * q[x]) < float(q[x]) - 4 * sd  # the bias it avoids
    assert (freq - q).abs().sum().item() / 2 < 0.12
    assert sum(f.error is not None for f in finals.values()) == int((first == x).sum())  # x then overflows
