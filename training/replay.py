"""Lockstep decoding for evaluation: AutoJudge and its baselines, token by token, batched across problems.

Without the bonus token, lossy speculative decoding emits, at every position, the draft's greedy token d when it
matches the target's t or the acceptance rule keeps the mismatch, and t otherwise; the window W only decides where
cycles end (a cycle stops at the first rejected slot, or after W slots). So one pass that runs both models a token
at a time yields the exact output of every W, and the cycle counts of any W come from its per-position decisions
(`cycles_for_window`). Each step the target reads [last token, d] at once: row 0 gives t and q, row 1 the DT
state after reading d; the next step overwrites row 1's cache entry with the token actually emitted.
tests/test_replay.py checks this against the engine with a head judge for several W.
"""

from __future__ import annotations

import math
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


def kl(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:  # [N, V], [N, V] -> [N]
    return (p * (p.clamp_min(1e-30).log() - r.clamp_min(1e-30).log())).sum(-1)


def accept_mismatch(
    rule: str,
    param: torch.Tensor,  # [N]
    d: torch.Tensor,  # [N] draft tokens
    q_logits: torch.Tensor,  # [N, V] the target's row that predicts d's slot
    g_logits: torch.Tensor,  # [N, V] the draft's row that produced d
    z: torch.Tensor | None,  # [N] judge log-odds (autojudge only)
    u: torch.Tensor,  # [N] uniforms (random only)
) -> torch.Tensor:  # [N] bool: keep d although the target disagrees
    """Pure: the baselines of method §7, top-K correctly aligned (row i-1 predicts slot i)."""
    match rule:
        case "lossless":
            return torch.zeros_like(d, dtype=torch.bool)
        case "draft":
            return torch.ones_like(d, dtype=torch.bool)
        case "autojudge":
            assert z is not None
            return judge_accepts(z[:, None], param)[:, 0]
        case "topk":
            k = int(param.max())
            top = q_logits.topk(k, dim=-1).indices  # [N, k]
            within = torch.arange(k, device=d.device)[None, :] < param[:, None]  # each row's own K
            return ((top == d[:, None]) & within).any(-1)
        case "prob":
            return q_logits.softmax(-1).gather(-1, d[:, None])[:, 0] >= param
        case "kl-qg":
            return kl(q_logits.softmax(-1), g_logits.softmax(-1)) < param
        case "kl-gq":
            return kl(g_logits.softmax(-1), q_logits.softmax(-1)) < param
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


class LockstepDecoder:
    def __init__(
        self,
        target: Decoder,
        draft: Decoder,
        head: JudgeHead | None,
        eos_token_ids: tuple[int, ...],
        slots: int,
        max_len: int,
    ) -> None:
        device = target.model.norm.weight.device
        self.target = ModelRunner(target, target.new_cache(slots, max_len + 2), device)
        self.draft = ModelRunner(draft, draft.new_cache(slots, max_len + 2), device)
        self.bank = HeadBank([head], device) if head is not None else None
        self.layout = head.layout if head is not None else "DT"
        self.eos = frozenset(eos_token_ids)
        self.slots, self.max_len, self.device = slots, max_len, device

    @torch.inference_mode()
    def run(self, jobs: list[Job]) -> list[Trace]:
        """Decode every job; at most `slots` at once, refilled as jobs finish."""
        for job in jobs:
            if len(job.prompt) + job.max_tokens > self.max_len:
                raise ValueError(f"{job.job_id}: prompt + max_tokens exceeds max_len={self.max_len}")
            if job.method.rule == "autojudge" and self.bank is None:
                raise ValueError("autojudge needs a judge head")
        traces = [Trace(job) for job in jobs]
        todo = list(reversed(range(len(jobs))))
        active: dict[int, int] = {}  # slot -> trace index
        gens: dict[int, torch.Generator] = {}
        while todo or active:
            free = [s for s in range(self.slots) if s not in active]
            admitted = []
            while todo and free:
                slot, idx = free.pop(0), todo.pop()
                active[slot] = idx
                gens[slot] = torch.Generator(device=self.device).manual_seed(jobs[idx].seed)
                admitted.append(slot)
            self._prefill([(s, jobs[active[s]].prompt) for s in admitted])
            self._step(active, traces, gens)
            for slot in [s for s, i in active.items() if traces[i].finished]:
                del active[slot]
        return traces

    def _prefill(self, rows: list[tuple[int, tuple[int, ...]]]) -> None:
        rows = [(s, p) for s, p in rows if len(p) > 1]
        if rows:
            feeds = [list(p[:-1]) for _, p in rows]
            slots = [s for s, _ in rows]
            self.target.forward(feeds, [0] * len(rows), slots)
            self.draft.forward(feeds, [0] * len(rows), slots)

    def _step(self, active: dict[int, int], traces: list[Trace], gens: dict[int, torch.Generator]) -> None:
        slots = sorted(active)
        seqs = [[*traces[active[s]].job.prompt, *traces[active[s]].tokens] for s in slots]
        lens = [len(x) for x in seqs]
        h_draft = self.draft.forward([[x[-1]] for x in seqs], [n - 1 for n in lens], slots)[:, 0]  # [B, Dd]
        g_logits = self.draft.logits(h_draft)  # [B, V]
        d = g_logits.argmax(-1)  # [B]
        d_list = d.tolist()
        feeds = [[x[-1], t] for x, t in zip(seqs, d_list, strict=True)]
        h_target = self.target.forward(feeds, [n - 1 for n in lens], slots)  # [B, 2, Dt]
        q_logits = self.target.logits(h_target[:, 0])  # [B, V]
        t = q_logits.argmax(-1)
        mismatch = d != t
        keep = torch.zeros_like(mismatch)
        if bool(mismatch.any()):
            keep = self._decide(slots, active, traces, gens, mismatch, d, q_logits, g_logits, h_target[:, 1], lens)
        emitted = torch.where(mismatch & ~keep, t, d).tolist()
        mismatch_list, keep_list = mismatch.tolist(), keep.tolist()
        for b, s in enumerate(slots):
            tr = traces[active[s]]
            tr.tokens.append(emitted[b])
            tr.mismatch.append(mismatch_list[b])
            tr.ok.append(not mismatch_list[b] or keep_list[b])
            tr.finished = emitted[b] in self.eos or len(tr.tokens) >= tr.job.max_tokens

    def _decide(
        self,
        slots: list[int],
        active: dict[int, int],
        traces: list[Trace],
        gens: dict[int, torch.Generator],
        mismatch: torch.Tensor,  # [B] bool
        d: torch.Tensor,  # [B]
        q_logits: torch.Tensor,  # [B, V]
        g_logits: torch.Tensor,  # [B, V]
        h_dt: torch.Tensor,  # [B, Dt] target state after reading d
        lens: list[int],
    ) -> torch.Tensor:  # [B] bool
        methods = [traces[active[s]].job.method for s in slots]
        keep = torch.zeros_like(mismatch)
        z = None
        judged = [b for b, m in enumerate(methods) if m.rule == "autojudge" and bool(mismatch[b])]
        if judged and self.bank is not None:
            h_dd = None
            if self.layout == "DD-DT":  # the draft's state after reading d: one more draft forward
                rows = [[int(d[b])] for b in judged]
                h_dd = torch.zeros(len(slots), self.draft.model.config.hidden_size, device=self.device)
                h_dd[judged] = self.draft.forward(rows, [lens[b] for b in judged], [slots[b] for b in judged])[:, 0]
            feats = build_features(self.layout, h_dt, h_dd)  # [B, D]
            z = self.bank.log_odds(feats[:, None], torch.zeros(len(slots), dtype=torch.long, device=self.device))[:, 0]
        u = torch.stack([torch.rand((), generator=gens[s], device=self.device) for s in slots])
        for rule in {m.rule for m in methods}:
            of_rule = torch.tensor([m.rule == rule for m in methods], device=self.device) & mismatch
            if not bool(of_rule.any()):
                continue
            param = torch.tensor([m.param for m in methods], device=self.device)
            ok = accept_mismatch(rule, param, d, q_logits, g_logits, z, u)
            keep |= of_rule & ok
        return keep


def tokens_per_cycle(traces: list[Trace], window: int) -> float:
    """The paper's metric: emitted tokens over cycles, pooled across problems."""
    tokens = sum(len(t.tokens) for t in traces)
    cycles = sum(cycles_for_window(t.ok, window) for t in traces)
    return tokens / cycles if cycles else math.nan
