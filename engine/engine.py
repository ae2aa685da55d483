"""Engine: continuous batching over a slot KV cache; each `step()` admits, prefills, drafts, verifies, judges
and commits one speculation cycle for every running request, and returns `RequestOutput`s."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engine.checks import check_memory, check_models
from engine.config import EngineConfig
from engine.model.protocol import LanguageModel
from engine.runner import ModelRunner
from engine.sampling import probs_for_params, residual_distribution, sample
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.spec.acceptance import autojudge_accept, greedy_match, ratio_test, window_mask
from engine.spec.autowindow import AutoWindow, RowInput
from engine.spec.cost import StepCost
from engine.spec.drafter import Drafter, DraftProposal
from engine.spec.judging import JudgeInput, MismatchJudge, RejectAllJudge
from engine.spec.planner import Plan
from engine.spec.profiler import profile_step_cost
from engine.spec.verifier import TargetScores, Verifier
from engine.stopping import Detokenize
from engine.types import EngineLoad, Request, RequestOutput, RowCycleStats, SpecCounts, StepStats
from judge.decide import judge_accepts

# A row whose target logits overflow (fp16 is prone to it) ends alone with this error; the others decode on.
NON_FINITE = "the target model's logits for this request were not finite (NaN or inf): the request was ended"


class Engine:
    """Runs a target model and an optional draft model together; `draft=None` serves plain decoding only.
    With `config.spec.auto_window`, `step_cost` (profiled here when None) drives the window planner."""

    def __init__(
        self,
        config: EngineConfig,
        target: LanguageModel,
        draft: LanguageModel | None = None,
        *,
        judge: MismatchJudge | None = None,
        eos_token_ids: tuple[int, ...] = (),
        detokenize: Detokenize | None = None,
        on_step: Callable[[StepStats], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        device: torch.device | str = "cpu",
        step_cost: StepCost | None = None,
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        check_models(config, target, draft)
        check_memory(config, target, draft, self.device)
        slots, cache_len = config.cache.max_slots, config.cache_len
        self.target = ModelRunner(target, target.new_cache(slots, cache_len), self.device)
        self.draft = ModelRunner(draft, draft.new_cache(slots, cache_len), self.device) if draft else None
        self.verifier = Verifier(self.target)
        shared = self.target.cache if config.spec.draft_shares_kv else None
        self.drafter = Drafter(self.draft, shared) if self.draft else None
        self.judge = judge or RejectAllJudge()
        self.scheduler = Scheduler(
            slots,
            config.scheduler.max_waiting,
            config.scheduler.max_prefill_tokens,
            frozenset(eos_token_ids),
            detokenize,
            config.cache.reuse_prefix,
        )
        self.on_step = on_step
        self.clock = clock
        self.vocab_size = target.config.vocab_size
        self.load = EngineLoad()  # what the gauges read, at every moment (not only after a step)
        self.autowindow: AutoWindow | None = None
        self.yielded = False  # the last step ended before its verify for a newcomer (`_yield`)
        if config.spec.auto_window and draft is not None:
            if step_cost is None:
                step_cost = profile_step_cost(target, draft, self.device, slots, config.spec.max_speculative_tokens)
            self.autowindow = AutoWindow(config.spec.planner, step_cost, config.spec.bonus_token)

    # --- requests -------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request; raises ValueError on a request that can never run, QueueFullError when full."""
        if self.scheduler.find(request.request_id) is not None:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if max(request.prompt_token_ids) >= self.vocab_size or min(request.prompt_token_ids) < 0:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        total = len(request.prompt_token_ids) + request.sampling.max_tokens
        if total > self.config.cache.max_model_len:
            raise ValueError(
                f"prompt ({len(request.prompt_token_ids)} tokens) + max_tokens "
                f"({request.sampling.max_tokens}) = {total} exceeds the context limit "
                f"max_model_len={self.config.cache.max_model_len}"
            )
        width = request.spec.num_speculative_tokens
        if width is None:
            width = self.config.spec.default_speculative_tokens
        if width > self.config.spec.max_speculative_tokens:
            raise ValueError(
                f"num_speculative_tokens={width} exceeds the server limit {self.config.spec.max_speculative_tokens}"
            )
        if not request.spec.enabled or self.drafter is None:
            width = 0
        self.judge.check_profile(request.spec.profile)
        self.scheduler.add(Sequence(request, width, self.device))
        self._publish(self.load.batch_size)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request at once and free its slot; returns its final output, or None if unknown."""
        seq = self.scheduler.find(request_id)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        self._publish(self.load.batch_size if self.has_unfinished() else 0)
        return self._final(seq, [], None)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    @property
    def num_free_slots(self) -> int:
        return len(self.scheduler.free_slots)

    # --- the cycle ------------------------------------------------------------------------------------
    def step(self, arrived: Callable[[], bool] | None = None) -> list[RequestOutput]:
        """One cycle. `arrived` says whether a new request is waiting outside the engine: under `auto` windows a
        step stops drafting when it says yes and a slot is free, and ends there unless a fixed-window row drafted
        (then it verifies what the rows hold), so the newcomer waits for one draft forward at most."""
        t0 = self.clock()
        batch = self.scheduler.schedule()
        queried = sum(s.num_prompt_tokens for s in batch.prefill)
        hits = sum(s.target_len for s in batch.prefill)  # set by the scheduler from the slot's retained tokens
        num_prefill = self._prefill(batch.prefill)
        seqs = batch.running
        t1 = self.clock()
        start = _Start(num_prefill, queried, hits, t0, t1)
        if not seqs:
            return []
        # A cycle emits at most W (+1 bonus) tokens: never draft past max_tokens.
        bonus = int(self.config.spec.bonus_token)
        widths = [min(0 if s.draft_failed else s.num_speculative, s.remaining_tokens - bonus) for s in seqs]
        # Before the drafter reads the lagging caches.
        catch_ups = [self.drafter.catch_up(s) if self.drafter else 0 for s in seqs]
        plan, planned = None, []
        if self.autowindow is not None:
            admitted = {id(s) for s in batch.prefill}  # their first token costs what target-only decoding costs
            plain = bool(admitted) and self.config.spec.planner.plain_admission  # ... and no one else's verify
            planned = [
                RowInput(
                    s.request_id,
                    planner_key(s),
                    0 if plain or id(s) in admitted else w,
                    lag,
                    s.request.spec.fixed_window,
                    s.remaining_tokens,
                )
                for s, w, lag in zip(seqs, widths, catch_ups, strict=True)
            ]
            plan = self.autowindow.plan(planned)
            widths = list(plan.windows)
        t_plan = self.clock()
        want_hidden = self.judge.uses_draft_hidden
        cut = arrived if plan is not None and self._may_cut() else None
        if self.drafter is not None and any(widths):
            cuttable = [not s.request.spec.fixed_window for s in seqs]
            proposal = self.drafter.propose(seqs, widths, want_hidden, cut, cuttable)
        else:
            proposal = DraftProposal([[] for _ in seqs], None, None, [s.draft_len for s in seqs])
        self._forget_overflowed_drafts(seqs, proposal)
        t2 = self.clock()
        drafted = [len(d) for d in proposal.token_ids]
        kept = [(n, w) for b, (n, w) in enumerate(zip(drafted, widths, strict=True)) if b not in proposal.failed]
        cut_short = any(n != w for n, w in kept)
        fixed = any(w and s.request.spec.fixed_window for s, w in zip(seqs, widths, strict=True))
        yielded, self.yielded = self.yielded, False
        # Never twice running (arrivals cannot stall the batch), nor when this step admitted rows (their first token).
        if cut_short and not fixed and not yielded and not batch.prefill:
            self.yielded = True
            return self._yield(seqs, proposal, start, t_plan)
        if drafted != widths:  # cut short, or rows whose draft overflowed
            widths = drafted
            if self.autowindow is not None:
                plan = self.autowindow.costed(planned, widths)
        scores = self.verifier.verify(seqs, proposal.token_ids)
        dropped = self._drop_overflowed_drafts(seqs, widths, proposal, scores)
        for s, w in zip(seqs, widths, strict=True):
            s.window_counts[w] += 1
        if self.autowindow is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the planner times the verify as the profile did: finished
        t3 = self.clock()
        exact_ok, judge_ok = self._decide(seqs, widths, proposal, scores)
        t4 = self.clock()
        width_t = torch.tensor(widths, device=self.device)
        n, judged_in = autojudge_accept(exact_ok, judge_ok, width_t)
        accepted = n.tolist()
        outputs, rows = self._commit(seqs, widths, proposal, scores, accepted, judged_in, exact_ok, dropped)
        t5 = self.clock()
        emitted = sum(len(o.new_token_ids) for o in outputs)
        self._publish(len(seqs) if self.has_unfinished() else 0)
        if plan is not None:
            assert self.autowindow is not None
            # A failed row, or one whose drafts overflowed the target, is no evidence of the draft's agreement.
            seen = [
                None if o.error or b in dropped else n for b, (o, n) in enumerate(zip(outputs, accepted, strict=True))
            ]
            # A step that verified again for overflowed drafts says nothing of step times (0 s: times unused).
            self.autowindow.observe(planned, plan, seen, 0.0 if dropped else t5 - t_plan, emitted, t3 - t2)
        t6 = self.clock()
        if self.on_step is not None:
            self.on_step(
                StepStats(
                    **start.fields(self.load),
                    num_generated_tokens=emitted,
                    seconds_plan=t_plan - t1 + t6 - t5,
                    seconds_draft=t2 - t_plan,
                    seconds_verify=t3 - t2 + t5 - t4,
                    seconds_judge=t4 - t3,
                    seconds_step=t6 - t0,
                    rows=tuple(rows),
                    finished=tuple(o for o in outputs if o.finished),
                    windows=tuple(widths),
                    window_profiles=tuple(s.request.spec.profile for s in seqs),
                    predicted_seconds=None if dropped else _seconds(plan),
                    cut_short=cut_short,
                    caught_up=sum(lag > 0 and w > 0 for lag, w in zip(catch_ups, widths, strict=True)),
                    cost_speed=None if self.autowindow is None else self.autowindow.speed,
                )
            )
        return outputs

    def _yield(
        self,
        seqs: list[Sequence],
        proposal: DraftProposal,
        start: _Start,
        t_plan: float,
    ) -> list[RequestOutput]:
        """End a step whose drafting a newcomer cut short, before its verify: the newcomer is admitted by the
        next step, after at most one draft forward instead of a verify too (TTFT as in target-only decoding). The
        drafts are dropped; what the draft cache read of the context is kept (positions it holds below the row's
        last token). Its stats have no windows: no row decoded in it."""
        for s, fed in zip(seqs, proposal.fed_end, strict=True):
            s.draft_len = max(s.draft_len, min(fed, len(s.token_ids) - 1))
        if self.autowindow is not None:
            self.autowindow.abandon()
        self._publish(len(seqs))
        if self.on_step is not None:
            t = self.clock()
            self.on_step(
                StepStats(
                    **start.fields(self.load),
                    num_generated_tokens=0,
                    seconds_plan=t_plan - start.t1,
                    seconds_draft=t - t_plan,
                    seconds_verify=0.0,
                    seconds_judge=0.0,
                    seconds_step=t - start.t0,
                    rows=(),
                    finished=(),
                    cut_short=True,
                    cost_speed=None if self.autowindow is None else self.autowindow.speed,
                )
            )
        return []

    def _may_cut(self) -> bool:
        """A step may stop drafting for a newcomer only if the newcomer would find a slot at the next step."""
        s = self.scheduler
        return self.config.spec.planner.yield_to_arrivals and len(s.free_slots) > len(s.waiting)

    def _prefill(self, seqs: list[Sequence]) -> int:
        """Put `prompt[:-1]` into the target cache (and the draft cache for speculating rows) after the prefix
        the slot already holds (`target_len` / `draft_len`, set by the scheduler); returns target tokens computed."""
        rows = [s for s in seqs if s.target_len < s.num_prompt_tokens - 1]
        if rows:
            self.target.forward(
                [s.token_ids[s.target_len : -1] for s in rows], [s.target_len for s in rows], [s.slot for s in rows]
            )
        # `auto` defers the draft's prefill to the row's first drafting cycle (the drafter catches it up then); a
        # twin draft never runs one (the drafter copies the target's K/V).
        lazy = self.autowindow is not None or self.config.spec.draft_shares_kv
        drafting = [s for s in seqs if s.num_speculative > 0 and s.draft_len < s.num_prompt_tokens - 1]
        if drafting and self.draft is not None and not lazy:
            self.draft.forward(
                [s.token_ids[s.draft_len : -1] for s in drafting],
                [s.draft_len for s in drafting],
                [s.slot for s in drafting],
            )
        computed = sum(s.num_prompt_tokens - 1 - s.target_len for s in rows)
        for s in seqs:
            s.target_len = s.num_prompt_tokens - 1
            if not lazy:
                s.draft_len = s.num_prompt_tokens - 1 if s.num_speculative > 0 else 0
        return computed

    def _forget_overflowed_drafts(self, seqs: list[Sequence], proposal: DraftProposal) -> None:
        """Rows whose draft logits overflowed in this step's drafting draft no more, and their draft cache is zeroed
        now, whatever the step does next: on the SDPA path attention reads masked positions too, and a masked NaN
        still poisons the slot's next row."""
        for b in proposal.failed:
            seqs[b].draft_failed = True
            if self.draft is not None:
                self.draft.cache.clear(seqs[b].slot)
            proposal.fed_end[b] = seqs[b].draft_len = 0

    @torch.inference_mode()  # writes into the verify's (inference) tensors
    def _drop_overflowed_drafts(
        self, seqs: list[Sequence], widths: list[int], proposal: DraftProposal, scores: TargetScores
    ) -> dict[int, int]:
        """A NaN in a row's K/V makes its attention NaN (on the SDPA path even where masked), so one draft token
        that overflows the target would fail the row. Such rows verify again without drafts (`widths` and
        `proposal` lose them, `scores` takes the new slot 0); still not finite, the context itself overflowed and
        `_commit` fails the row. Returns row -> its first draft token, which `_extra_token` tests against slot 0
        as one speculative step, so a sampled row stays distributed as the target."""
        bonus = int(self.config.spec.bonus_token)
        bad = [b for b, w in enumerate(widths) if w > 0 and not bool(scores.finite[b, : w + bonus].all())]
        if not bad:
            return {}
        rows = [seqs[b] for b in bad]
        for s in rows:
            self.target.cache.clear(s.slot, s.target_len)  # the drafts' K/V
        again = self.verifier.verify(rows, [[] for _ in rows])
        first = {b: proposal.token_ids[b][0] for b in bad}
        for i, b in enumerate(bad):
            widths[b] = 0
            proposal.token_ids[b].clear()
            scores.logits[b, 0], scores.argmax[b, 0] = again.logits[i, 0], again.argmax[i, 0]
            scores.hidden[b, 0], scores.finite[b, 0] = again.hidden[i, 0], again.finite[i, 0]
        return first

    def _decide(
        self, seqs: list[Sequence], widths: list[int], proposal: DraftProposal, scores: TargetScores
    ) -> tuple[torch.Tensor, torch.Tensor]:  # exact_ok [B, W], judge_ok [B, W]
        """Exact rule per row (match, or ratio test when sampling), then the judge on the mismatches."""
        width = max(widths)
        draft_ids = torch.zeros(len(seqs), width, dtype=torch.long, device=self.device)
        for b, d in enumerate(proposal.token_ids):
            draft_ids[b, : len(d)] = torch.tensor(d, dtype=torch.long)
        exact_ok = greedy_match(draft_ids, scores.argmax)
        for b, s in enumerate(seqs):
            if widths[b] and not s.request.sampling.greedy:
                assert proposal.probs is not None
                q = probs_for_params(scores.logits[b, : widths[b]], [s.request.sampling] * widths[b])
                u = torch.rand(widths[b], generator=s.generator, device=self.device)
                exact_ok[b, : widths[b]] = ratio_test(
                    draft_ids[b : b + 1, : widths[b]],
                    proposal.probs[b : b + 1, : widths[b]],
                    q[None],
                    u[None],
                )[0]
        mismatch = ~exact_ok & window_mask(torch.tensor(widths, device=self.device), width)
        tau = torch.tensor([s.request.spec.judge_threshold for s in seqs], device=self.device)
        judge_ok = torch.zeros_like(exact_ok)
        if width and bool((tau > 0).any()) and bool(mismatch.any()):
            positions = torch.tensor([len(s.token_ids) for s in seqs], device=self.device)[:, None]
            z = self.judge.score(
                JudgeInput(
                    request_ids=tuple(s.request_id for s in seqs),
                    profiles=tuple(s.request.spec.profile for s in seqs),
                    positions=positions + torch.arange(width, device=self.device)[None, :],
                    draft_token_ids=draft_ids,
                    target_token_ids=scores.argmax[:, :width],
                    mismatch=mismatch,
                    target_hidden=scores.hidden[:, 1 : width + 1],
                    draft_hidden=None if proposal.hidden is None else proposal.hidden[:, :width],
                )
            )
            judge_ok = mismatch & judge_accepts(z, tau)
        return exact_ok, judge_ok

    def _commit(
        self,
        seqs: list[Sequence],
        widths: list[int],
        proposal: DraftProposal,
        scores: TargetScores,
        num_accepted: list[int],
        judged_in: torch.Tensor,  # [B, W] bool, judge-accepted slots inside the accepted prefix
        exact_ok: torch.Tensor,  # [B, W] bool
        dropped: dict[int, int],  # row -> first draft token, for rows whose drafts overflowed the target
    ) -> tuple[list[RequestOutput], list[RowCycleStats]]:
        tau_on = [s.request.spec.judge_threshold > 0 for s in seqs]
        judge_counts = judged_in.sum(dim=1).tolist()
        mismatch_seen = (~exact_ok).cumsum(dim=1).tolist() if exact_ok.shape[1] else None
        finite = scores.finite.tolist()
        outputs, rows = [], []
        for b, seq in enumerate(seqs):
            n, w = num_accepted[b], widths[b]
            used = n + int(self._gives_extra(n, w))  # window slots whose logits this cycle reads
            if not all(finite[b][:used]):  # this row only: the batch goes on, and nothing is sampled from NaN
                self._clear(seq)
                self.scheduler.finish(seq, "error")
                outputs.append(self._final(seq, [], None, NON_FINITE))
                continue
            new_ids = proposal.token_ids[b][:n]
            extra = self._extra_token(seq, b, n, w, proposal, scores, dropped.get(b))
            if extra is not None:
                new_ids = [*new_ids, extra]
            kept = self.scheduler.commit(seq, new_ids, n, proposal.fed_end[b])
            cycle = None
            if w:
                judged = mismatch_seen[b][min(n, w - 1)] if (tau_on[b] and mismatch_seen) else 0
                cycle = SpecCounts(
                    num_spec_steps=1,
                    num_draft_tokens=w,
                    num_accepted_tokens=n,
                    num_judge_accepted=judge_counts[b],
                    num_judged=judged,
                    num_bonus=int(extra is not None and n == w),
                    num_recovered=int(n < w),
                    accepted_per_pos=tuple(int(i < n) for i in range(self.config.spec.max_speculative_tokens)),
                )
                seq.counts = seq.counts.merge(cycle)
                rows.append(RowCycleStats(seq.request_id, seq.request.spec.profile, cycle, len(kept)))
            outputs.append(self._final(seq, kept, cycle) if seq.finish_reason else self._partial(seq, kept, cycle))
        return outputs, rows

    def _gives_extra(self, n: int, w: int) -> bool:
        """Whether a cycle that accepted `n` of `w` drafts emits a target token: recovered, or the bonus."""
        return not (n == w and w > 0 and not self.config.spec.bonus_token)

    def _clear(self, seq: Sequence) -> None:
        """Zero the row's slot in both caches: what overflowed must not reach the slot's next row."""
        self.target.cache.clear(seq.slot)
        if self.draft is not None:
            self.draft.cache.clear(seq.slot)

    def _extra_token(
        self,
        seq: Sequence,
        b: int,
        n: int,
        w: int,
        proposal: DraftProposal,
        scores: TargetScores,
        first: int | None = None,
    ) -> int | None:
        """The recovered token at the first rejected slot, or the bonus after a full window (None if off). For a
        row whose drafts overflowed the target (`first`: its first draft token, verified no further), one
        speculative step on that draft: kept with probability min(1, q/g), else a draw from the residual."""
        if not self._gives_extra(n, w):
            return None
        params = seq.request.sampling
        if params.greedy:
            return int(scores.argmax[b, n])
        q = probs_for_params(scores.logits[b, n : n + 1], [params])[0]  # [V]
        if n < w or first is not None:
            assert proposal.probs is not None
            g = proposal.probs[b, n]  # [V]
            if first is not None:
                u = torch.rand((), generator=seq.generator, device=self.device)
                if bool(u * g[first] < q[first]):
                    return first
            q = residual_distribution(q, g)
        return sample(q, seq.generator)

    # --- outputs --------------------------------------------------------------------------------------
    def _partial(self, seq: Sequence, new_ids: list[int], cycle: SpecCounts | None) -> RequestOutput:
        return RequestOutput(
            seq.request_id,
            new_ids,
            False,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            cycle=cycle,
        )

    def _final(
        self, seq: Sequence, new_ids: list[int], cycle: SpecCounts | None, error: str | None = None
    ) -> RequestOutput:
        return RequestOutput(
            seq.request_id,
            new_ids,
            True,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            spec=seq.counts if seq.num_speculative else None,
            cycle=cycle,
            windows=tuple(seq.window_counts),
            num_cached_tokens=seq.num_cached_tokens,
            error=error,
        )

    def _publish(self, batch_size: int) -> None:
        s = self.scheduler
        self.load = EngineLoad(len(s.running), len(s.waiting), batch_size, self._kv_usage())

    def _kv_usage(self) -> float:
        used = sum(len(s.token_ids) for s in self.scheduler.running)
        return used / (self.config.cache.max_slots * self.config.cache_len)


@dataclass(frozen=True, slots=True)
class _Start:
    """What a step knows before it decodes: the prefill of the requests it admitted and its first two clock times."""

    num_prefill: int  # prompt tokens computed
    queried: int  # prompt tokens of the admitted requests
    hits: int  # of those, positions their slots still held
    t0: float  # the step began
    t1: float  # its prefill ended

    def fields(self, load: EngineLoad) -> dict[str, Any]:
        """The `StepStats` fields every step reports alike."""
        return {
            "load": load,
            "num_prefill_tokens": self.num_prefill,
            "num_prefix_query_tokens": self.queried,
            "num_prefix_hit_tokens": self.hits,
            "seconds_prefill": self.t1 - self.t0,
        }


def planner_key(seq: Sequence) -> tuple[str, float, bool]:
    """Rows that should accept alike share acceptance history: same profile, τ and decoding mode."""
    spec = seq.request.spec
    return (spec.profile, round(spec.judge_threshold, 4), seq.request.sampling.greedy)


def _seconds(plan: Plan | None) -> float | None:
    return None if plan is None else plan.seconds
