"""The load-test tool: percentiles and aggregation, report rendering, SSE parsing, one request against mock
transports (errors by kind), closed- and open-loop scheduling, the CLI, and one run against the real app."""

from __future__ import annotations

import ast
import asyncio
import itertools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtest import cli, report, runner, session, stats
from loadtest.client import Target, send
from loadtest.config import LoadConfig, LoadTestError, UsageError
from loadtest.prompts import BUILTIN, load_prompts
from loadtest.result import RequestResult
from loadtest.sse import Decoder, MalformedEvent, parse_event
from test_client import one_torch_thread  # noqa: F401
from test_server_api import served

ROOT = Path(__file__).resolve().parents[1]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def ok(index: int, **kw: Any) -> RequestResult:
    return RequestResult(index, start=10.0 + index, e2e=kw.pop("e2e", 1.0), **kw)


def metrics(steps: int, drafted: int, accepted: int, judge_accepted: int, per_cycle: float, lossy: float) -> dict:
    return {
        "speculative_decoding": {
            "num_spec_steps": steps,
            "num_draft_tokens": drafted,
            "num_accepted_draft_tokens": accepted,
            "draft_acceptance_rate": accepted / drafted,
            "mean_acceptance_length": 1 + accepted / steps,
            "acceptance_histogram": [0] * 5,
        },
        "judge": {
            "task_profile": "gsm8k",
            "judge_threshold": 0.3,
            "num_speculative_tokens": 4,
            "bonus_token": True,
            "num_judged": judge_accepted + 1,
            "num_judge_accepted_tokens": judge_accepted,
            "num_recovered_tokens": 2,
            "num_bonus_tokens": 1,
            "mean_tokens_per_cycle": per_cycle,
            "lossy_fraction": lossy,
            "judge_head_sha256": "ab" * 32,
        },
    }


# --- statistics ------------------------------------------------------------------------------------------------


def test_percentile_interpolates_linearly_between_closest_ranks():
    xs = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert stats.percentile(xs, 0.0) == 1.0 and stats.percentile(xs, 1.0) == 4.0
    assert stats.percentile(xs, 0.5) == 2.5
    assert stats.percentile(xs, 0.9) == pytest.approx(3.7)  # numpy.percentile(xs, 90) == 3.7
    assert stats.percentile(list(range(1, 101)), 0.99) == pytest.approx(99.01)
    assert stats.percentile([7.0], 0.99) == 7.0
    assert stats.percentile([], 0.5) is None
    with pytest.raises(ValueError):
        stats.percentile(xs, 1.5)


def test_distribution_has_mean_and_percentiles_or_nothing():
    d = stats.distribution([1.0, 2.0, 3.0, 4.0])
    assert (d.n, d.mean, d.p50) == (4, 2.5, 2.5) and d.p90 == pytest.approx(3.7)
    assert stats.distribution([]) == stats.Distribution(0, None, None, None, None)


def test_latency_tpot_and_itl_over_successful_requests():
    results = [
        ok(0, e2e=1.0, ttft=0.2, itl=(0.1, 0.3), output_tokens=5),  # tpot (1.0 - 0.2) / 4
        ok(1, e2e=2.0, ttft=0.4, itl=(0.5,), output_tokens=1),  # one token: no tpot
        RequestResult(2, 12.0, 9.0, "http_500", "boom"),
    ]
    lat = stats.latency(results)
    assert lat["e2e"]["n"] == 2 and lat["e2e"]["mean"] == 1.5
    assert lat["ttft"]["n"] == 2 and lat["ttft"]["mean"] == pytest.approx(0.3)
    assert lat["tpot"] == {"n": 1, "mean": 0.2, "p50": 0.2, "p90": 0.2, "p99": 0.2}
    assert lat["itl"]["n"] == 3 and lat["itl"]["p50"] == 0.3


