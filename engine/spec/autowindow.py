"""`auto` speculation windows: per-row acceptance estimates, the planner's choice each step, the probe that keeps a
profile's estimate fresh, and the guard that stops drafting while measured steps run slower than plain decoding.

The engine asks `plan()` before drafting and reports each step with `observe()`; this object only counts and
chooses (no model runs here), so its state can never leave a KV cache inconsistent.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from engine.config import PlannerConfig
from engine.spec.cost import StepCost
from engine.spec.planner import (
    Plan,
    Row,
    amortised_catch_up,
    catch_up_seconds,
    expected_tokens,
    lagging_rows,
    plan_windows,
    step_seconds,
)

SPEED_STEP = 1.01  # factor of one speed nudge
SPEED_RANGE = (0.25, 4.0)  # beyond, the profile is wrong for this device, not drifting: --reprofile
Key = tuple[str, float, bool]  # (task profile, τ, greedy): rows that should accept alike


@dataclass(frozen=True, slots=True)
class Tally:
    """Discounted counts of drafted positions: accepted ones and trials (accepted + the one rejected)."""

    accepted: float = 0.0
    trials: float = 0.0

    def observe(self, window: int, accepted: int, decay: float) -> Tally:
        """One cycle that drafted `window` and accepted the first `accepted`: the geometric model's evidence."""
        rejected = float(accepted < window)
        return Tally(decay * self.accepted + accepted, decay * self.trials + accepted + rejected)

    def alpha(self, prior: float, weight: float) -> float:
        """The counts plus `weight` pseudo-positions at `prior`."""
        return (self.accepted + weight * prior) / (self.trials + weight)

    def upper(self, prior: float, weight: float, z: float) -> float:
        """`alpha` plus `z` standard errors of it: optimism that shrinks as evidence grows (an upper confidence
        bound). Choosing on it keeps a row drafting while its estimate is still thin, so an unlucky first few
        cycles cannot stop a row whose drafts pay before it has shown that they do."""
        a = self.alpha(prior, weight)
        return min(0.999, a + z * (a * (1.0 - a) / (self.trials + weight)) ** 0.5)


@dataclass(frozen=True, slots=True)
class RowInput:
    """One running row as the engine sees it this step."""

    request_id: str
    key: Key
    cap: int  # request cap and tokens left; 0 on the step that admits it (its first token costs target-only)
    catch_up: int  # tokens a separate draft forward would read first (engine/spec/drafter.py)
    fixed: bool = False  # drafts exactly `cap`; the planner only costs it
    remaining: int | None = None  # tokens the request may still emit: the horizon a catch-up forward serves


@dataclass(slots=True)
class _Guard:
    steps: int = 0  # drafting steps summed so far
    seconds: float = 0.0  # their measured time
    plain_seconds: float = 0.0  # the time plain decoding would have taken to emit their tokens
    backoff_left: int = 0
    backoff_len: int = 0


