"""The window planner: each step, each row's speculation window W in [0, cap] that maximises the batch's expected
tokens per second under the step-cost model, "no row drafts" included.

Acceptance is modelled per row as independent per-position acceptance with probability α (the geometric model of
speculative decoding), estimated from the row's own cycles and seeded by what rows of the same task profile and
threshold τ have shown (a looser judge earns longer windows by itself). The expected tokens of a row grow by
`gain(α, k) = E(α, k) - E(α, k - 1)` when its window grows from k - 1 to k, which rises with α; so at each depth
the rows that should reach it are those with the highest α, and the search adds rows depth by depth, keeping the
best plan seen (O(rows x depth) per step).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.spec.cost import StepCost


def expected_tokens(alpha: float, window: int, bonus: bool) -> float:
    """Tokens one cycle emits in expectation: accepted drafts n (P(n >= i) = α^i), plus the recovered token when
    n < W, plus the bonus after a full window when it is on. W = 0 is plain decoding: one token."""
    if window == 0:
        return 1.0
    accepted = sum(alpha**i for i in range(1, window + 1))
    full = alpha**window
    return accepted + (1.0 - full) + (full if bonus else 0.0)


@dataclass(frozen=True, slots=True)
class Row:
    """What the planner knows of one running row."""

    alpha: float  # per-position acceptance estimate
    cap: int  # largest window allowed (request cap, tokens left)
    catch_up: int  # tokens a separate draft forward must read before this row drafts (0: none, see Drafter)
    fixed: bool = False  # the request asked for exactly `cap` (speculative_window "fixed")
    remaining: int | None = None  # tokens the request may still emit (None: unknown)
    floor: int = 0  # least window the search gives it (at most `cap`): drafting was decided already

    def start(self) -> int:
        """Its window before the search adds depth: the cap of a fixed row, else its floor."""
        return self.cap if self.fixed else min(self.floor, self.cap)


@dataclass(frozen=True, slots=True)
class Plan:
    windows: tuple[int, ...]
    expected_tokens: float
    seconds: float  # predicted step time: forwards (draft catch-up in full) plus the step's fixed overhead

    @property
    def tokens_per_second(self) -> float:
        return self.expected_tokens / self.seconds if self.seconds > 0 else 0.0


def lagging_rows(windows: list[int] | tuple[int, ...], rows: list[Row]) -> list[int]:
    """Drafting rows whose draft cache must be caught up by a forward of its own first."""
    return [b for b, w in enumerate(windows) if w > 0 and rows[b].catch_up > 0]


def catch_up_seconds(cost: StepCost, lagging: list[int], rows: list[Row]) -> float:
    """The one draft forward that catches the `lagging` rows up (0 when there are none)."""
    return cost.draft(len(lagging), max(rows[b].catch_up for b in lagging)) if lagging else 0.0


def horizon(row: Row, bonus: bool, amortize: float) -> float:
    """Cycles a row's catch-up forward is spread over when choosing: those its remaining tokens take at its cap
    (the forward serves every one of them), at most `amortize`, at least one."""
    if row.remaining is None:
        return amortize
    cycles = row.remaining / expected_tokens(row.alpha, max(row.cap, 1), bonus)
    return min(amortize, max(1.0, cycles))


def amortised_catch_up(cost: StepCost, lagging: list[int], rows: list[Row], bonus: bool, amortize: float) -> float:
    """The catch-up forward's share of one cycle: its cost over the shortest horizon of the rows it serves."""
    if not lagging:
        return 0.0
    spread = min(horizon(rows[b], bonus, amortize) for b in lagging)
    return catch_up_seconds(cost, lagging, rows) / spread


