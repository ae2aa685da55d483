"""Append-only JSON-lines files that killable runs write: complete lines are read, a torn last line is cut."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any


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
    except (EOFError, gzip.BadGzipFile) as e:  # a .gz cut short or not gzip at all
        raise ValueError(f"{path} is not a complete gzip file ({e})") from None
    return values, good