class AutoWindow:
    def __init__(self, config: PlannerConfig, cost: StepCost, bonus: bool) -> None:
        self.config, self.bonus = config, bonus
        self.profile = cost  # as measured at start-up
        self.speed = 1.0  # the device's speed against the profile: the median of measured / profiled verify time
        self.cost = cost  # the profile at `speed`: what the planner predicts with
        self.rows: dict[str, Tally] = {}
        self.keys: dict[Key, Tally] = {}
        self.last_seen: dict[Key, int] = {}  # step of each key's last observed cycle
        self.step = 0
        self.guard = _Guard(backoff_len=config.backoff_steps)
        self.probes = 0  # rows made to draft by the probe, in total
        self.probe_debt = 0.0  # predicted seconds probes cost beyond the plans, less the budget earned since
        self.backoffs = 0  # times the guard tripped
        self.overhead = 0.0  # EMA of a plain step's seconds beyond its forward (the cost model's online part)
        self.per_depth = 0.0  # what each draft depth costs beyond its forward: the median, from drafting steps
        # Cycles a catch-up forward serves: each row's drafting cycles since its last catch-up (and whether a probe
        # began them), and their EMA over finished episodes, which caps the cycles a catch-up is spread over.
        self.episodes: dict[str, tuple[int, bool]] = {}
        self.episode_len = config.amortize
        self.probed: set[str] = set()  # rows a probe made draft this step
        self.probe_undo: tuple[dict[Key, int | None], float] = ({}, 0.0)  # this step's probes: keys' last_seen, debt

    def key_alpha(self, key: Key) -> float:
        return self.keys.get(key, Tally()).alpha(self.config.prior_alpha, self.config.row_weight)

    def row_alpha(self, row: RowInput) -> float:
        prior = self.key_alpha(row.key)
        return self.rows.get(row.request_id, Tally()).alpha(prior, self.config.row_weight)

    def row_upper(self, row: RowInput) -> float:
        """The row's estimate with `optimism` standard errors added: what decides whether it drafts at all."""
        c = self.config
        return self.rows.get(row.request_id, Tally()).upper(self.key_alpha(row.key), c.row_weight, c.optimism)

    def plan(self, inputs: list[RowInput]) -> Plan:
        self.step += 1
        live = {r.request_id for r in inputs}
        self.rows = {k: v for k, v in self.rows.items() if k in live}  # finished and aborted rows leave
        for gone in [k for k in self.episodes if k not in live]:
            self._end_episode(gone)
        self.probed, self.probe_undo = set(), ({}, 0.0)
        rows = self._rows(inputs)
        if self.guard.backoff_left > 0:
            self.guard.backoff_left -= 1
            return self._search([r if r.fixed else replace(r, cap=0) for r in rows])
        return self._probe(inputs, rows, self._choose(inputs, rows))

    def _choose(self, inputs: list[RowInput], rows: list[Row]) -> Plan:
        """Optimism decides which rows draft, the estimate how far. A row whose upper bound says "draft" keeps
        drafting while its estimate is thin (an unlucky first few cycles cannot stop a row whose drafts pay: once
        stopped, its estimate would get no new evidence), but choosing the depth on the upper bound too would
        lengthen every window by the bound's margin, which stays wide under the row's short memory."""
        if not self.config.optimism:
            return self._search(rows)
        hopeful = self._search([replace(r, alpha=self.row_upper(i)) for r, i in zip(rows, inputs, strict=True)])
        return self._search([replace(r, floor=int(w > 0)) for r, w in zip(rows, hopeful.windows, strict=True)])

    def _search(self, rows: list[Row]) -> Plan:
        return plan_windows(rows, self.cost, self.bonus, self.amortize, self.overhead, self.per_depth)

    @property
    def amortize(self) -> float:
        """Most cycles a catch-up forward is spread over: the configured cap, or fewer where rows have been
        drafting only a few cycles per catch-up (under a load that flips the plan between drafting and not,
        each restart pays a catch-up that serves only until the next flip)."""
        return max(1.0, min(self.config.amortize, self.episode_len))

    def _end_episode(self, request_id: str) -> None:
        """A row's drafting cycles since its last catch-up are known: fold them into the EMA, unless a probe
        began the episode and it stopped there (one forced step says nothing of how long drafting would last)."""
        length, by_probe = self.episodes.pop(request_id)
        if not (by_probe and length <= 1):
            self.episode_len = 0.8 * self.episode_len + 0.2 * length

    def _rows(self, inputs: list[RowInput]) -> list[Row]:
        return [Row(self.row_alpha(r), r.cap, r.catch_up, r.fixed, r.remaining) for r in inputs]

    def _probe(self, inputs: list[RowInput], rows: list[Row], plan: Plan) -> Plan:
        """A key never measured gets one drafting row (`probe_window`) at once, so a new profile learns its
        acceptance; one not measured for `probe_every` steps gets one when the probe budget allows, so an
        estimate that said "do not draft" under load is measured again once the load has changed. A probe's extra
        predicted time is a debt that `probe_budget` of every step's time pays off: probes cost that share at most."""
        c = self.config
        self.probe_debt = max(0.0, self.probe_debt - c.probe_budget * plan.seconds)
        if not c.probe_every:
            return plan
        windows = list(plan.windows)
        drafting = {r.key for r, w in zip(inputs, windows, strict=True) if w > 0}
        order = sorted(range(len(inputs)), key=lambda b: inputs[b].catch_up)  # the cheapest row of a key first
        for b in order:
            r = inputs[b]
            seen = self.last_seen.get(r.key)
            due = seen is None or (self.step - seen >= c.probe_every and self.probe_debt == 0.0)
            if due and r.key not in drafting and r.cap > 0:
                windows[b] = min(r.cap, c.probe_window)
                self.probed.add(r.request_id)
                drafting.add(r.key)
                self.probe_undo[0][r.key] = seen
                self.last_seen[r.key] = self.step
                self.probes += 1
        if windows == list(plan.windows):
            return plan
        probed = self._plan_of(rows, windows)
        debt = max(0.0, probed.seconds - plan.seconds)
        self.probe_debt += debt
        self.probe_undo = (self.probe_undo[0], debt)
        return probed

    def abandon(self) -> None:
        """The step just planned ended before its verify (a newcomer cut it short): it measured nothing, so the
        probes it made are due again (a profile never measured is probed at once) and cost no budget."""
        seen, debt = self.probe_undo
        for key, step in seen.items():
            if step is None:
                self.last_seen.pop(key, None)
            else:
                self.last_seen[key] = step
        self.probes -= len(self.probed)
        self.probe_debt = max(0.0, self.probe_debt - debt)
        self.probed, self.probe_undo = set(), ({}, 0.0)

    def _track_speed(self, ratio: float) -> None:
        """Nudge `speed` 1% toward `ratio` and rescale the cost model: a 30% drift is followed in about 25 steps."""
        if ratio != self.speed:
            speed = self.speed * (SPEED_STEP if ratio > self.speed else 1.0 / SPEED_STEP)
            self.speed = min(max(speed, SPEED_RANGE[0]), SPEED_RANGE[1])
            self.cost = self.profile.scaled(self.speed)

    def costed(self, inputs: list[RowInput], windows: list[int]) -> Plan:
        """The plan of the windows that ran when they differ from the choice (a step cut short by an arrival), so
        the prediction and the acceptance tallies follow what was drafted."""
        return self._plan_of(self._rows(inputs), windows)

    def _plan_of(self, rows: list[Row], windows: list[int]) -> Plan:
        tokens = sum(expected_tokens(row.alpha, w, self.bonus) for row, w in zip(rows, windows, strict=True))
        return Plan(tuple(windows), tokens, self.overhead + step_seconds(self.cost, windows, rows, self.per_depth))

    def observe(
        self,
        inputs: list[RowInput],
        plan: Plan,
        accepted: list[int | None],
        seconds: float,
        emitted: int,
        verify: float,
    ) -> None:
        """One step's outcome: each drafting row's accepted count (None: the row failed, no evidence), the
        measured seconds of its draft-verify-commit part, the tokens it emitted and the seconds of its verify
        forward. Every verify tracks the device's speed
        against the profile (a sign step on the ratio: its median, which one pause cannot move far). Plain steps
        (no row drafts, as on every admitting step) teach the overhead: they measure it without mixing in any
        error of the draft costs; drafting steps without a catch-up forward then teach the cost of a draft depth
        beyond its forward. The guard sums `guard_steps` drafting steps (one
        step's luck says nothing) and backs off when they took longer than plain decoding (forward plus overhead)
        would have for the same tokens; a catch-up forward counts there as the planner counts it, spread over the
        cycles it serves (a new request's deferred draft prefill is one, and charging it in full to the next
        `guard_steps` steps stopped drafting for every request where drafting paid)."""
        c = self.config
        for r, w, n in zip(inputs, plan.windows, accepted, strict=True):
            if w == 0 or n is None:
                continue
            if r.catch_up > 0:  # this step's catch-up forward begins a new episode
                if r.request_id in self.episodes:
                    self._end_episode(r.request_id)
                self.episodes[r.request_id] = (0, r.request_id in self.probed)
            if r.request_id in self.episodes:
                length, by_probe = self.episodes[r.request_id]
                self.episodes[r.request_id] = (length + 1, by_probe)
            self.rows[r.request_id] = self.rows.get(r.request_id, Tally()).observe(w, n, c.row_decay)
            self.keys[r.key] = self.keys.get(r.key, Tally()).observe(w, n, c.key_decay)
            self.last_seen[r.key] = self.step
        if seconds <= 0 or plan.seconds <= 0:
            return
        profiled = self.profile.target(len(inputs), 1 + max(plan.windows))
        if profiled > 0 and verify > 0:
            self._track_speed(verify / profiled)
        plain_step = self.overhead + self.cost.target(len(inputs), 1)
        if not any(plan.windows):
            self.overhead = max(0.0, 0.9 * self.overhead + 0.1 * (seconds - (plan.seconds - self.overhead)))
            return
        rows = self._rows(inputs)
        lagging = lagging_rows(plan.windows, rows)
        invest = catch_up_seconds(self.cost, lagging, rows)
        if invest == 0.0:  # a sign step tracks the median error: one slow step (a pause) cannot stop drafting
            depth = max(plan.windows)
            nudge = 0.01 * plan.seconds / depth
            self.per_depth = max(0.0, self.per_depth + (nudge if seconds > plan.seconds else -nudge))
        g = self.guard
        share = amortised_catch_up(self.cost, lagging, rows, self.bonus, self.amortize)
        g.steps, g.seconds = g.steps + 1, g.seconds + seconds - invest + share
        g.plain_seconds += emitted * plain_step / len(inputs)
        if g.steps < c.guard_steps:
            return
        if g.seconds > g.plain_seconds:
            g.backoff_left = g.backoff_len
            g.backoff_len = min(2 * g.backoff_len, 16 * c.backoff_steps)
            self.backoffs += 1
        else:
            g.backoff_len = c.backoff_steps
        g.steps, g.seconds, g.plain_seconds = 0, 0.0, 0.0
