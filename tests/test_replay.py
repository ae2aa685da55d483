"""Lockstep evaluation decoding equals the engine's lossy speculative decoding (bonus off) for every window."""

from __future__ import annotations

import pytest
import torch

from conftest import make_engine, overflowing, run_all
from engine import Request, SamplingParams, SpecParams
from engine.spec.judging import HeadJudge
from judge.head import JudgeHead
from training.replay import Job, LockstepDecoder, Method, accept_mismatch, cycles_for_window, mismatch_stats

PROMPTS = [(3, 14, 15, 92, 65), (2, 7, 18), (27, 18, 28, 18, 28, 45, 90, 45)]


def random_head(seed: int = 0, dim: int = 32) -> JudgeHead:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, generator=gen, dtype=torch.float64)
    zeros, ones = torch.zeros(dim, dtype=torch.float64), torch.ones(dim, dtype=torch.float64)
    return JudgeHead("DT", zeros, ones, w, 0.0, torch.linspace(0, 1, 26), 0.5)


def lockstep(target, draft, methods: list[Method], head=None, max_tokens=30, slots=4, eos=()):
    dec = LockstepDecoder(target, draft, head, eos_token_ids=eos, slots=slots, max_len=64)
    jobs = [Job(f"{m.label}/{i}", p, m, max_tokens, seed=i) for m in methods for i, p in enumerate(PROMPTS)]
    return {t.job.job_id: t for t in dec.run(jobs)}


def test_lossless_and_draft_ends_are_the_two_greedy_outputs(target, draft) -> None:
    traces = lockstep(target, draft, [Method("lossless"), Method("draft")])
    plain, _ = run_all(
        make_engine(target, None),
        [Request(str(i), p, SamplingParams(max_tokens=30, ignore_eos=True)) for i, p in enumerate(PROMPTS)],
    )
    only_draft, _ = run_all(
        make_engine(draft, None),
        [Request(str(i), p, SamplingParams(max_tokens=30, ignore_eos=True)) for i, p in enumerate(PROMPTS)],
    )
    for i in range(len(PROMPTS)):
        assert traces[f"lossless/{i}"].tokens == plain[str(i)]
        assert traces[f"draft/{i}"].tokens == only_draft[str(i)]
        assert any(traces[f"lossless/{i}"].mismatch)


@pytest.mark.parametrize("window", [1, 3, 4, 8])
def test_lockstep_equals_engine_with_a_head_judge(target, draft, window) -> None:
    head = random_head()
    traces = lockstep(target, draft, [Method("autojudge", 0.5)], head)
    engine = make_engine(target, draft, judge=HeadJudge({"math": head}), bonus=False)
    spec = SpecParams(num_speculative_tokens=window, profile="math", judge_threshold=0.5)
    reqs = [Request(str(i), p, SamplingParams(max_tokens=30, ignore_eos=True), spec) for i, p in enumerate(PROMPTS)]
    tokens, finals = run_all(engine, reqs)
    judged_in = 0
    for i in range(len(PROMPTS)):
        tr = traces[f"autojudge=0.5/{i}"]
        assert tr.tokens == tokens[str(i)]
        assert cycles_for_window(tr.ok, window) == finals[str(i)].spec.num_spec_steps
        kept = sum(ok and mm for ok, mm in zip(tr.ok, tr.mismatch, strict=True))
        assert kept == finals[str(i)].spec.num_judge_accepted
        judged_in += kept
    assert judged_in > 0


def test_cycles_for_window() -> None:
    assert cycles_for_window([True] * 8, 4) == 2
    assert cycles_for_window([True] * 9, 4) == 3  # a partial last window
    assert cycles_for_window([True, False, True, True, False], 8) == 2
    assert cycles_for_window([False, False], 4) == 2
    assert cycles_for_window([], 4) == 0