def test_throughput_counts_and_errors_by_kind():
    results = [
        ok(0, prompt_tokens=10, output_tokens=20, output_tokens_source="usage"),
        ok(1, output_tokens=6, output_tokens_source="chunks"),  # no usage: no prompt tokens
        RequestResult(2, 0.0, 0.1, "http_429", "queue full"),
        RequestResult(3, 0.0, 0.1, "http_429", "queue full again"),
        RequestResult(4, 0.0, 0.1, "cancelled", "cut"),
    ]
    tp = stats.throughput(results, wall=2.0)
    assert tp == {"requests_per_s": 1.0, "output_tokens_per_s": 13.0, "input_tokens_per_s": 5.0,
                  "total_tokens_per_s": 18.0, "output_tokens": 26, "input_tokens": 10}  # fmt: skip
    assert stats.throughput(results, wall=0.0)["requests_per_s"] is None
    assert stats.counts(results) == {"total": 5, "ok": 2, "failed": 3, "cancelled": 1,
                                     "output_tokens_from": {"chunks": 1, "usage": 1}}  # fmt: skip
    errors = stats.errors(results)
    assert list(errors["by_kind"].items()) == [("http_429", 2), ("cancelled", 1)]
    assert errors["examples"] == {"http_429": "queue full", "cancelled": "cut"}


def test_acceptance_sums_counts_and_recomputes_the_ratios():
    results = [
        ok(0, output_tokens=20, metrics=metrics(5, 20, 15, 3, 3.8, 0.15)),
        ok(1, output_tokens=10, metrics=metrics(3, 12, 6, 1, 2.5, 0.1)),
        ok(2, output_tokens=4, metrics={"speculative_decoding": None, "judge": {"task_profile": "lossless"}}),
        ok(3, output_tokens=9),  # a server without metrics
        RequestResult(4, 0.0, 0.1, "http_500", "x", metrics=metrics(9, 9, 9, 9, 9.0, 1.0)),  # failed: left out
    ]
    acc = stats.acceptance(results)
    assert acc is not None
    assert (acc["requests_with_metrics"], acc["requests_speculating"], acc["requests_with_judge"]) == (3, 2, 3)
    assert (acc["num_spec_steps"], acc["num_draft_tokens"], acc["num_accepted_draft_tokens"]) == (8, 32, 21)
    assert (acc["num_judged"], acc["num_judge_accepted_tokens"]) == (6, 4)
    assert (acc["num_recovered_tokens"], acc["num_bonus_tokens"]) == (4, 2)
    assert acc["draft_acceptance_rate"] == 21 / 32
    assert acc["mean_acceptance_length"] == 1 + 21 / 8
    assert acc["mean_tokens_per_cycle"] == pytest.approx((3.8 * 5 + 2.5 * 3) / 8)
    assert acc["lossy_fraction"] == 4 / 34
    assert acc["mean_request_lossy_fraction"] == pytest.approx(0.25 / 3)
    assert acc["task_profiles"] == {"gsm8k": 2, "lossless": 1}
    assert stats.acceptance([ok(0, output_tokens=3)]) is None


# --- report ----------------------------------------------------------------------------------------------------

REPORT_KEYS = ["config", "run", "requests", "throughput", "goodput", "latency_s", "errors", "acceptance", "per_request"]


def sample_run(**cfg: Any) -> report.Run:
    config = LoadConfig(num_requests=3, api_key="secret-key", task_profile="gsm8k", **cfg)
    results = [
        ok(2, ttft=0.1, itl=(0.05,), output_tokens=3, prompt_tokens=7, output_tokens_source="usage",
           metrics=metrics(2, 8, 5, 1, 3.0, 0.33)),
        ok(1, ttft=0.2, itl=(0.1, 0.2), output_tokens=4, prompt_tokens=7, output_tokens_source="usage"),
        RequestResult(3, 13.0, 0.5, "stream_error", "engine | fault\nagain"),
    ]  # fmt: skip
    return report.Run(config, "tiny", {"version": "0.1"}, "2026-01-01T00:00:00+00:00", 8, 10.0, 2.0, [ok(0)], results)


