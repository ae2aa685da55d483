"""Checkpoint of an evaluation sweep: one JSON line per finished job, so an interrupted run resumes.

The first line holds the sweep's setup (`meta`: model pair, head, data source, response budget); each further line
one job's id, tokens and per-position decisions: everything the reports are computed from. A resumed run decodes
only the jobs not yet in the file, and refuses a file written with another setup. A line torn by a kill is cut.
One exception to "the same setup": a baselines-only checkpoint (no head) is adopted by the first run with a head,
since none of its jobs depend on one; its setup line then names that head. So the baselines can run while the
head's labels are still being mined.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from judge.io import pair_difference
from training.jsonlines import check_appendable, open_to_append, read_complete
from training.replay import Job, LockstepDecoder, Trace


def _flags(text: str) -> list[bool]:
    return [c == "1" for c in text]


TRACES = "traces.jsonl"  # a run folder's checkpoint
HEAD = "head_sha256"


def adoptable(have: dict[str, Any], meta: dict[str, Any]) -> bool:
    """Whether a checkpoint written with setup `have` may be extended by a run with `meta`: a baselines-only one by a
    run that differs only in having a head."""
    return have.get(HEAD) is None and meta.get(HEAD) is not None and {**have, HEAD: meta[HEAD]} == meta


def parse_log(path: Path) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]], int]:
    """A checkpoint's setup (None for an empty or missing file), its jobs (job id -> line) and the byte length of
    its complete lines."""
    records, good = read_complete(path, "an evaluation checkpoint line")
    if not records:
        return None, {}, good
    have = records[0].get("meta") if isinstance(records[0], dict) else None
    if not isinstance(have, dict):
        raise ValueError(f"{path} is not an evaluation checkpoint (its first line holds no setup)")
    done: dict[str, dict[str, Any]] = {}
    for n, record in enumerate(records[1:], 2):
        if not (isinstance(record, dict) and {"job_id", "tokens", "ok", "mismatch"} <= record.keys()):
            raise ValueError(f"{path}:{n} is not an evaluation checkpoint line (no job_id, tokens, ok, mismatch)")
        done[record["job_id"]] = record
    return have, done, good


def read_log(path: Path, meta: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], int, bool]:
    """Jobs already in the log (job id -> its line), the byte length of its complete lines, and whether its setup
    line must be rewritten to `meta` (a baselines-only checkpoint adopted by a run with a head)."""
    have, done, good = parse_log(path)
    adopt = have is not None and adoptable(have, meta)
    if have is not None and have != meta and not adopt:
        diff = pair_difference(have, meta, names=("the checkpoint has", "this run has"))
        raise ValueError(
            f"{path} was written by a sweep with another setup ({diff}); "
            "choose another --out or rerun with the same models, head and settings"
        )
    return done, good, adopt


def head_free(job_id: str) -> bool:
    """Whether a job's trace is the same under any head: every rule but AutoJudge's (`Method.label` + "|" + id)."""
    return not job_id.startswith("autojudge=")


def baselines_of(paths: list[Path]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The head-free jobs of checkpoints that differ at most in their head (the folds of a cross-fitting run, say),
    as the setup and lines of one baselines-only checkpoint, which a run with any head then adopts."""
    if not paths:
        raise ValueError("no checkpoint given")
    meta: dict[str, Any] | None = None
    lines: dict[str, dict[str, Any]] = {}
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such evaluation checkpoint")
        have, done, _ = parse_log(path)
        if have is None:
            raise ValueError(f"{path} is empty, not an evaluation checkpoint")
        have = {**have, HEAD: None}
        if meta is None:
            meta = have
        elif have != meta:
            diff = pair_difference(meta, have, names=(f"{paths[0]} has", f"{path} has"))
            raise ValueError(f"the checkpoints differ in more than their head ({diff})")
        for job, record in done.items():
            if head_free(job) and lines.setdefault(job, record) != record:
                raise ValueError(f"{path}: job {job} differs from the same job in an earlier checkpoint")
    assert meta is not None
    return meta, list(lines.values())


def write_baselines(paths: list[Path], out: Path) -> int:
    """`baselines_of(paths)` as the checkpoint `out` (never over an existing one); returns the jobs written."""
    meta, lines = baselines_of(paths)
    if out.exists():
        raise ValueError(f"{out} exists; a baselines checkpoint is only written as a new file")
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(out, "".join(json.dumps(x) + "\n" for x in [{"meta": meta}, *lines]).encode())
    return len(lines)


def _rewrite_setup(path: Path, good: int, meta: dict[str, Any]) -> int:
    """Replace the setup line of the log's complete part (atomically); returns the new byte length."""
    with open(path, "rb") as f:
        body = f.read(good).split(b"\n", 1)[1]
    data = (json.dumps({"meta": meta}) + "\n").encode() + body
    _write_atomically(path, data)
    return len(data)


def _write_atomically(path: Path, data: bytes) -> None:
    """`path` holds either its old bytes or all of `data`, whenever the process dies."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def decode_with_log(
    decoder: LockstepDecoder,
    jobs: list[Job],
    path: Path,
    meta: dict[str, Any],
    on_done: Callable[[int], None] | None = None,
    on_resume: Callable[[int], None] | None = None,
) -> tuple[list[Trace], int]:
    """Every job's trace (in job order), decoding only those not yet in the log at `path`; also returns how many
    came from the log (told to `on_resume` before decoding starts; `on_done` hears of each batch that finishes).
    Each finished job is appended (and synced) as soon as it ends. A drained decoder leaves some jobs out: fewer
    traces than jobs come back, and the next run decodes the rest."""
    check_appendable(path, "a sweep")
    stored = path.with_name(path.name + ".gz")
    if stored.exists() and not path.exists():  # hours of decoding: never silently begun again
        raise ValueError(f"{stored} is a stored checkpoint: `gunzip -k` it to resume the sweep, or remove it")
    done, good, adopt = read_log(path, meta)
    if adopt:
        good = _rewrite_setup(path, good, meta)
    todo = [job for job in jobs if job.job_id not in done]
    if on_resume is not None:
        on_resume(len(jobs) - len(todo))
    with open_to_append(path, good) as f:
        if good == 0:
            f.write((json.dumps({"meta": meta}) + "\n").encode())

        def finished(traces: list[Trace]) -> None:
            for tr in traces:
                record = {
                    "job_id": tr.job.job_id,
                    "tokens": tr.tokens,
                    "ok": "".join("1" if x else "0" for x in tr.ok),
                    "mismatch": "".join("1" if x else "0" for x in tr.mismatch),
                } | ({"failed": True} if tr.failed else {})
                f.write((json.dumps(record) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
            if on_done is not None:
                on_done(len(traces))

        fresh = {tr.job.job_id: tr for tr in decoder.run(todo, finished)}
    traces = []
    for job in jobs:
        if job.job_id in fresh:
            traces.append(fresh[job.job_id])
        elif job.job_id in done:
            r = done[job.job_id]
            flags = _flags(r["ok"]), _flags(r["mismatch"])
            traces.append(Trace(job, list(r["tokens"]), *flags, True, bool(r.get("failed", False))))
    return traces, len(jobs) - len(todo)
