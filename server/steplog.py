"""`--step-log`: one JSON line per engine step, for tuning the `auto` planner and reading what a load did step by
step (the Prometheus series only keep sums and histograms). Written from the engine thread as each step ends."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import IO, Any

from engine import StepStats

log = logging.getLogger("autojudge.server")


def step_record(stats: StepStats, t: float) -> dict[str, Any]:
    """What one step did: its rows' windows and profiles, where its time went, and the cost model's prediction."""
    return {
        "t": round(t, 6),
        "running": stats.load.num_running,
        "waiting": stats.load.num_waiting,
        "windows": list(stats.windows),
        "profiles": list(stats.window_profiles),
        "caught_up": stats.caught_up,
        "cut_short": stats.cut_short,
        "prefill_tokens": stats.num_prefill_tokens,
        "generated_tokens": stats.num_generated_tokens,
        "finished": len(stats.finished),
        "predicted_s": None if stats.predicted_seconds is None else round(stats.predicted_seconds, 6),
        "cost_speed": None if stats.cost_speed is None else round(stats.cost_speed, 4),
        "step_s": round(stats.seconds_step, 6),
        "prefill_s": round(stats.seconds_prefill, 6),
        "plan_s": round(stats.seconds_plan, 6),
        "draft_s": round(stats.seconds_draft, 6),
        "verify_s": round(stats.seconds_verify, 6),
        "judge_s": round(stats.seconds_judge, 6),
    }


class StepLog:
    """Appends `step_record`s to a file; `t` is the Unix time the step ended, to line steps up with a client's
    log. Line-buffered, so a crash loses at most the step being written. A line that would take the file past
    `max_bytes` first moves it to `<path>.1` (replacing the one before) and starts it anew, so a server left
    running with its step log holds at most about twice `max_bytes` on disk (0: never rotated)."""

    def __init__(self, path: Path, max_bytes: int = 0) -> None:
        self._path = path
        self._file: IO[str] = path.open("a", buffering=1)
        regular = stat.S_ISREG(os.fstat(self._file.fileno()).st_mode) and not path.is_symlink()
        self._max = max_bytes if regular else 0  # a pipe, a terminal or a link is never renamed away
        self._size = self._file.tell() if regular else 0
        self._lock = threading.Lock()  # the engine thread writes, the shutdown path closes

    def write(self, stats: StepStats) -> None:
        """Append one step; a write that fails (a full disk) turns the log off, never the engine that called it."""
        line = json.dumps(step_record(stats, time.time()), separators=(",", ":"))
        with self._lock:
            if self._file.closed:
                return
            try:
                if self._max and self._size and self._size + len(line) + 1 > self._max:
                    self._rotate()
                self._file.write(line + "\n")  # ASCII (json.dumps escapes the rest): characters are bytes
                self._size += len(line) + 1
            except OSError as e:
                log.error("step log off: writing %s failed: %s", self._file.name, e)
                self._close()

    def _rotate(self) -> None:
        self._file.close()
        self._path.replace(self._path.with_name(self._path.name + ".1"))
        self._file = self._path.open("a", buffering=1)
        self._size = 0

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        with contextlib.suppress(OSError):  # its last flush may fail as the write did; the file is closed anyway
            self._file.close()