def test_report_document_records_config_run_and_every_request():
    doc = report.build(sample_run())
    assert list(doc) == REPORT_KEYS
    assert doc["config"]["api_key"] == "<set>" and "secret-key" not in json.dumps(doc)
    assert doc["config"]["task_profile"] == "gsm8k" and doc["config"]["num_requests"] == 3
    assert doc["run"]["model"] == "tiny" and doc["run"]["wall_s"] == 2.0 and doc["run"]["warmup_requests"] == 1
    assert doc["run"]["load"] == "closed loop, 1 user"
    assert [r["index"] for r in doc["per_request"]] == [1, 2, 3]
    assert doc["per_request"][0]["start_s"] == 1.0 and doc["per_request"][0]["tpot_s"] == pytest.approx(0.8 / 3)
    assert doc["acceptance"]["num_draft_tokens"] == 8
    json.dumps(doc)  # all JSON values


def test_report_markdown_and_summary():
    doc = report.build(sample_run(concurrency=None, rate=2.5, max_concurrency=4))
    md = report.markdown(doc)
    assert md.startswith("# Load test\n")
    assert "open loop, Poisson arrivals at 2.5 requests/s (seed 0), at most 4 in flight" in md
    assert "| requests/s | output tok/s | input tok/s | total tok/s | output tokens | input tokens |" in md
    assert "| TTFT | 2 | 150.0 | 150.0 |" in md
    assert "| stream_error | 1 | engine \\| fault again |" in md  # a pipe or newline cannot break the table
    assert "| draft acceptance rate | 0.625 |" in md
    assert "| api_key | <set> |" in md and "task_profile gsm8k" in md
    text = report.summary(doc)
    assert text.splitlines()[0].endswith("2 ok, 1 failed (stream_error 1)")
    assert "acceptance: 0.625 of 8 draft tokens" in text


def test_goodput_counts_requests_meeting_every_slo_given():
    results = [
        ok(0, ttft=0.1, output_tokens=5, e2e=0.5),  # tpot 0.1
        ok(1, ttft=0.3, output_tokens=5, e2e=0.7),  # ttft over
        ok(2, ttft=0.1, output_tokens=3, e2e=0.9),  # tpot 0.4 over
        ok(3, output_tokens=5, e2e=0.4),  # no TTFT measured (not streamed): cannot meet a TTFT SLO
        RequestResult(4, 14.0, 0.1, "http_500"),
    ]
    good = stats.goodput(results, 2.0, {"ttft": 0.2, "tpot": 0.2})
    assert good == {"slo_ms": {"ttft": 200.0, "tpot": 200.0}, "requests": 1, "requests_per_s": 0.5,
                    "share_of_requests": 0.2}  # fmt: skip
    assert stats.goodput(results, 2.0, {"e2e": 0.6})["requests"] == 2
    assert stats.goodput(results, 2.0, {}) is None
    cfg = LoadConfig(num_requests=1, slo_ttft_ms=250, slo_e2e_ms=1000)
    assert cfg.slos() == {"ttft": 0.25, "e2e": 1.0}
    assert "--slo-tpot-ms must be a number of milliseconds > 0" in LoadConfig(num_requests=1, slo_tpot_ms=0).problems()
    doc = report.build(sample_run(slo_ttft_ms=300))
    assert doc["goodput"]["requests"] == 2 and "Goodput (TTFT <= 300 ms): 2 requests" in report.markdown(doc)


def test_report_files_are_written(tmp_path):
    doc = report.build(sample_run())
    report.write(doc, tmp_path / "a" / "r.json", tmp_path / "b" / "r.md")
    assert json.loads((tmp_path / "a" / "r.json").read_text()) == doc
    assert (tmp_path / "b" / "r.md").read_text() == report.markdown(doc)
    (tmp_path / "file").write_text("")
    with pytest.raises(LoadTestError, match="cannot write"):
        report.write(doc, tmp_path / "file" / "r.json", None)


# --- SSE -------------------------------------------------------------------------------------------------------


def test_sse_decoder_follows_the_framing_rules():
    lines = [": comment", 'data: {"a":', "data: 1}", "", "event: x", "garbage line", "id: 3", "", "data:[DONE]"]
    decoder = Decoder()
    out = [d for line in lines if (d := decoder.feed(line)) is not None]
    assert out == ['{"a":\n1}']  # data lines join with a newline; events without data dispatch nothing
    assert decoder.flush() == "[DONE]" and decoder.flush() is None  # the last event lacked its blank line


