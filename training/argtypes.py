"""argparse types the command lines share (training's and the benchmark scripts'): a bad count is a usage error
naming the value, not a traceback."""

from __future__ import annotations

import argparse


def count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, not {text!r}")
    return int(text)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return int(text)


def positive_list(text: str) -> list[int]:
    """`1,8` -> [1, 8]."""
    if not all(r.isdigit() and int(r) > 0 for r in text.split(",")):
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, not {text!r}")
    return [int(r) for r in text.split(",")]


def unit_float(text: str) -> float:
    """A number in [0, 1] (a judge threshold)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], not {text!r}")
    return value
