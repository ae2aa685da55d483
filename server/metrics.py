"""The Prometheus metric catalogue (serving.md §6), the only prometheus_client user. Fed from the engine's
`StepStats` (engine thread, via `on_step`) and from each request's life in the server (`RequestTracker`).

Labels are bounded: model_name, task_profile (unknown profiles are rejected), position (0..W_max-1),
finished_reason, and route templates for HTTP; never a threshold, request id or prompt text.

Derived ratios, `[$i]` = `[$__rate_interval]`:
- draft acceptance rate: sum(rate(autojudge_spec_decode_num_accepted_tokens_total[$i]))
  / sum(rate(autojudge_spec_decode_num_draft_tokens_total[$i]))
- mean acceptance length: 1 + sum(rate(autojudge_spec_decode_num_accepted_tokens_total[$i]))
  / sum(rate(autojudge_spec_decode_num_drafts_total[$i]))
- acceptance by position: sum by (position)(rate(autojudge_spec_decode_num_accepted_tokens_per_pos_total[$i]))
  / on() group_left() sum(rate(autojudge_spec_decode_num_drafts_total[$i]))
- judge share of accepted: sum(rate(autojudge_judge_accepted_tokens_total[$i]))
  / sum(rate(autojudge_spec_decode_num_accepted_tokens_total[$i]))
- lossy share of output: sum(rate(autojudge_judge_accepted_tokens_total[$i]))
  / sum(rate(autojudge_generation_tokens_total[$i]))
- judge acceptance among mismatches: sum by (task_profile)(rate(autojudge_judge_accepted_tokens_total[$i]))
  / sum by (task_profile)(rate(autojudge_judge_evaluations_total[$i]))
- output from drafts: sum(rate(autojudge_spec_decode_num_accepted_tokens_total[$i]))
  / sum(rate(autojudge_generation_tokens_total[$i]))
- TTFT p99: histogram_quantile(0.99, sum by (le)(rate(autojudge_time_to_first_token_seconds_bucket[$i])))
- TTFT SLO attainment (1 s): sum(rate(autojudge_time_to_first_token_seconds_bucket{le="1.0"}[$i]))
  / sum(rate(autojudge_time_to_first_token_seconds_count[$i]))
- time split: sum by (phase)(rate(autojudge_engine_phase_seconds_total[$i]))
  / on() group_left() sum(rate(autojudge_engine_phase_seconds_total[$i]))
- error ratio: sum(rate(http_requests_total{status=~"5.."}[$i])) / sum(rate(http_requests_total[$i]))
- mean window by profile: sum by (task_profile)(rate(autojudge_spec_decode_window_sum[$i]))
  / sum by (task_profile)(rate(autojudge_spec_decode_window_count[$i]))
- steps without drafting: sum(rate(autojudge_engine_steps_without_draft_total[$i]))
  / sum(rate(autojudge_engine_step_seconds_count[$i]))
- steps cut short by arrivals: sum(rate(autojudge_engine_draft_cuts_total[$i]))
  / sum(rate(autojudge_engine_step_seconds_count[$i]))
- cost model error: sum(rate(autojudge_step_cost_measured_seconds_total[$i]))
  / sum(rate(autojudge_step_cost_predicted_seconds_total[$i]))
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine import EngineInfo, EngineLoad, StepStats

__all__ = ["CONTENT_TYPE", "RequestTracker", "ServerMetrics"]

TTFT_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5)
TTFT_BUCKETS += (5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
ITL_BUCKETS += (7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS: tuple[float, ...] = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
E2E_BUCKETS += (120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
CYCLE_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 33)
JUDGE_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05)
PHASES = ("prefill", "plan", "draft", "verify", "judge")  # the `StepStats.seconds_*` fields, summing to a step
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def one_two_five(limit: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's token-count buckets)."""
    out: list[float] = []
    base = 1
    while True:
        for m in (1, 2, 5):
            if m * base > limit:
                return tuple(out)
            out.append(float(m * base))
        base *= 10