def test_parse_event_text_usage_metrics_and_errors():
    assert parse_event("[DONE]").done
    assert parse_event('{"choices":[{"index":0,"text":"ab","finish_reason":null}]}').text == "ab"
    chat = parse_event('{"choices":[{"delta":{"role":"assistant","content":""}}]}')
    assert chat.text == "" and not chat.done and chat.error is None
    assert parse_event('{"choices":[{"delta":{"content":"hi"}}]}').text == "hi"
    final = parse_event('{"choices":[],"usage":{"completion_tokens":3},"metrics":{"judge":{}}}')
    assert final.text == "" and final.usage == {"completion_tokens": 3} and final.metrics == {"judge": {}}
    assert parse_event('{"error":{"message":"engine fault","type":"internal_error"}}').error == "engine fault"
    assert parse_event('{"object":"error","message":"vllm says no"}').error == "vllm says no"
    with pytest.raises(MalformedEvent):
        parse_event("{not json")
    with pytest.raises(MalformedEvent):
        parse_event("[1, 2]")


# --- one request -----------------------------------------------------------------------------------------------


def sse(*events: Any) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def text_chunk(text: str) -> dict:
    return {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": None}]}


USAGE = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
GOOD_STREAM = sse(text_chunk("a"), text_chunk("bc"), text_chunk("d"),
                  {"choices": [], "usage": USAGE, "metrics": metrics(1, 4, 3, 0, 4.0, 0.0)}, "[DONE]")  # fmt: skip


def one_request(handler: Callable[[httpx.Request], Any], cfg: LoadConfig | None = None, index: int = 0) -> Any:
    cfg = cfg or LoadConfig(num_requests=1, timeout=5.0)

    async def go() -> RequestResult:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://x") as http:
            return await send(http, Target.of(cfg, "m"), {"prompt": "hi"}, index)

    return run(go())


def test_a_stream_is_timed_and_counted_from_usage():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        after_done = sse(text_chunk("ignored"))  # read (the connection is then reusable) but not counted
        return httpx.Response(200, content=GOOD_STREAM + after_done, headers={"content-type": "text/event-stream"})

    r = one_request(handler, index=7)
    assert r.ok and r.index == 7 and r.chunks == 3 and len(r.itl) == 2
    assert r.ttft is not None and 0 <= r.ttft <= r.e2e
    assert (r.prompt_tokens, r.output_tokens, r.output_tokens_source) == (5, 4, "usage")
    assert r.metrics == metrics(1, 4, 3, 0, 4.0, 0.0)
    body = seen[0]
    assert body == {"model": "m", "max_tokens": 128, "temperature": 0.0, "stream": True,
                    "stream_options": {"include_usage": True}, "prompt": "hi", "seed": 7}  # fmt: skip


def test_judge_fields_are_sent_only_when_given_and_plain_requests_do_not_stream():
    cfg = LoadConfig(num_requests=1, stream=False, endpoint="chat", seed=100,
                     task_profile="gsm8k", judge_threshold=0.0, num_speculative_tokens=3)  # fmt: skip
    target = Target.of(cfg, "m")
    assert target.path == "/v1/chat/completions" and "stream" not in target.body
    assert target.body["task_profile"] == "gsm8k" and target.body["judge_threshold"] == 0.0
    assert target.body["num_speculative_tokens"] == 3

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["seed"] == 102 and body["num_speculative_tokens"] == 3
        return httpx.Response(200, json={"choices": [{"message": {"content": "x"}}], "usage": USAGE, "metrics": {}})

    r = one_request(handler, cfg, index=2)
    assert r.ok and r.ttft is None and r.tpot is None and r.output_tokens == 4 and r.metrics == {}


def test_a_stream_without_usage_counts_chunks():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=sse(text_chunk("a"), text_chunk("b"), "[DONE]"))

    r = one_request(handler)
    assert r.ok and (r.output_tokens, r.output_tokens_source, r.prompt_tokens) == (2, "chunks", None)


