"""Server-sent events: text lines -> event payloads (the SSE framing rules), and a payload -> an `Event` (the text,
usage, metrics or error of an OpenAI stream chunk)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any


class MalformedEvent(ValueError):
    """A payload that is neither `[DONE]` nor a JSON object."""


@dataclass(frozen=True)
class Event:
    done: bool = False  # data: [DONE]
    text: str = ""  # completion `text` or chat `delta.content`
    usage: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    error: str | None = None  # the message of an error event


class Decoder:
    """Per the SSE spec: `data:` lines accumulate (joined by newlines) until a blank line dispatches them;
    comments (`:`) and other fields (`event:`, `id:`, `retry:`, or a bare word) carry no data."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        if not line:
            return self.flush()
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" "))
        return None

    def flush(self) -> str | None:
        """The pending payload, if any: also called at the end of a stream whose last event lacks a blank line."""
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


async def payloads(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    decoder = Decoder()
    async for line in lines:
        if (data := decoder.feed(line)) is not None:
            yield data
    if (data := decoder.flush()) is not None:
        yield data


def parse_event(data: str) -> Event:
    if data.strip() == "[DONE]":
        return Event(done=True)
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise MalformedEvent(f"an event that is not JSON: {data[:120]!r}") from e
    if not isinstance(obj, dict):
        raise MalformedEvent(f"an event that is not a JSON object: {data[:120]!r}")
    if (message := error_message(obj)) is not None:
        return Event(error=message)
    return Event(text=chunk_text(obj), usage=as_dict(obj.get("usage")), metrics=as_dict(obj.get("metrics")))


def error_message(obj: dict[str, Any]) -> str | None:
    """The message of an OpenAI-style `{"error": {...}}` or a vLLM-style `{"object": "error", ...}`; else None."""
    if "error" in obj:
        err = obj["error"]
        message = err.get("message") if isinstance(err, dict) else err
        return message if isinstance(message, str) else json.dumps(err)
    if obj.get("object") == "error":
        return str(obj.get("message", "error"))
    return None


def chunk_text(obj: dict[str, Any]) -> str:
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""  # e.g. the final usage chunk, `choices: []`
    choice = choices[0]
    delta = choice.get("delta")
    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    return text if isinstance(text, str) else ""


def as_dict(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None