def test_baseline_rules() -> None:
    q = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.7, 0.15, 0.1, 0.05]]))
    g = torch.log(torch.tensor([[0.1, 0.2, 0.6, 0.1], [0.7, 0.15, 0.1, 0.05]]))
    d = torch.tensor([2, 3])
    u = torch.tensor([0.2, 0.9])

    def acc(rule: str, param: list[float]) -> list[bool]:
        return accept_mismatch(rule, torch.tensor(param), mismatch_stats(d, q, g), None, u).tolist()

    assert acc("topk", [3, 3]) == [True, False]  # d=2 is the third most likely under the target's row
    assert acc("topk", [2, 4]) == [False, True]
    assert acc("prob", [0.1, 0.04]) == [True, True] and acc("prob", [0.2, 0.2]) == [False, False]
    assert acc("kl-qg", [1e-6, 1e-6]) == [False, True]  # identical rows have zero divergence
    assert acc("random", [0.5, 0.5]) == [True, False]
    assert acc("lossless", [0, 0]) == [False, False] and acc("draft", [0, 0]) == [True, True]
    with pytest.raises(ValueError, match="unknown rule"):
        Method("typical", 0.1)


SWEEP = [
    Method("lossless"),
    Method("draft"),
    Method("autojudge", 0.3),
    Method("autojudge", 0.7),
    Method("topk", 2),
    Method("topk", 5),
    Method("prob", 0.01),
    Method("kl-qg", 0.5),
    Method("kl-gq", 0.5),
    Method("random", 0.5),
]


@pytest.mark.parametrize("slots", [1, 3, 16])
def test_a_shared_sweep_equals_each_method_decoded_alone(target, draft, slots) -> None:
    """Jobs of one prompt share a row until their decisions differ; forking (cache copy, or recompute when no
    slot is free) must give every job exactly the trace it gets when decoded on its own."""
    head = random_head()
    shared = lockstep(target, draft, SWEEP, head, slots=slots, eos=(7,))
    alone: dict[str, object] = {}
    for m in SWEEP:
        alone.update(lockstep(target, draft, [m], head, slots=1, eos=(7,)))
    assert shared.keys() == alone.keys()
    for job_id, tr in shared.items():
        ref = alone[job_id]
        assert (tr.tokens, tr.ok, tr.mismatch) == (ref.tokens, ref.ok, ref.mismatch), job_id
    distinct = {tuple(t.tokens) for t in shared.values()}
    assert len(distinct) > len(PROMPTS)  # the methods really diverged, so forks happened


def test_sharing_decodes_fewer_rows_than_jobs(target, draft) -> None:
    head = random_head()
    dec = LockstepDecoder(target, draft, head, eos_token_ids=(), slots=8, max_len=64)
    jobs = [Job(f"{m.label}/{i}", p, m, 30, seed=i) for m in SWEEP for i, p in enumerate(PROMPTS)]
    done: list[int] = []
    traces = dec.run(jobs, lambda ended: done.append(len(ended)))
    assert 0 < dec.row_steps < sum(len(t.tokens) for t in traces)
    assert sum(done) == len(jobs) and all(n > 0 for n in done)


class LateDrain(LockstepDecoder):
    """`drain` lands between the loop's test and admission: the flag reads False once, then True."""

    reads_left: int | None = None

    @property
    def draining(self) -> bool:
        if self.reads_left is None:
            return False
        self.reads_left -= 1
        return self.reads_left < 0

    @draining.setter
    def draining(self, value: bool) -> None:
        pass

    def drain(self) -> None:
        self.reads_left = 1


def test_a_drain_between_the_loop_test_and_admission_ends_the_run(target, draft) -> None:
    dec = LateDrain(target, draft, None, eos_token_ids=(), slots=1, max_len=64)
    jobs = [Job(f"lossless/{i}", p, Method("lossless"), 10, seed=i) for i, p in enumerate(PROMPTS)]
    traces = dec.run(jobs, lambda ended: dec.drain())  # one job per prompt, one slot: nothing is active then
    assert [t.job.job_id for t in traces] == ["lossless/0"]


def test_a_decoder_without_slots_is_refused(target, draft) -> None:
    with pytest.raises(ValueError, match="at least one slot"):  # it would wait for a free slot for ever
        LockstepDecoder(target, draft, None, eos_token_ids=(), slots=0, max_len=64)


NAN_TOKEN = 5  # see `overflowing`: PROMPTS and the tiny models' outputs from them never hold it
LONG = (*range(10, 50), NAN_TOKEN, 9)  # longer than any later sequence: none overwrites the positions it poisons