def respond(status: int, body: Any = None, content: bytes | None = None) -> Callable[[httpx.Request], Any]:
    return lambda request: httpx.Response(status, json=body, content=content)


def raise_(exc: Exception) -> Callable[[httpx.Request], Any]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


async def hang(request: httpx.Request) -> httpx.Response:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    ("handler", "kind", "message"),
    [
        (respond(429, {"error": {"message": "the queue is full", "type": "rate_limit_error"}}), "http_429",
         "the queue is full"),
        (respond(500, content=b"Internal Server Error"), "http_500", "Internal Server Error"),
        (respond(503, content=b""), "http_503", "Service Unavailable"),
        (raise_(httpx.ReadTimeout("read timed out")), "timeout", "read timed out"),
        (hang, "timeout", "--timeout 0.05"),
        (raise_(httpx.ConnectError("refused")), "connect", "refused"),
        (raise_(httpx.RemoteProtocolError("peer closed")), "transport", "peer closed"),
        (respond(200, content=sse(text_chunk("a"), {"error": {"message": "engine fault"}}, "[DONE]")),
         "stream_error", "engine fault"),
        (respond(200, content=sse(text_chunk("a"), "{oops", "[DONE]")), "bad_response", "not JSON"),
        (respond(200, content=sse(text_chunk("a"))), "stream_error", "without data: [DONE]"),
    ],
    ids=["429", "500", "503-empty", "read-timeout", "deadline", "connect", "transport", "error-event", "malformed",
         "no-done"],
)  # fmt: skip
def test_failures_are_classified_by_kind(handler, kind, message):
    r = one_request(handler, LoadConfig(num_requests=1, timeout=0.05))
    assert r.error == kind and message in r.message
    assert r.ttft is None or kind in ("stream_error", "bad_response")


def test_a_plain_body_without_choices_is_a_bad_response():
    r = one_request(respond(200, {"object": "error"}), LoadConfig(num_requests=1, stream=False))
    assert r.error == "bad_response"


# --- scheduling ------------------------------------------------------------------------------------------------


def tracking_sender(steps: int = 1) -> tuple[runner.Send, dict[str, int]]:
    """A sender that counts requests in flight and yields `steps` times per request."""
    state = {"in_flight": 0, "peak": 0}

    async def fake(index: int) -> RequestResult:
        state["in_flight"] += 1
        state["peak"] = max(state["peak"], state["in_flight"])
        for _ in range(steps):
            await asyncio.sleep(0)
        state["in_flight"] -= 1
        return ok(index)

    return fake, state


def test_closed_loop_sends_exactly_n_with_at_most_c_in_flight():
    fake, state = tracking_sender(steps=3)
    seen: list[int] = []
    results = run(runner.run(LoadConfig(concurrency=3, num_requests=10), fake, lambda r: seen.append(r.index)))
    assert sorted(r.index for r in results) == list(range(10)) == sorted(seen)
    assert state["peak"] == 3 and state["in_flight"] == 0


def arrivals(n: int, rate: float, seed: int) -> list[float]:
    return list(itertools.islice(runner.poisson_arrivals(rate, seed), n))


def test_poisson_schedule_is_seeded_exponential_gaps():
    # random.Random(0).random() starts 0.8444218515250481, 0.7579544029403025, 0.420571580830845 on every Python.
    expected = [0.0]
    for u in (0.8444218515250481, 0.7579544029403025, 0.420571580830845):
        expected.append(expected[-1] - math.log(1 - u) / 2.0)
    assert arrivals(4, 2.0, 0) == pytest.approx(expected)
    assert arrivals(50, 2.0, 0) == arrivals(50, 2.0, 0) != arrivals(50, 2.0, 1)
    times = arrivals(20001, 4.0, 3)
    assert all(b >= a for a, b in itertools.pairwise(times))
    assert times[-1] / 20000 == pytest.approx(0.25, rel=0.03)  # mean gap 1 / rate


