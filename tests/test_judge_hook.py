"""The judge hook: scripted judges decide chosen mismatches; τ = 0 stays lossless; τ = 1 gives the draft."""

from __future__ import annotations

import torch

from conftest import make_engine, run_all
from engine import Request, SamplingParams, SpecParams
from engine.model.protocol import ForwardBatch
from engine.spec.judging import JudgeInput


class ScriptedJudge:
    """Calls a mismatch unimportant exactly at chosen (request, absolute position) pairs; records its inputs."""

    uses_draft_hidden = True

    def __init__(self, accept: set[tuple[str, int]]) -> None:
        self.accept = accept
        self.calls: list[JudgeInput] = []

    def score(self, batch: JudgeInput) -> torch.Tensor:
        self.calls.append(batch)
        z = torch.full(batch.positions.shape, torch.inf)
        for b, rid in enumerate(batch.request_ids):
            for i, pos in enumerate(batch.positions[b].tolist()):
                if (rid, pos) in self.accept:
                    z[b, i] = -torch.inf
        return z

    def check_profile(self, profile: str) -> None:
        pass


def greedy_next(model, ids: list[int]) -> int:
    batch = ForwardBatch.build([ids], [0], [0], torch.device("cpu"))
    with torch.no_grad():
        return int(model.compute_logits(model(batch, None))[0, -1].argmax())


def reference_with_swaps(target, draft, prompt, max_tokens, accept_at):
    """Token by token: the target's token, or the draft's where the script accepts that mismatch."""
    ids = list(prompt)
    swapped = []
    for _ in range(max_tokens):
        t, d = greedy_next(target, ids), greedy_next(draft, ids)
        if d != t and len(ids) in accept_at:
            swapped.append(len(ids))
            ids.append(d)
        else:
            ids.append(t)
    return ids[len(prompt) :], swapped


def test_scripted_judge_yields_expected_sequence(target, draft):
    prompt = (5, 17, 33, 2, 90, 41)
    # Accept every mismatch at even positions; odd-position mismatches are important.
    accept_at = set(range(len(prompt), len(prompt) + 30, 2))
    expected, swapped = reference_with_swaps(target, draft, prompt, 30, accept_at)
    assert len(swapped) >= 3, "the script must actually swap tokens"
    judge = ScriptedJudge({("a", p) for p in accept_at})
    engine = make_engine(target, draft, judge=judge, bonus=False)
    req = Request(
        "a",
        prompt,
        SamplingParams(max_tokens=30, ignore_eos=True),
        SpecParams(num_speculative_tokens=4, judge_threshold=0.5, profile="math"),
    )
    tokens, finals = run_all(engine, [req])
    assert tokens["a"] == expected
    assert finals["a"].spec.num_judge_accepted == len(swapped)
    assert judge.calls and judge.calls[0].profiles == ("math",)
    assert judge.calls[0].draft_hidden is not None


def test_judge_features_are_states_after_reading_the_draft_token(target, draft):
    """DT row i+1 / DD state: full-sequence hidden at the position whose input is d_{i+1} (method §3)."""
    judge = ScriptedJudge(set())
    engine = make_engine(target, draft, judge=judge)
    prompt = (3, 1, 4, 1, 5, 9, 2, 6)
    engine.add_request(
        Request("h", prompt, SamplingParams(max_tokens=20, ignore_eos=True), SpecParams(judge_threshold=0.5))
    )
    while engine.has_unfinished() and not judge.calls:
        engine.step()
    call = judge.calls[0]
    for i, pos in enumerate(call.positions[0].tolist()):
        assert pos == len(prompt) + i  # first cycle: slot i holds d_{i+1} right after the prompt
        ids = [*prompt, *call.draft_token_ids[0, : i + 1].tolist()]
        batch = ForwardBatch.build([ids], [0], [0], torch.device("cpu"))
        with torch.no_grad():
            full_t = target(batch, None)[0, -1]
            full_d = draft(batch, None)[0, -1]
        torch.testing.assert_close(call.target_hidden[0, i], full_t, atol=1e-5, rtol=0)
        torch.testing.assert_close(call.draft_hidden[0, i], full_d, atol=1e-5, rtol=0)


def test_threshold_one_without_bonus_gives_draft_greedy(target, draft):
    class AcceptAll(ScriptedJudge):
        uses_draft_hidden = False

        def score(self, batch: JudgeInput) -> torch.Tensor:
            return torch.zeros(batch.positions.shape)  # p = 0.5 for every slot

    prompt = (8, 6, 7, 5, 3, 0, 9)
    engine = make_engine(target, draft, judge=AcceptAll(set()), bonus=False)
    req = Request("d", prompt, SamplingParams(max_tokens=25, ignore_eos=True), SpecParams(judge_threshold=1.0))
    tokens, finals = run_all(engine, [req])
    ids = list(prompt)
    for _ in range(25):
        ids.append(greedy_next(draft, ids))
    assert tokens["d"] == ids[len(prompt) :]
    assert finals["d"].spec.num_recovered == 0


def test_threshold_zero_never_consults_the_judge(target, draft):
    judge = ScriptedJudge({("z", p) for p in range(200)})
    tokens, _ = run_all(
        make_engine(target, draft, judge=judge),
        [Request("z", (1, 2, 3), SamplingParams(max_tokens=20, ignore_eos=True), SpecParams())],
    )
    plain, _ = run_all(
        make_engine(target, None), [Request("z", (1, 2, 3), SamplingParams(max_tokens=20, ignore_eos=True))]
    )
    assert tokens == plain and not judge.calls
