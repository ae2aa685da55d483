"""Prompt sets -> the prompt fields of each request body (`prompt` or `messages`): the built-in set, GSM8K test
questions, or a JSONL file of `prompt` / `messages` records."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loadtest.config import LoadConfig, UsageError

# Short and varied (reasoning, code, lists, translation, verse, facts, summary), all under 100 characters so that
# they fit small context windows.
BUILTIN = (
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Pens cost 3 dollars each. How much do 7 pens and a 5 dollar notebook cost? Think step by step.",
    "List five fruits that are red.",
    "Translate into French: The weather is nice today.",
    "Write a haiku about autumn rain.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
)


def load_prompts(cfg: LoadConfig) -> list[dict[str, Any]]:
    """The prompt fields of each prompt, for `cfg.endpoint`: a text becomes one user message for chat."""
    if cfg.prompts_file is not None:
        return [record_fields(record, cfg.endpoint, where) for where, record in read_jsonl(cfg.prompts_file)]
    texts = list(BUILTIN) if cfg.prompts == "builtin" else gsm8k_questions(cfg.data_dir)
    return [text_fields(t, cfg.endpoint) for t in texts]


def text_fields(text: str, endpoint: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]} if endpoint == "chat" else {"prompt": text}


def record_fields(record: dict[str, Any], endpoint: str, where: str) -> dict[str, Any]:
    """A record with both fields serves both endpoints; `messages` alone cannot be a completion prompt, since the
    chat template that would render them lives in the server."""
    prompt, messages = record.get("prompt"), record.get("messages")
    if endpoint == "chat" and isinstance(messages, list) and messages:
        return {"messages": messages}
    if isinstance(prompt, str) and prompt:
        return text_fields(prompt, endpoint)
    if endpoint == "chat":
        raise UsageError(f"{where}: needs 'prompt' (a non-empty string) or 'messages' (a non-empty list)")
    raise UsageError(f"{where}: needs 'prompt' (a non-empty string); 'messages' need --endpoint chat")


def gsm8k_questions(data_dir: Path) -> list[str]:
    path = data_dir / "test.jsonl"
    if not path.is_file():
        raise UsageError(f"{path} not found: point --data-dir at a folder holding GSM8K's test.jsonl")
    questions = []
    for where, record in read_jsonl(path):
        question = record.get("question")
        if not isinstance(question, str) or not question:
            raise UsageError(f"{where}: no 'question' string")
        questions.append(question)
    return questions


def read_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(`path:line`, object) per non-blank line; a file that cannot be read, a line that is not a JSON object or a
    file without any is a UsageError."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from e
    found = False
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise UsageError(f"{path}:{n}: not valid JSON ({e})") from e
        if not isinstance(record, dict):
            raise UsageError(f"{path}:{n}: not a JSON object")
        found = True
        yield f"{path}:{n}", record
    if not found:
        raise UsageError(f"{path} holds no prompts")
