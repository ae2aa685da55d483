"""Table-driven acceptance rules, and the rejection sampler's distribution (pure functions)."""

from __future__ import annotations

import pytest
import torch

from engine.sampling import logits_to_probs, residual_distribution
from engine.spec.acceptance import autojudge_accept, greedy_match, ratio_test
from judge.decide import judge_accepts

T, F = True, False


@pytest.mark.parametrize(
    ("exact", "judge", "width", "n", "judged"),
    [
        ([T, T, T, T], [F, F, F, F], 4, 4, [F, F, F, F]),  # all match
        ([F, T, T, T], [F, F, F, F], 4, 0, [F, F, F, F]),  # important mismatch at slot 1
        ([F, T, F, T], [T, F, F, F], 4, 2, [T, F, F, F]),  # unimportant, match, important
        ([F, F, F, F], [T, T, T, T], 4, 4, [T, T, T, T]),  # all unimportant
        ([T, T, T, T], [F, F, F, F], 2, 2, [F, F, F, F]),  # row narrower than the batch window
        ([T, T, T, T], [F, F, F, F], 0, 0, [F, F, F, F]),  # W = 0: plain decoding row
    ],
)
def test_autojudge_accept_table(exact, judge, width, n, judged):
    got_n, got_judged = autojudge_accept(torch.tensor([exact]), torch.tensor([judge]), torch.tensor([width]))
    assert got_n.tolist() == [n]
    assert got_judged[0].tolist() == judged


def test_mixed_batch_with_per_row_thresholds():
    draft = torch.tensor([[5, 6, 7], [5, 6, 7], [5, 6, 7]])
    target_argmax = torch.tensor([[5, 9, 7, 1], [5, 9, 7, 1], [5, 9, 9, 1]])
    exact = greedy_match(draft, target_argmax)
    z = torch.tensor([[0.0, -1.0, 0.0], [0.0, -1.0, 0.0], [0.0, 2.0, 0.0]])  # logit(p_important)
    tau = torch.tensor([0.0, 0.5, 1.0])
    judge_ok = ~exact & judge_accepts(z, tau)
    n, judged = autojudge_accept(exact, judge_ok, torch.tensor([3, 3, 3]))
    assert n.tolist() == [1, 3, 3]  # τ=0 lossless; τ=0.5 accepts z=-1; τ=1 accepts every finite score
    assert judged.sum(1).tolist() == [0, 1, 2]


def test_logit_space_extremes():
    z = torch.tensor([[-torch.inf, -80.0, 80.0, torch.inf]])
    assert judge_accepts(z, torch.tensor([0.0])).tolist() == [[F, F, F, F]]
    assert judge_accepts(z, torch.tensor([1.0])).tolist() == [[T, T, T, F]]


def test_rejection_sampler_reproduces_target_distribution():
    gen = torch.Generator().manual_seed(0)
    vocab, n = 12, 200_000
    q = torch.rand(vocab, generator=gen) ** 3
    q /= q.sum()
    g = torch.rand(vocab, generator=gen)
    g /= g.sum()
    d = torch.multinomial(g, n, replacement=True, generator=gen)
    u = torch.rand(n, generator=gen)
    ok = ratio_test(d[:, None], g.expand(n, 1, vocab), q.expand(n, 1, vocab), u[:, None])[:, 0]
    recovered = torch.multinomial(residual_distribution(q, g), n, replacement=True, generator=gen)
    out = torch.where(ok, d, recovered)
    freq = torch.bincount(out, minlength=vocab).float() / n
    assert (freq - q).abs().sum() / 2 < 0.01
    assert (g - q).abs().sum() / 2 > 0.2  # the draft alone is far from the target


def test_logits_to_probs_top_k_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    probs = logits_to_probs(logits, torch.tensor([1.0, 1.0]), torch.tensor([2, 0]), torch.tensor([1.0, 0.5]))
    assert probs[0, 2:].sum() == 0 and torch.isclose(probs[0].sum(), torch.tensor(1.0))
    assert probs[1, 1:].sum() == 0  # top token already holds > 50% of the mass
    hot = logits_to_probs(logits[:1], torch.tensor([100.0]), torch.tensor([0]), torch.tensor([1.0]))
    assert hot.max() - hot.min() < 0.02
