"""Server text handling: tiny tokenizers for the server tests, the incremental detokenizer (multi-token chunks,
UTF-8 split across tokens) and stop-string trimming of streamed text."""

from __future__ import annotations

from typing import Any

import pytest

from server.text import IncrementalDetokenizer, TextStream

EOS = 0


class CharTokenizer:
    """One id per printable ASCII character (1..95) and newline (96), EOS = 0: the tiny models' 97 ids."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [96 if c == "\n" else ord(c) - 31 if " " <= c <= "~" else ord("?") - 31 for c in text]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        def char(i: int) -> str:
            if i == EOS:
                return "" if skip_special_tokens else "<eos>"
            return "\n" if i == 96 else chr(i + 31)

        return "".join(char(i) for i in token_ids)

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> str:
        text = "".join(f"[{m['role']}] {m['content']}\n" for m in conversation)
        return text + "[assistant] " if kwargs.get("add_generation_prompt") else text


class ByteTokenizer:
    """One id per UTF-8 byte, so a character can be split across tokens and chunks."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(token_ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> str:
        raise NotImplementedError


def chunked(ids: list[int], sizes: list[int]) -> list[list[int]]:
    out, i, k = [], 0, 0
    while i < len(ids):
        n = sizes[k % len(sizes)]
        out.append(ids[i : i + n])
        i, k = i + n, k + 1
    return out


@pytest.mark.parametrize("sizes", [[1], [2], [3, 1], [5, 2, 1]])
def test_split_utf8_is_held_until_complete(sizes):
    text = "héllo wörld: 😀 → ∑ done"
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok)
    chunks = chunked(tok.encode(text), sizes)
    deltas = [detok.push(c, final=i == len(chunks) - 1) for i, c in enumerate(chunks)]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d) > 1, "text must be streamed, not all at the end"


def test_special_tokens_are_not_shown():
    detok = IncrementalDetokenizer(CharTokenizer())
    ids = CharTokenizer().encode("ok")
    assert detok.push([*ids, EOS], final=True) == "ok"


def test_stop_string_is_never_streamed():
    tok = CharTokenizer()
    stream = TextStream(tok, ["STOP"])
    ids = tok.encode("abc STOP")
    deltas = [stream.push([i], finished=n == len(ids) - 1) for n, i in enumerate(ids)]
    assert "".join(deltas) == "abc "
    assert all("S" not in d for d in deltas)


def test_held_back_text_is_released_at_the_end():
    tok = CharTokenizer()
    stream = TextStream(tok, ["xyz"])
    first = stream.push(tok.encode("hello"), finished=False)
    assert first == "hel"  # len("xyz") - 1 characters are held back while a stop string could be completing
    assert first + stream.push([], finished=True) == "hello"


def test_earliest_stop_string_wins():
    tok = CharTokenizer()
    stream = TextStream(tok, ["cd", "b"])
    assert stream.push(tok.encode("abcd"), finished=True) == "a"
