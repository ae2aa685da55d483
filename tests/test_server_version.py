"""`/version`: the git commit read from `.git` files (loose ref, packed ref, detached, worktree, none)."""

from __future__ import annotations

from pathlib import Path

from server.version import CHECKOUT, git_commit

A, B = "a" * 40, "b" * 40


def test_loose_and_packed_refs_and_a_detached_head(tmp_path: Path):
    git = tmp_path / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "packed-refs").write_text(f"# pack-refs with: peeled\n{B} refs/heads/main\n")
    assert git_commit(tmp_path) == B
    (git / "refs" / "heads" / "main").write_text(A + "\n")
    assert git_commit(tmp_path) == A  # a loose ref is newer than the packed one
    (git / "HEAD").write_text(B + "\n")
    assert git_commit(tmp_path) == B


def test_a_worktree_reads_refs_from_the_common_dir(tmp_path: Path):
    common = tmp_path / "repo" / ".git"
    wt_git = common / "worktrees" / "wt"
    (common / "refs" / "heads").mkdir(parents=True)
    wt_git.mkdir(parents=True)
    (common / "refs" / "heads" / "feature").write_text(A)
    (wt_git / "HEAD").write_text("ref: refs/heads/feature\n")
    (wt_git / "commondir").write_text("../..\n")
    checkout = tmp_path / "wt"
    checkout.mkdir()
    (checkout / ".git").write_text(f"gitdir: {wt_git}\n")
    assert git_commit(checkout) == A


def test_no_checkout_or_a_broken_head_gives_none(tmp_path: Path):
    assert git_commit(tmp_path) is None
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/gone\n")
    assert git_commit(tmp_path) is None
    (tmp_path / ".git" / "HEAD").write_text("not a sha\n")
    assert git_commit(tmp_path) is None


def test_the_project_checkout_is_read_without_errors():
    sha = git_commit(CHECKOUT)
    assert sha is None or len(sha) == 40
