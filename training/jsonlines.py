"""Append-only JSON-lines files that killable runs write: complete lines are read, a torn last line is cut."""

from __future__ import annotations

import contextlib
import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


def check_appendable(path: Path, what: str) -> None:
    """A resumable run appends plain lines at a byte offset of `path`: a `.gz` name is refused before anything
    reads or writes it (its complete lines would be counted in uncompressed bytes)."""
    if path.suffix == ".gz":
        raise ValueError(f"{path}: {what} appends to a plain JSON-lines file, not a .gz; gunzip a stored one first")


@contextlib.contextmanager
def open_to_append(path: Path, good: int) -> Iterator[BinaryIO]:
    """`path` opened for appending after its first `good` bytes (what `read_complete` found complete)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.truncate(good)
        f.seek(good)
        yield f


def read_complete(path: Path, what: str) -> tuple[list[Any], int]:
    """The values of `path`'s complete lines and their byte length (where an append resumes).

    A line that is not JSON names the file, the line and `what` it should have been (a ValueError). A `.gz` file
    is read through gzip (its length is then the uncompressed one).
    """
    if not path.exists():
        return [], 0
    values, good = [], 0
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    break  # the run was killed mid-write
                try:
                    values.append(json.loads(line))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ValueError(f"{path}:{n} is not {what} ({e})") from None
                good += len(line)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # a .gz cut short, damaged or not gzip at all
        raise ValueError(f"{path} is not a complete gzip file ({e})") from None
    return values, good
