"""Signal handling for long resumable jobs (mining, evaluation sweeps): the first SIGINT or SIGTERM lets the work in
flight finish and be written, so an interrupted run loses nothing; a second one stops at once."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Protocol


class Stopped(KeyboardInterrupt):
    """A second signal: the work in flight is lost (a KeyboardInterrupt, so no `except Exception` swallows it)."""

    def __init__(self, signum: int, in_flight: str) -> None:
        super().__init__(f"{signal.Signals(signum).name} again: stopped at once, the {in_flight} in flight are lost")
        self.signum = signum


class Drainable(Protocol):
    draining: bool

    def drain(self) -> None: ...


@contextlib.contextmanager
def drain_on_signal(job: Drainable, in_flight: str) -> Iterator[list[int]]:
    """The first SIGINT or SIGTERM drains `job` (what is in flight finishes and is written, nothing new starts); a
    second one raises `Stopped`, losing `in_flight` (named in the message). Yields the signals caught."""
    caught: list[int] = []

    def handler(signum: int, _: object) -> None:
        caught.append(signum)
        if job.draining:
            raise Stopped(signum, in_flight)
        job.drain()
        # os.write, not print: the handler may interrupt a write to sys.stderr (a progress bar), and a buffered
        # stream refuses to be re-entered.
        os.write(
            2,
            f"\n{signal.Signals(signum).name}: finishing the {in_flight} in flight, starting no more "
            "(a second signal stops at once and loses them)\n".encode(),
        )

    before = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for sig, old in before.items():
            signal.signal(sig, old)