def step_seconds(cost: StepCost, windows: list[int], rows: list[Row], per_depth: float = 0.0) -> float:
    """Predicted seconds of one step: the drafts (a catch-up forward for lagging rows, then one forward per depth
    over the rows still drafting, each with `per_depth` seconds of its own beyond the forward) and one verify over
    `1 + max W` tokens per row."""
    depth = max(windows, default=0)
    seconds = cost.target(len(windows), 1 + depth) + catch_up_seconds(cost, lagging_rows(windows, rows), rows)
    seconds += depth * per_depth
    for k in range(1, depth + 1):
        seconds += cost.draft(sum(w >= k for w in windows), 1)
    return seconds


def plan_windows(
    rows: list[Row], cost: StepCost, bonus: bool, amortize: float, overhead: float = 0.0, per_depth: float = 0.0
) -> Plan:
    """The best plan of the depth-by-depth search; `fixed` rows keep their cap and are costed, not chosen, and a
    row's `floor` is where its search starts. A lagging row's catch-up forward counts a share of its cost when
    choosing (it is paid once, then serves every later cycle: `horizon`), in full in the predicted time. `overhead`
    is what a step costs beyond its forwards (sampling, bookkeeping): the same for every plan, it makes tokens per
    step worth more. `per_depth` is what each draft depth costs beyond its forward (the draft's logits, the choice
    of its tokens, batch building)."""
    n = len(rows)
    windows = [r.start() for r in rows]
    deepest = max((r.cap for r in rows), default=0)
    base_depth = max(windows, default=0)
    committed = [sum(w >= k for w in windows) for k in range(deepest + 2)]  # rows already at depth k
    tail = [0.0] * (deepest + 2)  # tail[k]: the committed rows' draft forwards deeper than k
    for k in range(deepest - 1, -1, -1):
        tail[k] = tail[k + 1] + cost.draft(committed[k + 1], 1)
    lags = lagging_rows(windows, rows)

    def catch_up(lagging: list[int]) -> float:
        return amortised_catch_up(cost, lagging, rows, bonus, amortize)

    gained = sum(expected_tokens(r.alpha, w, bonus) for r, w in zip(rows, windows, strict=True))
    decided = 0.0  # draft forwards of the depths settled so far
    base = overhead + cost.target(n, 1 + base_depth) + base_depth * per_depth + tail[0] + catch_up(lags)
    best = (gained / base, tuple(windows))
    for k in range(1, deepest + 1):
        candidates = [b for b in range(n) if not rows[b].fixed and windows[b] == k - 1 and rows[b].cap >= k]
        if not candidates:
            if committed[k] == 0:
                break  # nothing reaches this depth, so nothing goes deeper
            decided += cost.draft(committed[k], 1)
            continue
        candidates.sort(key=lambda b: -rows[b].alpha)
        verify = overhead + cost.target(n, 1 + max(k, base_depth)) + max(k, base_depth) * per_depth
        top: tuple[float, int, float] | None = None  # (tokens per second, rows, tokens gained)
        extra, trial = 0.0, list(lags)
        for j, b in enumerate(candidates, start=1):
            extra += expected_tokens(rows[b].alpha, k, bonus) - expected_tokens(rows[b].alpha, k - 1, bonus)
            if k == 1 and rows[b].catch_up > 0:
                trial.append(b)
            seconds = verify + decided + cost.draft(committed[k] + j, 1) + tail[k] + catch_up(trial)
            rate = (gained + extra) / seconds
            if top is None or rate > top[0]:
                top = (rate, j, extra)
        assert top is not None
        rate, j, extra = top
        for b in candidates[:j]:
            windows[b] = k
            if k == 1 and rows[b].catch_up > 0:
                lags.append(b)
        gained += extra
        decided += cost.draft(committed[k] + j, 1)
        if rate > best[0]:
            best = (rate, tuple(windows))
    chosen = list(best[1])
    tokens = sum(expected_tokens(r.alpha, w, bonus) for r, w in zip(rows, chosen, strict=True))
    return Plan(best[1], tokens, overhead + step_seconds(cost, chosen, rows, per_depth))