def test_open_loop_sends_n_under_the_cap():
    fake, state = tracking_sender(steps=5)
    cfg = LoadConfig(concurrency=None, rate=1e6, max_concurrency=2, num_requests=12)
    results = run(runner.run(cfg, fake))
    assert sorted(r.index for r in results) == list(range(12)) and state["peak"] <= 2


def test_duration_end_cancels_requests_after_the_grace():
    async def stuck(index: int) -> RequestResult:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    results = run(runner.run(LoadConfig(concurrency=2, duration=0.02, grace=0.0), stuck))
    assert sorted(r.index for r in results) == [0, 1] and {r.error for r in results} == {"cancelled"}


def test_requests_in_flight_at_the_duration_end_finish_within_the_grace():
    async def slow(index: int) -> RequestResult:
        await asyncio.sleep(0.05)  # longer than the duration: each user sends once
        return ok(index)

    results = run(runner.run(LoadConfig(concurrency=2, duration=0.02, grace=30.0), slow))
    assert sorted(r.index for r in results) == [0, 1] and all(r.ok for r in results)


# --- configuration, prompts, CLI -------------------------------------------------------------------------------


def test_config_problems():
    assert LoadConfig(num_requests=1).problems() == []
    assert LoadConfig(duration=1.0, concurrency=None, rate=3.0, max_concurrency=2).problems() == []
    assert "give --num-requests and/or --duration" in LoadConfig().problems()
    bad = LoadConfig(base_url="localhost:8000", num_requests=0, concurrency=None, rate=math.inf,
                     judge_threshold=1.5, max_concurrency=0).problems()  # fmt: skip
    assert len(bad) == 5 and any("http(s) URL" in p for p in bad)
    assert LoadConfig(num_requests=1, max_concurrency=2).problems() == [
        "--max-concurrency caps an open loop (--rate) and must be >= 1"
    ]
    assert LoadConfig(base_url="http://h:1/v1/").root_url == "http://h:1"


def test_prompt_sets(tmp_path):
    assert load_prompts(LoadConfig())[0] == {"prompt": BUILTIN[0]}
    assert load_prompts(LoadConfig(endpoint="chat"))[1] == {"messages": [{"role": "user", "content": BUILTIN[1]}]}
    (tmp_path / "test.jsonl").write_text('{"question": "1 + 1?", "answer": "2"}\n\n{"question": "2 + 2?"}\n')
    assert load_prompts(LoadConfig(prompts="gsm8k", data_dir=tmp_path)) == [{"prompt": "1 + 1?"}, {"prompt": "2 + 2?"}]
    with pytest.raises(UsageError, match="not found"):
        load_prompts(LoadConfig(prompts="gsm8k", data_dir=tmp_path / "nowhere"))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    file = tmp_path / "p.jsonl"
    file.write_text(json.dumps({"prompt": "p1"}) + "\n" + json.dumps({"messages": messages, "prompt": "p2"}) + "\n")
    assert load_prompts(LoadConfig(prompts_file=file)) == [{"prompt": "p1"}, {"prompt": "p2"}]
    assert load_prompts(LoadConfig(prompts_file=file, endpoint="chat"))[1] == {"messages": messages}
    file.write_text(json.dumps({"messages": messages}) + "\n")
    with pytest.raises(UsageError, match=r"p\.jsonl:1: .*--endpoint chat"):
        load_prompts(LoadConfig(prompts_file=file))
    file.write_text("{broken\n")
    with pytest.raises(UsageError, match=r"p\.jsonl:1: not valid JSON"):
        load_prompts(LoadConfig(prompts_file=file))


def fake_server(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/models":
        return httpx.Response(200, json={"object": "list", "data": [{"id": "fake-model"}]})
    if request.url.path == "/v1/completions":
        return httpx.Response(200, content=GOOD_STREAM)
    return httpx.Response(404, json={"error": {"message": "not here"}})


def mock_client(handler: Callable[[httpx.Request], Any]) -> Callable[[LoadConfig], httpx.AsyncClient]:
    return lambda cfg: httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url=cfg.root_url)


