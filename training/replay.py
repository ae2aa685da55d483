"""Lockstep decoding for evaluation: AutoJudge and its baselines, token by token, batched across problems.

Without the bonus token, lossy speculative decoding emits, at every position, the draft's greedy token d when it
matches the target's t or the acceptance rule keeps the mismatch, and t otherwise; the window W only decides where
cycles end (a cycle stops at the first rejected slot, or after W slots). So one pass that runs both models a token
at a time yields the exact output of every W, and the cycle counts of any W come from its per-position decisions
(`cycles_for_window`). Each step the target reads the last token (t and q); only the rows where d != t and a judge
must decide read d as well (the DT state after reading d), and the next step overwrites that cache entry with the
token actually emitted. Reading d on every row would double the target's work where it is compute-bound.
tests/test_replay.py checks this against the engine with a head judge for several W.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.model.decoder import Decoder
from engine.runner import ModelRunner
from judge.decide import judge_accepts
from judge.features import build_features
from judge.head import HeadBank, JudgeHead

RULES = ("lossless", "autojudge", "topk", "prob", "kl-qg", "kl-gq", "random", "draft")


@dataclass(frozen=True, slots=True)
class Method:
    """An acceptance rule for mismatches and its parameter (τ, K, ε, KL bound or ρ)."""

    rule: str
    param: float = 0.0

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; choose one of {', '.join(RULES)}")

    @property
    def label(self) -> str:
        if self.rule in ("lossless", "draft"):
            return self.rule
        return f"{self.rule}={self.param:g}"


@dataclass(frozen=True, slots=True)
class Job:
    job_id: str
    prompt: tuple[int, ...]
    method: Method
    max_tokens: int
    seed: int = 0  # random acceptance only


@dataclass(slots=True)
class Trace:
    """Per generated position: whether the emitted token is the draft's (ok) and whether d != t there."""

    job: Job
    tokens: list[int] = field(default_factory=list)
    ok: list[bool] = field(default_factory=list)
    mismatch: list[bool] = field(default_factory=list)
    finished: bool = False
    failed: bool = False  # the target's logits stopped being finite: the run ended there, with no answer