def all_finite(dec: LockstepDecoder) -> bool:
    return all(bool(x.isfinite().all()) for r in (dec.target, dec.draft) for x in (*r.cache.k, *r.cache.v))


def test_a_run_whose_target_overflows_ends_failed_and_leaves_its_slot_clean(target, draft) -> None:
    """One slot: the prompts after the failed one reuse its slot, which must hold no NaN K/V once it is freed."""
    methods = [Method("lossless"), Method("draft"), Method("topk", 3)]
    clean = lockstep(target, draft, methods, slots=1)
    assert all(NAN_TOKEN not in t.tokens and not t.failed for t in clean.values())
    dec = LockstepDecoder(overflowing(target, NAN_TOKEN), draft, None, eos_token_ids=(), slots=1, max_len=128)
    bad = [Job(f"{m.label}/bad", LONG, m, 30) for m in methods]
    good = [Job(f"{m.label}/{i}", p, m, 30, seed=i) for m in methods for i, p in enumerate(PROMPTS)]
    failed = dec.run(bad)
    assert all(t.failed and t.tokens == [] for t in failed) and len(failed) == len(bad)
    assert all_finite(dec)  # before any later branch zeroes what lies past its own length
    traces = {t.job.job_id: t for t in dec.run(good)}
    for job_id, want in clean.items():
        got = traces[job_id]
        assert not got.failed and (got.tokens, got.ok, got.mismatch) == (want.tokens, want.ok, want.mismatch)


def test_a_row_whose_draft_overflows_is_the_targets_own_output_even_for_an_accept_all_rule(target, draft) -> None:
    """As in the engine: the draft proposes nothing more, so no rule can keep a token read from NaN logits."""
    plain, _ = run_all(make_engine(target, None), [Request("p", LONG, SamplingParams(max_tokens=30, ignore_eos=True))])
    dec = LockstepDecoder(target, overflowing(draft, NAN_TOKEN), None, eos_token_ids=(), slots=1, max_len=128)
    methods = [Method("lossless"), Method("draft"), Method("prob", 0.0)]
    traces = {t.job.job_id: t for t in dec.run([Job(m.label, LONG, m, 30) for m in methods])}
    for m in methods:
        tr = traces[m.label]
        assert tr.tokens == plain["p"] and not tr.failed
        assert not any(tr.ok) and not any(tr.mismatch)  # one target step per token, nothing drafted to judge
    assert all_finite(dec)
    (after,) = dec.run([Job("after", PROMPTS[0], Method("draft"), 30)])
    assert after.tokens == lockstep(target, draft, [Method("draft")], slots=1)["draft/0"].tokens


def test_a_branch_that_ends_right_after_the_judge_read_an_overflowing_draft_token_frees_a_clean_slot(
    target, draft
) -> None:
    """The judge's read of d writes d's K/V one position past the branch's tokens; when the branch ends in that
    step, no later step overwrites it, so a NaN there would reach the slot's next branch."""
    for prompt in PROMPTS:  # d at the first mismatch (the plain draft emits it), if no earlier token is d
        drafted = lockstep(target, draft, [Method("draft")], slots=1)[f"draft/{PROMPTS.index(prompt)}"]
        k = drafted.mismatch.index(True)
        x, kept = drafted.tokens[k], lockstep(target, draft, [Method("lossless")], max_tokens=k + 1, slots=1)
        if x not in prompt and x not in kept[f"lossless/{PROMPTS.index(prompt)}"].tokens:
            break
    else:
        pytest.fail("no prompt whose first drafted mismatch token is new")
    zeros = torch.zeros(32, dtype=torch.float64)
    rejects_all = JudgeHead(
        "DT", zeros, torch.ones(32, dtype=torch.float64), zeros, 20.0, torch.linspace(0, 1, 26), 0.5
    )
    dec = LockstepDecoder(overflowing(target, x), draft, rejects_all, eos_token_ids=(), slots=1, max_len=64)
    (tr,) = dec.run([Job("j", prompt, Method("autojudge", 0.5), k + 1)])
    assert tr.tokens == kept[f"lossless/{PROMPTS.index(prompt)}"].tokens and not tr.failed
    assert tr.mismatch[-1]  # the judge read x in the branch's last step
    assert all_finite(dec)
