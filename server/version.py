"""What `/version` reports, built once at start-up: the package version, the git commit of a source checkout
(read from the `.git` files, never a subprocess; None for an installed package), the models, and the sha256 of
each profile's judge head."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Any

from engine import EngineInfo

CHECKOUT = Path(__file__).resolve().parents[1]
SHA1 = re.compile(r"[0-9a-f]{40}")


def version_info(info: EngineInfo, checkout: Path = CHECKOUT) -> dict[str, Any]:
    return {
        "version": importlib.metadata.version("autojudge-server"),
        "git_commit": git_commit(checkout),
        "model": info.model_name,
        "draft": info.draft_name,
        "judge_heads": {p.name: p.head_sha256 for p in info.profiles if p.head_sha256},
        "speculation": {
            "window": "auto" if info.auto_window else "fixed",
            "default_speculative_tokens": info.default_speculative_tokens,
            "max_speculative_tokens": info.max_speculative_tokens,
            "draft_shares_kv": info.draft_shares_kv,
            "step_cost": info.step_cost,  # seconds per forward: target and draft, rows x tokens per row
        },
    }


def git_commit(checkout: Path) -> str | None:
    """HEAD's commit: a detached HEAD, a loose ref or `packed-refs`; a worktree's `.git` file is followed."""
    try:
        git = checkout / ".git"
        if git.is_file():
            git = checkout / git.read_text().strip().removeprefix("gitdir:").strip()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head if SHA1.fullmatch(head) else None
        ref = head.removeprefix("ref: ")
        common = git / (git / "commondir").read_text().strip() if (git / "commondir").is_file() else git
        for loose in (git / ref, common / ref):
            if loose.is_file():
                sha = loose.read_text().strip()
                return sha if SHA1.fullmatch(sha) else None
        for line in (common / "packed-refs").read_text().splitlines():
            sha, _, name = line.partition(" ")
            if name == ref and SHA1.fullmatch(sha):
                return sha
    except OSError:
        pass
    return None
