"""Drafter: W_b draft steps per row on the draft model (ragged widths, catch-up first) -> DraftProposal."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.kv_cache import SlotKVCache
from engine.runner import ModelRunner, last_rows
from engine.sampling import probs_for_params, sample
from engine.sequence import Sequence


@dataclass(frozen=True, slots=True)
class DraftProposal:
    """Row b drafted `len(token_ids[b])` tokens; rows with width 0 drafted nothing."""

    token_ids: list[list[int]]
    probs: torch.Tensor | None  # [B, W, V] draft distributions of sampled rows (zeros elsewhere)
    hidden: torch.Tensor | None  # [B, W, Dd] draft state after reading d_{i+1} (DD layout only)
    fed_end: list[int]  # draft cache length written by the drafting forwards
    failed: frozenset[int] = frozenset()  # rows whose draft logits overflowed: they hold the tokens drafted before


def catch_up_tokens(seq: Sequence) -> int:
    """Tokens a row's draft cache must read in a forward of its own before drafting: a row that has not drafted
    for a while (or whose draft prefill was deferred) lags by many, and padding every row of step 0 to its length
    would make them all pay for it. A lag of one or two tokens is read by step 0 itself."""
    lag = len(seq.token_ids) - seq.draft_len
    return lag - 1 if lag > 2 else 0


class Drafter:
    """`shared`: the target's cache, when the draft is the target's quantized twin (same architecture, same
    weights before quantization). Its K/V then stand in for the draft's own over context the draft has not read:
    a lagging row copies them instead of running a catch-up forward, and the draft needs no prefill at all. The
    drafts change a little (they attend over the target's K/V of the context), the output of lossless rows does
    not (the target verifies every draft)."""

    def __init__(self, runner: ModelRunner, shared: SlotKVCache | None = None) -> None:
        if shared is not None and not runner.cache.same_shape(shared):
            raise ValueError("a draft that shares the target's K/V needs the target's cache shape, dtype and device")
        self.runner = runner
        self.shared = shared

    def catch_up(self, seq: Sequence) -> int:
        """Tokens a catch-up forward would read before `seq` drafts (0 when they are copied from the target)."""
        return 0 if self.shared is not None else catch_up_tokens(seq)

    def propose(
        self,
        seqs: list[Sequence],
        widths: list[int],
        want_hidden: bool,
        cut: Callable[[], bool] | None = None,
        cuttable: list[bool] | None = None,
    ) -> DraftProposal:
        """Lagging rows read `token_ids[draft_len:-1]` first (`catch_up_tokens`); then step 0 feeds each row's
        remaining tokens `token_ids[draft_len:]`; step k >= 1 feeds d_k. Row b drafts `len(token_ids[b])` tokens.

        `cut` is asked before the drafts and after each draft step: once it says yes, the `cuttable` rows (all by
        default) stop at the tokens they hold, so the verify comes sooner (a new request is waiting for the step).
        A row whose draft logits are not finite stops too, at the tokens drawn before (`DraftProposal.failed`): an
        argmax of NaN logits is no proposal, and a judge profile could accept it.

        NOTE: with `want_hidden`, a row of width w also feeds d_w at step w: its state is the DD feature of the
        last slot (method §5, one extra draft forward per cycle), and it advances the draft cache.
        """
        widths = list(widths)
        num_rows, width = len(seqs), max(widths, default=0)
        stoppable = cuttable if cuttable is not None else [True] * num_rows

        def clipped(produced: int) -> bool:
            """True when `cut` fires; the cuttable rows then stop at `produced` tokens."""
            if cut is None or not cut():
                return False
            for b in range(num_rows):
                if stoppable[b]:
                    widths[b] = min(widths[b], produced)
            return True

        was_cut = clipped(0)
        failed: set[int] = set()
        drafted: list[list[int]] = [[] for _ in seqs]
        fed = [s.draft_len for s in seqs]
        dev = self.runner.device
        sampled = any(w > 0 and not s.request.sampling.greedy for s, w in zip(seqs, widths, strict=True))
        vocab = self.runner.model.config.vocab_size
        probs = torch.zeros(num_rows, width, vocab, device=dev) if sampled else None
        hidden_size = self.runner.model.config.hidden_size
        hidden = torch.zeros(num_rows, width, hidden_size, device=dev) if want_hidden else None
        if self.shared is not None:  # in place of the catch-up forward; a lag of one or two step 0 reads itself
            for b in range(num_rows):
                if widths[b] > 0 and catch_up_tokens(seqs[b]):
                    self.runner.cache.read_from(self.shared, seqs[b].slot, fed[b], seqs[b].target_len)
                    fed[b] = seqs[b].target_len
        lagging = [b for b in range(num_rows) if widths[b] > 0 and self.catch_up(seqs[b])]
        if lagging:
            feeds = [seqs[b].token_ids[fed[b] : -1] for b in lagging]
            self.runner.forward(feeds, [fed[b] for b in lagging], [seqs[b].slot for b in lagging])
            for b in lagging:
                fed[b] = len(seqs[b].token_ids) - 1
        for step in range(width + int(want_hidden)):
            rows = [b for b in range(num_rows) if step < widths[b] + int(want_hidden) and widths[b] > 0]
            if not rows:
                break
            feeds = [seqs[b].token_ids[fed[b] :] if step == 0 else [drafted[b][-1]] for b in rows]
            out = self.runner.forward(feeds, [fed[b] for b in rows], [seqs[b].slot for b in rows])
            h_last = last_rows(out, [len(f) for f in feeds])  # [A, Dd]
            for b, f in zip(rows, feeds, strict=True):
                fed[b] += len(f)
            if hidden is not None and step >= 1:
                hidden[rows, step - 1] = h_last
            producing = [a for a, b in enumerate(rows) if step < widths[b]]
            if producing:
                for b in self._choose(seqs, rows, producing, h_last, step, drafted, probs):
                    failed.add(b)
                    widths[b] = step  # fed no more: its cache holds the overflow, which the engine clears
                was_cut = was_cut or clipped(step + 1)
        end = max(widths, default=0)  # a cut leaves the tensors wider than any window
        return DraftProposal(
            token_ids=drafted,
            probs=None if probs is None else probs[:, :end],
            hidden=None if hidden is None else hidden[:, :end],
            fed_end=fed,
            failed=frozenset(failed),
        )

    def _choose(
        self,
        seqs: list[Sequence],
        rows: list[int],
        producing: list[int],
        h_last: torch.Tensor,  # [A, Dd]
        step: int,
        drafted: list[list[int]],
        probs: torch.Tensor | None,  # [B, W, V]
    ) -> list[int]:
        """Pick d_{step+1} for the producing rows (argmax, or a draw from the transformed distribution); returns
        the rows whose logits are not finite, which get no token."""
        logits = self.runner.logits(h_last[producing])  # [P, V]
        top = logits.max(-1)  # max propagates NaN: the argmax and the numerics check in one pass
        greedy_ids, finite = top.indices.tolist(), top.values.isfinite().tolist()
        failed = []
        for p, a in enumerate(producing):
            b, seq = rows[a], seqs[rows[a]]
            if not finite[p]:
                failed.append(b)
            elif seq.request.sampling.greedy:
                drafted[b].append(greedy_ids[p])
            else:
                assert probs is not None
                dist = probs_for_params(logits[p : p + 1], [seq.request.sampling])[0]  # [V]
                probs[b, step] = dist
                drafted[b].append(sample(dist, seq.generator))
        return failed
