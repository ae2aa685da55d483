"""Pure stop rules: where a multi-token commit must be cut (stop token ids, max_tokens, stop strings)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Detokenize = Callable[[list[int]], str]


@dataclass(frozen=True, slots=True)
class StopDecision:
    num_keep: int  # new tokens to keep
    finish_reason: str | None  # None: keep generating
    stop_reason: int | str | None = None


def check_stop(
    output_ids: Sequence[int],
    num_new: int,
    max_tokens: int,
    stop_ids: frozenset[int],
    stop_strings: Sequence[str],
    detokenize: Detokenize | None,
) -> StopDecision:
    """Scan the last `num_new` tokens of `output_ids` in order; the first stop condition wins.

    A stop token is kept (its id is the stop reason); a stop string keeps the token that completes it, and the
    server trims the text. Stop strings are matched on a tail window so the cost does not grow with length.
    """
    start = len(output_ids) - num_new
    window = max((len(s) for s in stop_strings), default=0) + 1
    for i in range(start, len(output_ids)):
        kept = i - start + 1
        if output_ids[i] in stop_ids:
            return StopDecision(kept, "stop", output_ids[i])
        if stop_strings and detokenize is not None:
            tail = detokenize(list(output_ids[max(0, i + 1 - window) : i + 1]))
            prev = detokenize(list(output_ids[max(0, i + 1 - window) : i]))
            for s in stop_strings:
                # Only a match that this token completes: one already in `prev` would have stopped earlier.
                if s in tail and tail.rfind(s) + len(s) > len(prev.rstrip("\ufffd")):
                    return StopDecision(kept, "stop", s)
        if i + 1 >= max_tokens:
            return StopDecision(kept, "length")
    return StopDecision(num_new, None)