def test_cli_runs_reports_and_writes_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(session, "http_client", mock_client(fake_server))
    out = tmp_path / "r.json"
    argv = ["--num-requests", "4", "--warmup", "2", "--concurrency", "2", "--out-json", str(out),
            "--out-md", str(tmp_path / "r.md"), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    doc = json.loads(out.read_text())
    assert list(doc) == REPORT_KEYS and doc["run"]["model"] == "fake-model" and doc["run"]["server_version"] is None
    assert doc["requests"]["ok"] == 4 and [r["index"] for r in doc["per_request"]] == [2, 3, 4, 5]
    assert doc["acceptance"]["num_draft_tokens"] == 16 and doc["throughput"]["output_tokens"] == 16
    assert (tmp_path / "r.md").read_text().startswith("# Load test")
    assert capsys.readouterr().out.startswith("4 requests to fake-model at http://127.0.0.1:8000")


@pytest.mark.parametrize(
    ("handler", "argv", "message"),
    [
        (raise_(httpx.ConnectError("All connection attempts failed")), [], "cannot reach http://127.0.0.1:8000"),
        (respond(401, {"error": {"message": "bad key"}}), [], "answered 401: check --api-key"),
        (respond(404), [], "name the model with --model"),
        (respond(200, {"data": []}), [], "lists no model id"),
    ],
)
def test_cli_fails_with_a_message_when_the_server_cannot_be_used(handler, argv, message, monkeypatch, capsys):
    monkeypatch.setattr(session, "http_client", mock_client(handler))
    assert cli.main(["--num-requests", "1", "--no-progress", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_refuses_bad_arguments(capsys, tmp_path):
    for argv in (["--num-requests", "0"], ["--rate", "1", "--concurrency", "2", "--duration", "1"], []):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2
    assert "give --num-requests and/or --duration" in capsys.readouterr().err
    assert cli.main(["--num-requests", "1", "--prompts-file", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_loadtest_imports_only_httpx_tqdm_and_the_stdlib():
    allowed = set(sys.stdlib_module_names) | {"httpx", "tqdm", "loadtest"}
    for path in sorted((ROOT / "loadtest").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            assert {n.split(".")[0] for n in names} <= allowed, path


# --- against the real app --------------------------------------------------------------------------------------


def test_a_run_against_the_app_aggregates_the_servers_acceptance_statistics(target, draft):
    cfg = LoadConfig(base_url="http://test", endpoint="chat", concurrency=2, num_requests=5, warmup=1,
                     max_tokens=8, num_speculative_tokens=3, progress=False)  # fmt: skip

    async def scenario() -> dict[str, Any]:
        async with served(target, draft) as (http, _):
            return await session.execute(cfg, http, load_prompts(cfg))

    doc = run(scenario())
    assert doc["run"]["model"] == "tiny" and doc["run"]["warmup_requests"] == 1 and doc["run"]["warmup_failed"] == 0
    assert doc["run"]["server_version"]["model"] == "tiny"
    assert doc["requests"] == {"total": 5, "ok": 5, "failed": 0, "cancelled": 0, "output_tokens_from": {"usage": 5}}
    rows = doc["per_request"]
    assert [r["index"] for r in rows] == [1, 2, 3, 4, 5]
    assert doc["throughput"]["output_tokens"] == sum(r["output_tokens"] for r in rows)
    assert doc["latency_s"]["e2e"]["n"] == 5
    assert doc["latency_s"]["ttft"]["n"] == sum(r["ttft_s"] is not None for r in rows)
    acc = doc["acceptance"]
    assert acc["requests_with_metrics"] == acc["requests_speculating"] == 5
    for key in stats.SPEC_COUNTS:
        assert acc[key] == sum(r["metrics"]["speculative_decoding"][key] for r in rows)
    for key in stats.JUDGE_COUNTS:
        assert acc[key] == sum(r["metrics"]["judge"][key] for r in rows)
    assert acc["num_draft_tokens"] > 0
    assert acc["draft_acceptance_rate"] == acc["num_accepted_draft_tokens"] / acc["num_draft_tokens"]
    assert all(r["metrics"]["judge"]["num_speculative_tokens"] == 3 for r in rows)  # the extension field got there
    assert acc["task_profiles"] == {"lossless": 5}
