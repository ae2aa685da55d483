"""GSM8K oracle in lm-eval's `gsm8k_cot_llama` style: strict "The final answer is N", else the last number.

Pure functions on the generated text only: the prompt itself says "The final answer is [answer]" (method §2.3).
"""

from __future__ import annotations

import re

_NUMBER = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
_STRICT = re.compile(r"The final answer is (?:" + _NUMBER + ")")
_FLEXIBLE = re.compile(_NUMBER)
# lm-eval's `regexes_to_ignore`, applied in order after lower-casing.
_IGNORE = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))
_DIGIT = re.compile(r"[0-9]")


def normalize_answer(text: str) -> str:
    """`$1,234.` -> `1234`; `#### 18` -> `18` (lm-eval exact_match normalisation)."""
    out = text.strip().lower()
    for pattern in _IGNORE:
        out = pattern.sub("", out)
    return out.strip()


def extract_answer(generated: str) -> str | None:
    """The normalised final answer of a generated response, or None when it holds no number.

    The strict pattern's last match wins; otherwise the last number-like span anywhere. A span without a digit
    (`...`, `$,`) is not an answer, though lm-eval's pattern would take it.
    """
    for pattern in (_STRICT, _FLEXIBLE):
        spans = [m.group(1) or m.group(2) for m in pattern.finditer(generated)]
        spans = [s for s in spans if _DIGIT.search(s)]
        if spans:
            return normalize_answer(spans[-1])
    return None


def reference_answer(gsm8k_answer: str) -> str:
    """The ground truth of a GSM8K record (`... #### 18`)."""
    return normalize_answer(gsm8k_answer)
