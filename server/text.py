"""Text in the server: prompt encoding and the chat template, an incremental detokenizer (multi-token chunks,
UTF-8 split across tokens) and stop-string trimming of the streamed text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


class Tokenizer(Protocol):
    """The part of a transformers tokenizer the server uses."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str: ...

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...


def encode_chat(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The tokenizer's chat template with the assistant turn opened; raises ValueError if it cannot render."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja raises its own errors for conversations a template refuses
        raise ValueError(f"the chat template cannot render these messages: {e}") from e
    return list(tokenizer.encode(str(text), add_special_tokens=False))


class IncrementalDetokenizer:
    """Turns token chunks into text deltas. Decoding a window from `prefix` keeps the tokenizer's merge context;
    a delta ending in an incomplete UTF-8 sequence is held until the bytes that complete it arrive."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # tokens already turned into text

    def push(self, new_ids: Sequence[int], final: bool = False) -> str:
        self.ids.extend(new_ids)
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.prefix, self.read)
        after = self._decode(self.prefix, len(self.ids))
        if after.endswith(REPLACEMENT) and not final:
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def _decode(self, start: int, end: int) -> str:
        return str(self.tokenizer.decode(self.ids[start:end], skip_special_tokens=True))


class TextStream:
    """The visible text of one completion. While a stop string may still complete, its possible start is held
    back; at the end the text is cut before the first stop string (the engine keeps the token that completed it)."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop = tuple(stop)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.sent = 0

    def push(self, new_ids: Sequence[int], finished: bool) -> str:
        """The next delta to send."""
        self.text += self.detokenizer.push(new_ids, final=finished)
        end = len(self.text) - self.holdback
        if finished:
            cuts = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
            self.text = self.text[: min(cuts)] if cuts else self.text
            end = len(self.text)
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : end], end
        return delta