def kl(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:  # [N, V], [N, V] -> [N]
    return (p * (p.clamp_min(1e-30).log() - r.clamp_min(1e-30).log())).sum(-1)


@dataclass(frozen=True, slots=True)
class MismatchStats:
    """What the training-free baselines read at a mismatch, one entry per row."""

    rank: torch.Tensor  # [N] int64: tokens the target's row scores strictly above d (0: d is its argmax)
    prob: torch.Tensor  # [N] the target's probability of d
    kl_qg: torch.Tensor  # [N] KL(q || g)
    kl_gq: torch.Tensor  # [N] KL(g || q)

    def take(self, index: torch.Tensor) -> MismatchStats:  # index: [P] rows -> P entries
        return MismatchStats(self.rank[index], self.prob[index], self.kl_qg[index], self.kl_gq[index])


def mismatch_stats(
    d: torch.Tensor,  # [N] draft tokens
    q_logits: torch.Tensor,  # [N, V] the target's row that predicts d's slot (correctly aligned)
    g_logits: torch.Tensor,  # [N, V] the draft's row that produced d
) -> MismatchStats:
    q, g = q_logits.float().softmax(-1), g_logits.float().softmax(-1)
    q_d = q_logits.gather(-1, d[:, None])  # [N, 1]
    return MismatchStats(
        rank=(q_logits > q_d).sum(-1),
        prob=q.gather(-1, d[:, None])[:, 0],
        kl_qg=kl(q, g),
        kl_gq=kl(g, q),
    )


def accept_mismatch(
    rule: str,
    param: torch.Tensor,  # [P]
    stats: MismatchStats,  # P entries
    z: torch.Tensor | None,  # [P] judge log-odds (autojudge only)
    u: torch.Tensor,  # [P] uniforms (random only)
) -> torch.Tensor:  # [P] bool: keep d although the target disagrees
    """Pure: AutoJudge and the baselines of method §7; top-K is d within the K best of the row predicting it."""
    match rule:
        case "lossless":
            return torch.zeros_like(param, dtype=torch.bool)
        case "draft":
            return torch.ones_like(param, dtype=torch.bool)
        case "autojudge":
            assert z is not None
            return judge_accepts(z[:, None], param)[:, 0]
        case "topk":
            return stats.rank < param
        case "prob":
            return stats.prob >= param
        case "kl-qg":
            return stats.kl_qg < param
        case "kl-gq":
            return stats.kl_gq < param
        case "random":
            return u < param
    raise ValueError(rule)


def cycles_for_window(ok: list[bool], window: int) -> int:
    """Cycles of greedy speculative decoding with window W and no bonus: a cycle ends at its first rejected
    position (which emits the target's token) or after W positions."""
    cycles, run = 0, 0
    for flag in ok:
        run += 1
        if not flag or run == window:
            cycles, run = cycles + 1, 0
    return cycles + (run > 0)


@dataclass(slots=True)
class _Branch:
    """Jobs of one prompt whose decisions have agreed so far: one decoded row serves them all."""

    jobs: list[int]  # indices into the job list
    prompt: tuple[int, ...]
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    ok: list[bool] = field(default_factory=list)
    mismatch: list[bool] = field(default_factory=list)
    slot: int = -1
    cached: int = 0  # positions of prompt + tokens held by both caches of `slot`
    draft_failed: bool = False  # the draft's logits overflowed: it proposes nothing more (as in the engine)
    failed: bool = False  # the target's logits overflowed: the branch ends without a token

    @property
    def seq(self) -> list[int]:
        return [*self.prompt, *self.tokens]

    def fork(self, jobs: list[int]) -> _Branch:
        return _Branch(jobs, self.prompt, self.max_tokens, list(self.tokens), list(self.ok), list(self.mismatch))


class LockstepDecoder:
    """Decodes every job's method with both models a token at a time. Jobs of one prompt share a row until
    their decisions at a mismatch differ; then the row forks (its caches copied to a free slot, or recomputed
    when it gets one), so a sweep of many methods costs little more than its distinct outputs."""

    def __init__(
        self,
        target: Decoder,
        draft: Decoder,
        head: JudgeHead | None,
        eos_token_ids: tuple[int, ...],
        slots: int,
        max_len: int,
    ) -> None:
        if slots < 1:
            raise ValueError(f"a lockstep decoder needs at least one slot, not {slots}")
        device = target.model.norm.weight.device
        self.target = ModelRunner(target, target.new_cache(slots, max_len + 2), device)
        self.draft = ModelRunner(draft, draft.new_cache(slots, max_len + 2), device)
        self.bank = HeadBank([head], device) if head is not None else None
        self.layout = head.layout if head is not None else "DT"
        self.eos = frozenset(eos_token_ids)
        self.slots, self.max_len, self.device = slots, max_len, device
        self.reserve = (slots - 1) // 4  # slots new prompts leave free, so forks rarely wait
        self.row_steps = 0  # rows decoded, summed over steps: the cost the sharing saves
        self.draining = False  # set by `drain`: no further prompt starts

    def drain(self) -> None:
        """Start no further prompt: `run` returns once the prompts in flight (and their forks) have ended."""
        self.draining = True

    @torch.inference_mode()
    def run(self, jobs: list[Job], on_done: Callable[[list[Trace]], None] | None = None) -> list[Trace]:
        """Decode every job; traces come back in job order. `on_done` hears of each group of jobs as it ends.
        After `drain`, only the jobs of prompts already started are decoded and returned."""
        for job in jobs:
            if len(job.prompt) + job.max_tokens > self.max_len:
                raise ValueError(f"{job.job_id}: prompt + max_tokens exceeds max_len={self.max_len}")
            if job.method.rule == "autojudge" and self.bank is None:
                raise ValueError("autojudge needs a judge head")
        groups: dict[tuple[tuple[int, ...], int], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((job.prompt, job.max_tokens), []).append(i)
        roots = deque(_Branch(idx, prompt, n) for (prompt, n), idx in groups.items())
        forks: deque[_Branch] = deque()  # forked rows that found no free slot; recomputed when admitted
        gens = [torch.Generator(device=self.device).manual_seed(job.seed) for job in jobs]
        traces: list[Trace | None] = [None] * len(jobs)
        active: list[_Branch] = []
        free = list(reversed(range(self.slots)))
        while (roots and not self.draining) or forks or active:
            while free and (forks or (roots and not self.draining and (len(free) > self.reserve or not active))):
                branch = forks.popleft() if forks else roots.popleft()
                branch.slot = free.pop()
                active.append(branch)
            if not active:  # drained after the loop's test: nothing started, nothing left
                continue
            self._prefill([b for b in active if b.cached < len(b.prompt) + len(b.tokens) - 1])
            children = self._step(active, jobs, gens)
            for branch in [*active, *(c for _, c in children)]:
                if branch.failed or branch.tokens[-1] in self.eos or len(branch.tokens) >= branch.max_tokens:
                    ended = [
                        Trace(jobs[i], list(branch.tokens), list(branch.ok), list(branch.mismatch), True, branch.failed)
                        for i in branch.jobs
                    ]
                    for i, tr in zip(branch.jobs, ended, strict=True):
                        traces[i] = tr
                    if on_done is not None:
                        on_done(ended)
                    branch.jobs = []
            for parent, child in children:
                if not child.jobs:
                    continue
                if not parent.jobs:  # the parent ended here (EOS): the child takes over its slot as it is
                    child.slot, parent.slot = parent.slot, -1
                    active.append(child)
                elif free:  # copy the parent's caches: they hold the child's whole history but this token
                    child.slot = free.pop()
                    for runner in (self.target, self.draft):
                        runner.cache.copy_slot(parent.slot, child.slot, child.cached)
                    active.append(child)
                else:
                    child.cached = 0
                    forks.append(child)
            for branch in [b for b in active if not b.jobs]:
                active.remove(branch)
                if branch.slot >= 0:
                    # Masked positions still reach attention, so the next branch in the slot must find no NaN:
                    # the whole slot after an overflow, else what the judge's read of d wrote past the tokens.
                    start = 0 if branch.failed or branch.draft_failed else branch.cached
                    for runner in (self.target, self.draft):
                        runner.cache.clear(branch.slot, start)
                    free.append(branch.slot)
        return [t for t in traces if t is not None]

    def _prefill(self, branches: list[_Branch]) -> None:
        """Feed each branch's sequence but its last token after what its slot already holds."""
        if branches:
            rows = [b.seq[b.cached : -1] for b in branches]
            cached, slots = [b.cached for b in branches], [b.slot for b in branches]
            self.target.forward(rows, cached, slots)
            self.draft.forward(rows, cached, slots)
            for b in branches:
                b.cached = len(b.prompt) + len(b.tokens) - 1

    def _step(
        self, active: list[_Branch], jobs: list[Job], gens: list[torch.Generator]
    ) -> list[tuple[_Branch, _Branch]]:
        """One token for every active branch; returns the (parent, child) pairs of the forks it made."""
        seqs = [b.seq for b in active]
        lens = [len(x) for x in seqs]
        slots = [b.slot for b in active]
        self.row_steps += len(active)
        h_draft = self.draft.forward([[x[-1]] for x in seqs], [n - 1 for n in lens], slots)[:, 0]  # [B, Dd]
        g_logits = self.draft.logits(h_draft)  # [B, V]
        d = g_logits.argmax(-1)  # [B]; argmax picks a NaN: a row with one reads as not finite below
        d_list = d.tolist()
        h_target = self.target.forward([[x[-1]] for x in seqs], [n - 1 for n in lens], slots)[:, 0]  # [B, Dt]
        q_logits = self.target.logits(h_target)  # [B, V]
        t = q_logits.argmax(-1)  # [B]
        t_list = t.tolist()
        finite = [x.gather(-1, i[:, None])[:, 0].isfinite().tolist() for x, i in ((q_logits, t), (g_logits, d))]
        for branch, t_ok, d_ok in zip(active, *finite, strict=True):  # a NaN stays in its own row's slot
            branch.failed |= not t_ok
            branch.draft_failed |= not d_ok
        live = [b for b, branch in enumerate(active) if not branch.failed]
        drafting = {b for b in live if not active[b].draft_failed}
        mm = [b for b in live if b in drafting and d_list[b] != t_list[b]]
        decided = self._decide(active, jobs, gens, mm, d, q_logits, g_logits, lens) if mm else []
        keeps = dict(zip(mm, decided, strict=True))  # branch -> keep d, per job
        forks = []
        for b in live:
            branch = active[b]
            branch.cached = lens[b]
            if b not in drafting:  # no proposal: the target's token, as a target-only step of the engine
                branch.mismatch.append(False)
                branch.tokens.append(t_list[b])
                branch.ok.append(False)
                continue
            branch.mismatch.append(d_list[b] != t_list[b])
            if d_list[b] == t_list[b]:
                branch.tokens.append(d_list[b])
                branch.ok.append(True)
                continue
            keep = keeps[b]
            kept = [j for j, k in zip(branch.jobs, keep, strict=True) if k]
            rejected = [j for j, k in zip(branch.jobs, keep, strict=True) if not k]
            if kept and rejected:
                child = branch.fork(kept)  # its history includes this step's mismatch flag
                child.tokens.append(d_list[b])
                child.ok.append(True)
                child.cached = lens[b]
                forks.append((branch, child))
                branch.jobs = rejected
            branch.tokens.append(t_list[b] if rejected else d_list[b])
            branch.ok.append(not rejected)
        return forks

    def _decide(
        self,
        active: list[_Branch],
        jobs: list[Job],
        gens: list[torch.Generator],
        mm: list[int],  # branches whose draft and target tokens differ
        d: torch.Tensor,  # [B]
        q_logits: torch.Tensor,  # [B, V]
        g_logits: torch.Tensor,  # [B, V]
        lens: list[int],
    ) -> list[list[bool]]:  # per branch of `mm`, per job of that branch: keep d
        sub = torch.tensor(mm, device=self.device)
        stats = mismatch_stats(d[sub], q_logits[sub], g_logits[sub])
        pair_row: list[int] = []  # (branch, job) pairs: the row of `mm` each belongs to
        rules: list[str] = []
        params: list[float] = []
        us: list[float] = []
        for r, b in enumerate(mm):
            for j in active[b].jobs:
                method = jobs[j].method
                pair_row.append(r)
                rules.append(method.rule)
                params.append(method.param)
                us.append(
                    float(torch.rand((), generator=gens[j], device=self.device)) if method.rule == "random" else 0
                )
        z = None
        judged = sorted({r for r, rule in zip(pair_row, rules, strict=True) if rule == "autojudge"})
        if judged and self.bank is not None:
            rows = [mm[r] for r in judged]
            # the states after reading d, written where the next step writes the emitted token
            feeds, at, slots = [[int(d[b])] for b in rows], [lens[b] for b in rows], [active[b].slot for b in rows]
            h_dt = self.target.forward(feeds, at, slots)[:, 0]  # [J, Dt]
            h_dd = self.draft.forward(feeds, at, slots)[:, 0] if self.layout == "DD-DT" else None  # [J, Dd]
            feats = build_features(self.layout, h_dt, h_dd)  # [J, D]
            z = torch.full((len(mm),), math.inf, device=self.device)
            zero = torch.zeros(len(rows), dtype=torch.long, device=self.device)
            z[judged] = self.bank.log_odds(feats[:, None], zero)[:, 0]
        row = torch.tensor(pair_row, device=self.device)
        param = torch.tensor(params, device=self.device)
        u = torch.tensor(us, device=self.device)
        keep = torch.zeros(len(pair_row), dtype=torch.bool, device=self.device)
        for rule in set(rules):
            sel = torch.tensor([x == rule for x in rules], device=self.device)
            z_sel = z[row[sel]] if z is not None else None
            keep[sel] = accept_mismatch(rule, param[sel], stats.take(row[sel]), z_sel, u[sel])
        flags = keep.tolist()
        out: list[list[bool]] = [[] for _ in mm]
        for r, flag in zip(pair_row, flags, strict=True):
            out[r].append(flag)
        return out


def tokens_per_cycle(traces: list[Trace], window: int) -> float:
    """The paper's metric: emitted tokens over cycles, pooled across problems."""
    tokens = sum(len(t.tokens) for t in traces)
    cycles = sum(cycles_for_window(t.ok, window) for t in traces)
    return tokens / cycles if cycles else math.nan