class ServerMetrics:
    """All metrics on one registry (one per app, so tests can build several)."""

    def __init__(
        self,
        info: EngineInfo,
        load: Callable[[], EngineLoad],
        clock: Callable[[], float] = time.perf_counter,
        vllm_names: bool = False,
    ) -> None:
        """`load` (the engine client's): the load gauges read the engine's state at each scrape. `vllm_names`:
        also the core series under vLLM's names (`VllmAliases`)."""
        self.model_name = info.model_name
        self.clock = clock
        self._muted = False
        # `*_created` series double the output and no dashboard reads them (vLLM turns them off too).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = r = CollectorRegistry()
        mp = ["model_name", "task_profile"]
        m = ["model_name"]
        # --- speculation and judge ----------------------------------------------------------------------
        self.drafts = Counter(
            "autojudge_spec_decode_num_drafts", "Cycles with at least one draft token", mp, registry=r
        )
        self.draft_tokens = Counter("autojudge_spec_decode_num_draft_tokens", "Draft tokens proposed", mp, registry=r)
        self.accepted = Counter(
            "autojudge_spec_decode_num_accepted_tokens", "Draft tokens kept (exact + judge)", mp, registry=r
        )
        self.exact_accepted = Counter(
            "autojudge_spec_decode_num_exact_accepted_tokens", "Draft tokens kept by exact match", mp, registry=r
        )
        self.accepted_per_pos = Counter(
            "autojudge_spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens kept at window position i",
            [*mp, "position"],
            registry=r,
        )
        self.recovered = Counter(
            "autojudge_spec_decode_num_recovered_tokens",
            "Target tokens at the first important mismatch",
            mp,
            registry=r,
        )
        self.bonus = Counter(
            "autojudge_spec_decode_num_bonus_tokens", "Bonus tokens after a full window", mp, registry=r
        )
        self.judge_evaluations = Counter("autojudge_judge_evaluations", "Mismatches the judge decided", mp, registry=r)
        self.judge_accepted = Counter(
            "autojudge_judge_accepted_tokens",
            "Tokens kept only because the judge called them unimportant",
            mp,
            registry=r,
        )
        self.cycle_length = Histogram(
            "autojudge_spec_decode_accepted_length_per_cycle",
            "Tokens emitted per speculation cycle",
            mp,
            buckets=CYCLE_BUCKETS,
            registry=r,
        )
        self.window = Histogram(
            "autojudge_spec_decode_window",
            "Speculation window of each running row per engine step (0: the row did not draft)",
            mp,
            buckets=tuple(float(w) for w in range(info.max_speculative_tokens + 1)),
            registry=r,
        )
        self.steps_without_draft = Counter(
            "autojudge_engine_steps_without_draft", "Engine steps in which no row drafted", m, registry=r
        )
        self.draft_cuts = Counter(
            "autojudge_engine_draft_cuts",
            "Engine steps that stopped drafting early because a new request arrived (auto windows)",
            m,
            registry=r,
        )
        self.draft_cuts.labels(self.model_name)  # 0 until the first cut, so the share reads 0, not "no data"
        self.cost_predicted = Counter(
            "autojudge_step_cost_predicted_seconds",
            "Cost-model time of the auto planner's steps (draft + verify + commit)",
            m,
            registry=r,
        )
        self.cost_measured = Counter(
            "autojudge_step_cost_measured_seconds", "Measured time of the same steps and phases", m, registry=r
        )
        self.cost_error = Histogram(
            "autojudge_step_cost_error_ratio",
            "Measured over predicted step time, per auto-planned step",
            m,
            buckets=(0.5, 0.75, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 4.0),
            registry=r,
        )
        self.cost_speed = Gauge(
            "autojudge_step_cost_speed",
            "The auto cost model's speed against its start-up profile: the median of measured over profiled verify "
            "time, tracked online (1: as profiled; below 1: faster). It follows the device's drift, and contexts "
            "longer than the profile's",
            m,
            registry=r,
        )
        self.judge_latency = Histogram(
            "autojudge_judge_latency_seconds", "Judge scoring time per step", m, buckets=JUDGE_BUCKETS, registry=r
        )
        self.judge_latency.labels(self.model_name)  # empty until a judged mismatch: the panel reads NaN, not "no data"
        self.head_info = Gauge(
            "autojudge_judge_head_info",
            "Which head serves which profile",
            ["task_profile", "layout", "head_sha256"],
            registry=r,
        )
        # --- serving ------------------------------------------------------------------------------------
        self.ttft = Histogram(
            "autojudge_time_to_first_token_seconds", "Time to first token", mp, buckets=TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "autojudge_inter_token_latency_seconds", "Gap between chunks", mp, buckets=ITL_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "autojudge_request_time_per_output_token_seconds",
            "(e2e - ttft) / (tokens - 1) per request",
            mp,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "autojudge_e2e_request_latency_seconds", "End-to-end request latency", mp, buckets=E2E_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            "autojudge_request_queue_time_seconds", "Arrival to admission", mp, buckets=E2E_BUCKETS, registry=r
        )
        self.prefill_time = Histogram(
            "autojudge_request_prefill_time_seconds", "Admission to first token", mp, buckets=E2E_BUCKETS, registry=r
        )
        self.decode_time = Histogram(
            "autojudge_request_decode_time_seconds", "First token to last token", mp, buckets=E2E_BUCKETS, registry=r
        )
        token_buckets = one_two_five(info.max_model_len)
        self.prompt_hist = Histogram(
            "autojudge_request_prompt_tokens", "Prompt tokens per request", m, buckets=token_buckets, registry=r
        )
        self.generation_hist = Histogram(
            "autojudge_request_generation_tokens", "Generated tokens per request", m, buckets=token_buckets, registry=r
        )
        self.step_seconds = Histogram(
            "autojudge_engine_step_seconds", "Engine cycle time", m, buckets=ITL_BUCKETS, registry=r
        )
        self.phase_seconds = Counter(
            "autojudge_engine_phase_seconds",
            "Engine time by phase: prefill, plan (auto windows), draft, verify (target forward and acceptance), judge",
            [*m, "phase"],
            registry=r,
        )
        self.running = Gauge("autojudge_num_requests_running", "Requests in a KV slot", m, registry=r)
        self.waiting = Gauge("autojudge_num_requests_waiting", "Requests waiting for a slot", m, registry=r)
        self.batch_size = Gauge(
            "autojudge_batch_size", "Rows in the last engine step while work remains (0 when idle)", m, registry=r
        )
        self.kv_usage = Gauge("autojudge_kv_cache_usage_perc", "KV cache use, 0-1", m, registry=r)
        # NOTE: read at scrape time, so an abort, a drain or a fault with no step after it shows at once.
        self.running.labels(self.model_name).set_function(lambda: load().num_running)
        self.waiting.labels(self.model_name).set_function(lambda: load().num_waiting)
        self.batch_size.labels(self.model_name).set_function(lambda: load().batch_size)
        self.kv_usage.labels(self.model_name).set_function(lambda: load().kv_usage)
        self.prompt_tokens = Counter("autojudge_prompt_tokens", "Prompt tokens", mp, registry=r)
        self.prefix_queries = Counter(
            "autojudge_prefix_cache_queries", "Prompt tokens of admitted requests, looked up in slots", m, registry=r
        )
        self.prefix_hits = Counter(
            "autojudge_prefix_cache_hits", "Prompt tokens a slot still held from an earlier request", m, registry=r
        )
        self.generation_tokens = Counter("autojudge_generation_tokens", "Generated tokens", mp, registry=r)
        self.success = Counter("autojudge_request_success", "Finished requests", [*mp, "finished_reason"], registry=r)
        self.http_requests = Counter("http_requests", "HTTP requests", ["handler", "method", "status"], registry=r)
        self.http_duration = Histogram(
            "http_request_duration_seconds",
            "HTTP request time",
            ["handler", "method"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        for p in info.profiles:
            if p.head_sha256 is not None:
                self.head_info.labels(p.name, p.layout or "", p.head_sha256).set(1)
        if vllm_names:
            r.register(VllmAliases(self, load))

    @contextlib.contextmanager
    def muted(self) -> Iterator[None]:
        """Engine steps inside are not observed: the start-up warm-up is not traffic. Exact when nothing else
        runs meanwhile, since a request's last step is observed before its final output is delivered."""
        self._muted = True
        try:
            yield
        finally:
            self._muted = False

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_step(self, stats: StepStats) -> None:
        """Engine thread; prometheus_client is thread-safe."""
        if self._muted:
            return
        name = self.model_name
        self.step_seconds.labels(name).observe(stats.seconds_step)
        if stats.num_prefix_query_tokens:
            self.prefix_queries.labels(name).inc(stats.num_prefix_query_tokens)
            self.prefix_hits.labels(name).inc(stats.num_prefix_hit_tokens)
        for phase in PHASES:
            self.phase_seconds.labels(name, phase).inc(getattr(stats, f"seconds_{phase}"))
        for w, profile in zip(stats.windows, stats.window_profiles, strict=True):
            self.window.labels(name, profile).observe(w)
        if stats.windows and not any(stats.windows):  # a step ended before its verify has none
            self.steps_without_draft.labels(name).inc()
        if stats.cut_short:
            self.draft_cuts.labels(name).inc()
        if stats.predicted_seconds:
            measured = stats.seconds_step - stats.seconds_prefill - stats.seconds_plan
            self.cost_predicted.labels(name).inc(stats.predicted_seconds)
            self.cost_measured.labels(name).inc(measured)
            self.cost_error.labels(name).observe(measured / stats.predicted_seconds)
        if stats.cost_speed is not None:
            self.cost_speed.labels(name).set(stats.cost_speed)
        # NOTE: the judge runs only when some row has a mismatch and τ > 0; `num_judged > 0` is the visible part
        # of that, so a step whose judged mismatches all fell in τ = 0 rows is not timed.
        if any(row.counts.num_judged for row in stats.rows):
            self.judge_latency.labels(name).observe(stats.seconds_judge)
        for row in stats.rows:
            c, labels = row.counts, (name, row.profile)
            self.drafts.labels(*labels).inc(c.num_spec_steps)
            self.draft_tokens.labels(*labels).inc(c.num_draft_tokens)
            self.accepted.labels(*labels).inc(c.num_accepted_tokens)
            self.exact_accepted.labels(*labels).inc(c.num_accepted_tokens - c.num_judge_accepted)
            self.recovered.labels(*labels).inc(c.num_recovered)
            self.bonus.labels(*labels).inc(c.num_bonus)
            self.judge_evaluations.labels(*labels).inc(c.num_judged)
            self.judge_accepted.labels(*labels).inc(c.num_judge_accepted)
            self.cycle_length.labels(*labels).observe(row.num_emitted)
            for pos, n in enumerate(c.accepted_per_pos):
                if n:
                    self.accepted_per_pos.labels(*labels, str(pos)).inc(n)

    def observe_http(self, handler: str, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(handler, method, str(status)).inc()
        self.http_duration.labels(handler, method).observe(seconds)

    def track(self, profile: str, num_prompt_tokens: int) -> RequestTracker:
        return RequestTracker(self, profile, num_prompt_tokens)


class VllmAliases(Collector):
    """The series that routers and autoscalers read from vLLM by default (vllm-router, the llm-d endpoint picker,
    KEDA and HPA examples), under vLLM's names, computed at scrape time from the same state as ours: never a second
    count that could drift. Token and request counters are summed over task profiles."""

    def __init__(self, metrics: ServerMetrics, load: Callable[[], EngineLoad]) -> None:
        self.metrics = metrics
        self.load = load

    def collect(self) -> Iterator[Metric]:
        name = self.metrics.model_name
        now = self.load()
        gauges = [
            ("vllm:num_requests_running", "Requests in a KV slot", now.num_running),
            ("vllm:num_requests_waiting", "Requests waiting for a slot", now.num_waiting),
            ("vllm:kv_cache_usage_perc", "KV cache use, 0-1", now.kv_usage),
            ("vllm:gpu_cache_usage_perc", "KV cache use, 0-1 (vLLM's older name)", now.kv_usage),
        ]
        for metric, doc, value in gauges:
            g = GaugeMetricFamily(metric, doc, labels=["model_name"])
            g.add_metric([name], value)
            yield g
        yield summed("vllm:prompt_tokens", "Prompt tokens", self.metrics.prompt_tokens, name, ())
        yield summed("vllm:generation_tokens", "Generated tokens", self.metrics.generation_tokens, name, ())
        yield summed("vllm:prefix_cache_queries", "Prompt tokens looked up", self.metrics.prefix_queries, name, ())
        yield summed("vllm:prefix_cache_hits", "Prompt tokens reused", self.metrics.prefix_hits, name, ())
        yield summed("vllm:request_success", "Finished requests", self.metrics.success, name, ("finished_reason",))


def summed(metric: str, doc: str, source: Counter, model: str, keep: tuple[str, ...]) -> CounterMetricFamily:
    """`source`'s `_total` samples of `model`, summed over every label but `keep`."""
    totals: dict[tuple[str, ...], float] = {}
    for family in source.collect():
        for s in family.samples:
            if s.name.endswith("_total") and s.labels.get("model_name") == model:
                key = tuple(s.labels[k] for k in keep)
                totals[key] = totals.get(key, 0.0) + s.value
    if not keep:
        totals.setdefault((), 0.0)  # the series exists from the start, so a rate has its first sample
    out = CounterMetricFamily(metric, doc, labels=["model_name", *keep])
    for key, value in totals.items():
        out.add_metric([model, *key], value)
    return out


class RequestTracker:
    """One request's latencies, observed once when it ends, whatever the path."""

    def __init__(self, metrics: ServerMetrics, profile: str, num_prompt_tokens: int) -> None:
        self.metrics = metrics
        self.labels = (metrics.model_name, profile)
        self.num_prompt_tokens = num_prompt_tokens
        self.arrival = metrics.clock()
        self.first: float | None = None
        self.last: float | None = None  # time of the latest chunk
        self.done = False

    def on_tokens(self) -> None:
        now = self.metrics.clock()
        if self.first is None:
            self.first = now
            self.metrics.ttft.labels(*self.labels).observe(now - self.arrival)
        elif self.last is not None:
            self.metrics.itl.labels(*self.labels).observe(now - self.last)
        self.last = now

    def finish(self, reason: str, num_output_tokens: int, admitted_at: float | None) -> None:
        if self.done:
            return
        self.done = True
        m, labels = self.metrics, self.labels
        now = m.clock()
        m.success.labels(*labels, reason).inc()
        m.e2e.labels(*labels).observe(now - self.arrival)
        m.prompt_tokens.labels(*labels).inc(self.num_prompt_tokens)
        m.generation_tokens.labels(*labels).inc(num_output_tokens)
        m.prompt_hist.labels(m.model_name).observe(self.num_prompt_tokens)
        m.generation_hist.labels(m.model_name).observe(num_output_tokens)
        if admitted_at is not None:
            # The step that admits a request also prefills it and runs its first cycle.
            m.queue_time.labels(*labels).observe(max(0.0, admitted_at - self.arrival))
            if self.first is not None:
                m.prefill_time.labels(*labels).observe(max(0.0, self.first - admitted_at))
        if self.first is not None:
            m.decode_time.labels(*labels).observe(now - self.first)
            if num_output_tokens > 1:
                m.tpot.labels(*labels).observe((now - self.first) / (num_output_tokens - 1))
