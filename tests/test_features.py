"""Training features are the tensors the engine hands the judge hook at inference (method §3, §9.6)."""

from __future__ import annotations

import torch

from conftest import make_engine, run_all
from engine import Request, SamplingParams, SpecParams
from engine.spec.judging import JudgeInput
from training.features import collect_features


class EvenPositionJudge:
    """Calls mismatches at even positions unimportant; keeps every call's inputs."""

    uses_draft_hidden = True

    def __init__(self) -> None:
        self.calls: list[JudgeInput] = []

    def score(self, batch: JudgeInput) -> torch.Tensor:
        self.calls.append(batch)
        return torch.where(batch.positions % 2 == 0, -torch.inf, torch.inf)

    def check_profile(self, profile: str) -> None:
        pass


def test_training_features_equal_the_judge_hook_tensors(target, draft) -> None:
    judge = EvenPositionJudge()
    engine = make_engine(target, draft, judge=judge, bonus=False)
    prompts = {"a": (4, 8, 15, 16, 23, 42), "b": (7, 1, 9)}
    reqs = [
        Request(rid, p, SamplingParams(max_tokens=40, ignore_eos=True), SpecParams(judge_threshold=0.5))
        for rid, p in prompts.items()
    ]
    tokens, _ = run_all(engine, reqs)
    finals = {rid: [*prompts[rid], *tokens[rid]] for rid in prompts}
    # Mismatches judged in the context the final sequence keeps: every earlier slot of the window was kept.
    expected: dict[str, dict[int, tuple[int, int, torch.Tensor, torch.Tensor]]] = {rid: {} for rid in prompts}
    for call in judge.calls:
        for b, rid in enumerate(call.request_ids):
            seq = finals[rid]
            for i in range(call.positions.shape[1]):
                p = int(call.positions[b, i])
                d = int(call.draft_token_ids[b, i])
                drafted_before = call.draft_token_ids[b, :i].tolist()
                if p >= len(seq) or seq[p - i : p] != drafted_before:
                    break  # the window was cut before this slot
                if bool(call.mismatch[b, i]):
                    important = int(seq[p] != d)
                    assert important == p % 2  # the judge's decision is what the final sequence holds
                    expected[rid][p] = (important, d, call.target_hidden[b, i], call.draft_hidden[b, i])
    records = [
        {
            "prompt_id": rid,
            "final_token_ids": finals[rid],
            # The current token is not read by feature collection; the final sequence's token stands in.
            "mismatches": [[p, imp, finals[rid][p], d] for p, (imp, d, _, _) in sorted(expected[rid].items())],
            "target_outcome": "x",
            "meta": {"pair": {}, "source": "test", "max_new_tokens": 40, "oracle": {}},
        }
        for rid in prompts
    ]
    n_imp = sum(m[1] for r in records for m in r["mismatches"])
    n_all = sum(len(r["mismatches"]) for r in records)
    assert n_all >= 6 and 0 < n_imp < n_all
    fs = collect_features(records, target, draft, group=2)
    k = 0
    for r in records:
        for p, *_ in r["mismatches"]:
            _, _, dt, dd = expected[r["prompt_id"]][p]
            assert int(fs.positions[k]) == p
            torch.testing.assert_close(fs.dt[k], dt, atol=1e-5, rtol=0)
            torch.testing.assert_close(fs.dd[k], dd, atol=1e-5, rtol=0)
            k += 1
    assert k == len(fs.labels)
