"""Scheduler: FIFO admission into free KV slots, commit of emitted tokens (stops, cache lengths), release."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.sequence import Sequence, Status
from engine.stopping import Detokenize, check_stop


class QueueFullError(RuntimeError):
    """The waiting queue is at `max_waiting`; the caller should retry later."""


@dataclass(frozen=True, slots=True)
class ScheduledBatch:
    prefill: list[Sequence]  # admitted this step; their prompts go into the caches first
    running: list[Sequence]  # every running sequence, including the admitted ones


class Scheduler:
    def __init__(
        self,
        max_slots: int,
        max_waiting: int,
        max_prefill_tokens: int,
        eos_token_ids: frozenset[int],
        detokenize: Detokenize | None,
        reuse_prefix: bool,
    ) -> None:
        self.free_slots = list(range(max_slots - 1, -1, -1))
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_token_ids = eos_token_ids
        self.detokenize = detokenize
        self.reuse_prefix = reuse_prefix
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # What a free slot's caches still hold from its last request: tokens, target and draft valid lengths.
        self.retained: dict[int, tuple[list[int], int, int]] = {}

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"waiting queue is full ({self.max_waiting} requests)")
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        """Admit waiting sequences in FIFO order while slots and the prefill token budget last."""
        admitted: list[Sequence] = []
        budget = self.max_prefill_tokens
        while self.waiting and self.free_slots:
            seq = self.waiting[0]
            if admitted and seq.num_prompt_tokens > budget:
                break  # the first one always goes, however long, so nothing starves
            self.waiting.popleft()
            budget -= seq.num_prompt_tokens
            self._assign_slot(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
        return ScheduledBatch(prefill=admitted, running=list(self.running))

    def _assign_slot(self, seq: Sequence) -> None:
        """Give `seq` the free slot that saves the most work, and set how many prompt positions it can reuse there.

        Reusing `shared` retained positions saves computing them now; overwriting the slot loses the rest of what it
        retained, which only a later request might have used, so that loss counts half: a slot scores
        `shared - (retained - shared) / 2`, and an empty slot 0. So a long prefix of another prompt is not given up
        for its first few tokens, while a repeated prompt or the next turn of a chat lands on its slot. Ties go to the
        longer reuse, then to the least recently freed slot. Prompt tokens beyond the retained valid lengths are
        recomputed; the last prompt token is always fed by the first cycle."""
        prompt = seq.token_ids[:-1]
        candidates = []  # (2 x score, shared, recency order, slot)
        for i, slot in enumerate(self.free_slots):
            kept = self.retained.get(slot)
            if kept is None:
                candidates.append((0, 0, i, slot))  # the last in the list first: slot 0 at start
            else:
                shared = _common_prefix(kept[0], prompt, kept[1])
                candidates.append((3 * shared - kept[1], shared, -i, slot))
        _, best_len, _, best = max(candidates)
        self.free_slots.remove(best)
        seq.slot = best
        kept = self.retained.pop(best, None)
        if kept is not None and best_len:
            seq.target_len = seq.num_cached_tokens = best_len
            seq.draft_len = _common_prefix(kept[0], prompt, kept[2]) if seq.num_speculative else 0

    def commit(self, seq: Sequence, new_ids: list[int], num_accepted: int, draft_fed: int) -> list[int]:
        """Append emitted tokens, cut at the first stop, set cache lengths; returns the kept tokens.

        Cache rule (design §5): with committed length L before the cycle, n accepted drafts and L' after,
        the target is valid for `min(L+n, L'-1)` positions and the draft for `min(draft_fed, L+n, L'-1)`.
        """
        length = len(seq.token_ids)
        seq.token_ids.extend(new_ids)
        params = seq.request.sampling
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        decision = check_stop(
            seq.output_token_ids, len(new_ids), params.max_tokens, stop_ids, params.stop, self.detokenize
        )
        del seq.token_ids[length + decision.num_keep :]
        new_len = len(seq.token_ids)
        seq.target_len = min(length + num_accepted, new_len - 1)
        seq.draft_len = min(draft_fed, length + num_accepted, new_len - 1)
        if decision.finish_reason is not None:
            self.finish(seq, decision.finish_reason, decision.stop_reason)
        return new_ids[: decision.num_keep]

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Mark finished and free the slot at once (waiting or running)."""
        seq.status = Status.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq in self.running:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
            if self.reuse_prefix and reason != "error":  # a failed row's cache may hold what failed it
                self.retained[seq.slot] = (seq.token_ids, seq.target_len, seq.draft_len)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.slot = -1

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of `a[:limit]` and `b`."""
    n = min(limit, len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
