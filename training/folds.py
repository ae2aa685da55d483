"""Cross-fitting folds by problem id: which of K folds a task belongs to, the same in mining, fitting and evaluation.

A fold is the problem's number mod K (`HumanEval/17`, `gsm8k-train-17`: 17 mod K; an id without a trailing number
falls back to its sha256 mod K). It depends on the id alone, so the head that judges fold F is fitted on the
features of every other fold without knowing which problems the evaluation reads, and no problem's own test
outcomes ever train the head that judges it (method: K-fold by task id for code). Numbered ids give folds of equal
size (164 HumanEval tasks: 33, 33, 33, 33, 32), where a hash would give 22 to 44.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Fold:
    index: int  # f in [0, count)
    count: int  # K >= 2

    def __post_init__(self) -> None:
        if self.count < 2 or not 0 <= self.index < self.count:
            raise ValueError(f"a fold is F/K with K >= 2 and 0 <= F < K, not {self.index}/{self.count}")

    def holds(self, prompt_id: str) -> bool:
        return fold_of(prompt_id, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def fold_of(prompt_id: str, count: int) -> int:
    number = re.search(r"(\d+)$", prompt_id)
    if number is not None:
        return int(number[1]) % count
    return int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:8], "big") % count


def parse_fold(text: str) -> Fold:
    """`2/5` -> Fold(2, 5); anything else is a ValueError naming the text."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if match is None:
        raise ValueError(f"a fold is written F/K (for example 0/5), not {text!r}")
    return Fold(int(match[1]), int(match[2]))
