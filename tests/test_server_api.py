"""The HTTP API over ASGI with a tiny real engine: completions and chat, streaming and not, usage and the metrics
block, profiles, the info routes, every client error as an OpenAI-style 4xx, auth, backpressure, faults."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch

from conftest import overflowing, run_all
from engine import AsyncEngine, Engine, Request, SamplingParams, SpecParams
from engine.spec.judging import HeadJudge
from judge.head import JudgeHead
from server.app import create_app
from server.metrics import ServerMetrics
from server.settings import Settings
from server.version import CHECKOUT, git_commit
from test_client import MAX_MODEL_LEN, Gate, async_wait_for, one_torch_thread, tiny_engine  # noqa: F401
from test_server_text import CharTokenizer

TOKENIZER = CharTokenizer()
PROMPT = "The quick brown fox"
MODEL = "tiny"


def math_head(dim: int = 32) -> JudgeHead:
    gen = torch.Generator().manual_seed(3)
    return JudgeHead(
        layout="DT",
        mean=torch.zeros(dim, dtype=torch.float64),
        scale=torch.ones(dim, dtype=torch.float64),
        weights=torch.randn(dim, generator=gen, dtype=torch.float64),
        bias=0.0,
        thresholds=torch.linspace(0, 1, 26, dtype=torch.float64),
        default_threshold=0.3,
        meta={"tensors_sha256": "ab" * 32, "fit": {"thresholds": [{"quantile": 0.5, "threshold": 0.3}]}},
    )


@dataclass
class Served:
    app: Any
    engine: Engine
    client: AsyncEngine
    metrics: ServerMetrics
    gate: Gate


def build_app(
    target,
    draft,
    settings: Settings | None = None,
    *,
    heads: bool = False,
    vllm_names: bool = False,
    draining: Any = lambda: False,
    **kwargs: Any,
) -> Served:
    gate = Gate()
    judge = HeadJudge({"math": math_head()}) if heads else None
    engine, client = tiny_engine(
        target, draft, judge=judge, on_step=gate, detokenize=lambda ids: TOKENIZER.decode(ids), name=MODEL, **kwargs
    )
    metrics = ServerMetrics(client.info(), client.load, vllm_names=vllm_names)
    gate.then = metrics.observe_step
    app = create_app(client, settings or Settings(), TOKENIZER, metrics, draining)
    return Served(app, engine, client, metrics, gate)


@contextlib.asynccontextmanager
async def served(target, draft, settings: Settings | None = None, **kwargs: Any) -> AsyncIterator[Any]:
    s = build_app(target, draft, settings, **kwargs)
    await s.client.start()  # ASGITransport does not run the lifespan
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=s.app), base_url="http://test") as http:
            yield http, s
    finally:
        s.gate.release()
        await s.client.shutdown(5)


def run(scenario) -> Any:
    return asyncio.run(scenario())


def sse_events(text: str) -> list[Any]:
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    return [e[6:] if e[6:] == "[DONE]" else json.loads(e[6:]) for e in events]


def reference_text(target, draft, prompt_ids: list[int], max_tokens: int, **spec: Any) -> str:
    engine, _ = tiny_engine(target, draft)
    request = Request("ref", tuple(prompt_ids), SamplingParams(max_tokens=max_tokens), SpecParams(**spec))
    tokens, _ = run_all(engine, [request])
    return TOKENIZER.decode(tokens["ref"], skip_special_tokens=True)


def chat_prompt(content: str) -> list[int]:
    rendered = TOKENIZER.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return TOKENIZER.encode(rendered)


def check_spec_metrics(metrics: dict[str, Any], completion_tokens: int) -> None:
    sd = metrics["speculative_decoding"]
    hist = sd["acceptance_histogram"]
    assert sum(hist) == sd["num_spec_steps"] > 0
    assert sum(j * n for j, n in enumerate(hist)) == sd["num_accepted_draft_tokens"]
    assert sd["draft_acceptance_rate"] == sd["num_accepted_draft_tokens"] / sd["num_draft_tokens"]
    assert sd["mean_acceptance_length"] == 1 + sd["num_accepted_draft_tokens"] / sd["num_spec_steps"]
    judge = metrics["judge"]
    emitted = sd["num_accepted_draft_tokens"] + judge["num_recovered_tokens"] + judge["num_bonus_tokens"]
    assert emitted <= completion_tokens <= emitted + 1  # the first token comes from a cycle too, unless cut


# --- completions and chat ------------------------------------------------------------------------------


def test_completion_matches_the_engine_and_reports_usage(target, draft):
    expected = reference_text(target, draft, TOKENIZER.encode(PROMPT), 24)

    async def scenario():
        async with served(target, draft) as (http, _):
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
            return (await http.post("/v1/completions", json=body)).json()

    r = run(scenario)
    assert r["object"] == "text_completion" and r["model"] == MODEL and r["id"].startswith("cmpl-")
    assert r["choices"][0]["text"] == expected
    assert r["choices"][0]["finish_reason"] == "length"
    assert r["usage"] == {
        "prompt_tokens": len(PROMPT),
        "completion_tokens": 24,
        "total_tokens": len(PROMPT) + 24,
        "prompt_tokens_details": {"cached_tokens": 0},  # a fresh server's slots hold nothing
    }
    check_spec_metrics(r["metrics"], 24)
    judge = r["metrics"]["judge"]
    assert judge["task_profile"] == "lossless" and judge["judge_threshold"] == 0.0
    assert judge["num_speculative_tokens"] == 4 and judge["num_judge_accepted_tokens"] == 0


def test_streamed_completion_equals_the_plain_one(target, draft):
    async def scenario():
        async with served(target, draft) as (http, _):
            body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0}
            plain = (await http.post("/v1/completions", json=body)).json()
            opts = {"stream": True, "stream_options": {"include_usage": True}}
            streamed = await http.post("/v1/completions", json=body | opts)
            return plain, streamed

    plain, streamed = run(scenario)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]"
    chunks, final = events[:-2], events[-2]
    assert len(chunks) > 1, "a stream must arrive in several chunks"
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert final["choices"] == [] and final["usage"] | {"prompt_tokens_details": None} == plain["usage"] | {
        "prompt_tokens_details": None
    }
    # The same prompt again: its slot still held every prompt position but the last, which the first cycle feeds.
    assert plain["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert final["usage"]["prompt_tokens_details"] == {"cached_tokens": len(PROMPT) - 1}
    assert final["metrics"] == plain["metrics"]


def test_stream_without_usage_puts_the_metrics_on_the_last_chunk(target, draft):
    async def scenario():
        async with served(target, draft) as (http, _):
            body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stream": True}
            return sse_events((await http.post("/v1/completions", json=body)).text)

    events = run(scenario)
    assert "metrics" in events[-2] and all("metrics" not in e for e in events[:-2])
    assert all("usage" not in e for e in events[:-1])


def test_chat_uses_the_template_and_streams_a_role_first(target, draft):
    expected = reference_text(target, draft, chat_prompt("hi there"), 16)

    async def scenario():
        async with served(target, draft) as (http, _):
            body = {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 16, "temperature": 0}
            plain = (await http.post("/v1/chat/completions", json=body)).json()
            streamed = await http.post("/v1/chat/completions", json=body | {"stream": True})
            parts = [{"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]
            as_parts = (await http.post("/v1/chat/completions", json=body | {"messages": parts})).json()
            return plain, sse_events(streamed.text), as_parts

    plain, events, as_parts = run(scenario)
    assert plain["object"] == "chat.completion" and plain["id"].startswith("chatcmpl-")
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert plain["usage"]["prompt_tokens"] == len(chat_prompt("hi there"))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == expected
    assert as_parts["choices"][0]["message"]["content"] == expected


def test_max_completion_tokens_and_token_id_prompts(target, draft):
    async def scenario():
        async with served(target, draft) as (http, _):
            chat = {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 3, "temperature": 0}
            c = (await http.post("/v1/chat/completions", json=chat)).json()
            ids = TOKENIZER.encode(PROMPT)
            by_ids = (
                await http.post("/v1/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0})
            ).json()
            by_text = (
                await http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
            ).json()
            return c, by_ids, by_text

    c, by_ids, by_text = run(scenario)
    assert c["usage"]["completion_tokens"] == 3
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]


def test_speculation_off_gives_the_same_greedy_text_and_no_spec_stats(target, draft):
    async def scenario():
        async with served(target, draft) as (http, _):
            body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0}
            on = (await http.post("/v1/completions", json=body)).json()
            off = (await http.post("/v1/completions", json=body | {"speculative": False})).json()
            w0 = (await http.post("/v1/completions", json=body | {"num_speculative_tokens": 0})).json()
            w7 = (await http.post("/v1/completions", json=body | {"num_speculative_tokens": 7})).json()
            return on, off, w0, w7

    on, off, w0, w7 = run(scenario)
    assert on["choices"][0]["text"] == off["choices"][0]["text"] == w0["choices"][0]["text"]
    assert on["choices"][0]["text"] == w7["choices"][0]["text"]
    assert off["metrics"]["speculative_decoding"] is None and w0["metrics"]["speculative_decoding"] is None
    assert off["metrics"]["judge"]["num_speculative_tokens"] == 0
    assert w7["metrics"]["judge"]["num_speculative_tokens"] == 7
    assert len(w7["metrics"]["speculative_decoding"]["acceptance_histogram"]) == 8


def test_judge_profile_accepts_mismatches_and_reports_them(target, draft):
    async def scenario():
        async with served(target, draft, heads=True) as (http, _):
            body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "task_profile": "math"}
            default = (await http.post("/v1/completions", json=body)).json()
            accept_all = (await http.post("/v1/completions", json=body | {"judge_threshold": 1.0})).json()
            judged = (await http.get("/metrics")).text
            lossless = (await http.post("/v1/completions", json=body | {"judge_threshold": 0.0})).json()
            return default, accept_all, lossless, judged, (await http.get("/metrics")).text

    default, accept_all, lossless, judged, after = run(scenario)
    timed = sample(judged, "autojudge_judge_latency_seconds_count", model_name=MODEL)
    assert timed > 0  # one observation per step with a judged mismatch
    assert sample(after, "autojudge_judge_latency_seconds_count", model_name=MODEL) == timed  # τ = 0 consults none
    assert default["metrics"]["judge"]["judge_threshold"] == 0.3
    judge = accept_all["metrics"]["judge"]
    assert judge["task_profile"] == "math" and judge["judge_threshold"] == 1.0
    assert judge["judge_head_sha256"] == "ab" * 32
    assert judge["num_judge_accepted_tokens"] > 0 and judge["num_judged"] >= judge["num_judge_accepted_tokens"]
    assert judge["lossy_fraction"] == judge["num_judge_accepted_tokens"] / 40
    assert lossless["metrics"]["judge"]["num_judge_accepted_tokens"] == 0
    assert accept_all["choices"][0]["text"] != lossless["choices"][0]["text"]
    check_spec_metrics(accept_all["metrics"], 40)


def test_detailed_spec_metrics_list_each_cycle_and_none_drops_the_block(target, draft):
    async def scenario():
        async with served(target, draft, heads=True) as (http, _):
            body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "task_profile": "math"}
            detailed = (await http.post("/v1/completions", json=body | {"spec_metrics": "detailed"})).json()
            opts = {"spec_metrics": "detailed", "stream": True, "stream_options": {"include_usage": True}}
            streamed = sse_events((await http.post("/v1/completions", json=body | opts)).text)
            summary = (await http.post("/v1/completions", json=body)).json()
            none = (await http.post("/v1/completions", json=body | {"spec_metrics": "none"})).json()
            return detailed, streamed, summary, none

    detailed, streamed, summary, none = run(scenario)
    assert streamed[-2]["metrics"] == detailed["metrics"]
    sd = dict(detailed["metrics"]["speculative_decoding"])
    accepted, drafted = sd.pop("per_step_accepted"), sd.pop("per_step_drafted")
    assert sd == summary["metrics"]["speculative_decoding"]  # the summary fields are unchanged
    assert len(accepted) == len(drafted) == sd["num_spec_steps"]
    assert sum(accepted) == sd["num_accepted_draft_tokens"] and sum(drafted) == sd["num_draft_tokens"]
    assert all(0 <= a <= d <= 4 for a, d in zip(accepted, drafted, strict=True))
    assert [accepted.count(j) for j in range(5)] == sd["acceptance_histogram"]
    assert "metrics" not in none and none["choices"] == summary["choices"]
    assert "per_step_accepted" not in summary["metrics"]["speculative_decoding"]


@pytest.mark.parametrize("level", ["none", "detailed"])
def test_spec_metrics_default_is_a_server_setting(target, draft, level):
    async def scenario():
        async with served(target, draft, Settings(spec_metrics=level)) as (http, _):
            body = {"prompt": PROMPT, "max_tokens": 8}
            default = (await http.post("/v1/completions", json=body)).json()
            asked = (await http.post("/v1/completions", json=body | {"spec_metrics": "summary"})).json()
            return default, asked

    default, asked = run(scenario)
    assert ("metrics" in default) == (level == "detailed")
    if level == "detailed":
        assert "per_step_drafted" in default["metrics"]["speculative_decoding"]
    assert "per_step_drafted" not in asked["metrics"]["speculative_decoding"]


def test_stop_strings_cut_the_text_streaming_and_not(target, draft):
    full = reference_text(target, draft, TOKENIZER.encode(PROMPT), 40)
    stop = full[10:13]
    expected = full[: full.find(stop)]

    async def scenario():
        async with served(target, draft) as (http, _):
            body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stop": [stop]}
            plain = (await http.post("/v1/completions", json=body)).json()
            streamed = sse_events((await http.post("/v1/completions", json=body | {"stream": True})).text)
            return plain, streamed

    plain, streamed = run(scenario)
    assert plain["choices"][0]["text"] == expected and plain["choices"][0]["finish_reason"] == "stop"
    assert plain["usage"]["completion_tokens"] < 40
    assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == expected


def test_seeded_sampling_is_reproducible(target, draft):
    async def scenario():
        async with served(target, draft) as (http, _):
            body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0.8, "top_p": 0.9, "top_k": 20, "seed": 7}
            a = (await http.post("/v1/completions", json=body)).json()
            b = (await http.post("/v1/completions", json=body)).json()
            return a, b

    a, b = run(scenario)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


# --- info routes ---------------------------------------------------------------------------------------


def test_info_routes(target, draft):
    async def scenario():
        async with served(target, draft, heads=True) as (http, _):
            return {p: await http.get(p) for p in ("/health", "/ready", "/v1/models", "/v1/profiles", "/version")}

    r = run(scenario)
    assert r["/health"].status_code == 200 and r["/health"].content == b""
    assert r["/ready"].json()["status"] == "ready"
    models = r["/v1/models"].json()
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == MAX_MODEL_LEN
    profiles = {p["name"]: p for p in r["/v1/profiles"].json()["data"]}
    assert r["/v1/profiles"].json()["default"] == "lossless"
    assert set(profiles) == {"lossless", "math"} and profiles["lossless"]["default"]
    assert profiles["math"]["judge_threshold"] == 0.3 and profiles["math"]["head_sha256"] == "ab" * 32
    version = r["/version"].json()
    assert version["judge_heads"] == {"math": "ab" * 32} and version["model"] == MODEL
    assert version["draft"] == "tiny-draft" and version["git_commit"] == git_commit(CHECKOUT)
    assert version["version"] == importlib.metadata.version("autojudge-server")


def test_start_up_warms_the_engine_before_ready_and_keeps_it_out_of_the_metrics(target, draft, caplog):
    s = build_app(target, draft, heads=True)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=s.app), base_url="http://test") as http:
            before = await http.get("/ready")
            with caplog.at_level("INFO", logger="autojudge.server"):
                async with s.app.router.lifespan_context(s.app):
                    steps, busy = s.gate.steps, s.engine.has_unfinished()
                    ready = await http.get("/ready")
                    metrics = (await http.get("/metrics")).text
            return before, steps, busy, ready, metrics

    before, steps, busy, ready, metrics = run(scenario)
    assert before.status_code == 503 and ready.status_code == 200
    assert steps > 0 and not busy and s.engine.num_free_slots == 4
    assert sample(metrics, "autojudge_spec_decode_num_drafts_total", model_name=MODEL) == 0
    assert sample(metrics, "autojudge_engine_step_seconds_count", model_name=MODEL) == 0
    assert any("warm-up generation (profiles lossless, math) took" in r.getMessage() for r in caplog.records)
    assert sample(metrics, "autojudge_judge_evaluations_total", model_name=MODEL) == 0
    assert sample(metrics, "autojudge_judge_latency_seconds_count", model_name=MODEL) == 0  # exists, empty


def test_default_profile_can_be_chosen_by_the_operator(target, draft):
    async def scenario():
        async with served(target, draft, Settings(default_profile="math"), heads=True) as (http, _):
            r = await http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
            return r.json()

    assert run(scenario)["metrics"]["judge"]["task_profile"] == "math"


def test_unknown_default_profile_is_refused_at_start(target, draft):
    with pytest.raises(ValueError, match="default profile"):
        build_app(target, draft, Settings(default_profile="math"))


# --- errors --------------------------------------------------------------------------------------------

OK = {"prompt": PROMPT, "max_tokens": 4}
BAD_BODIES = [
    ("malformed json", b'{"prompt": "x",', None, "invalid_json"),
    ("non utf-8", b'{"prompt": "\xff\xfe"}', None, "invalid_encoding"),
    ("top-level array", b"[1, 2]", None, "invalid_type"),
    ("missing prompt", {"max_tokens": 4}, "prompt", None),
    ("empty prompt", {"prompt": ""}, "prompt", None),
    ("empty token prompt", {"prompt": []}, "prompt", None),
    ("token out of vocab", {"prompt": [1, 500]}, "prompt", None),
    ("batched prompts", {"prompt": ["a", "b"]}, "prompt", None),
    ("over-long prompt", {"prompt": "x" * MAX_MODEL_LEN}, "prompt", "context_length_exceeded"),
    ("max_tokens zero", OK | {"max_tokens": 0}, "max_tokens", None),
    ("max_tokens negative", OK | {"max_tokens": -3}, "max_tokens", None),
    ("max_tokens over context", OK | {"max_tokens": MAX_MODEL_LEN}, "max_tokens", "context_length_exceeded"),
    ("max_tokens string", OK | {"max_tokens": "4"}, "max_tokens", "invalid_type"),
    ("max_tokens float", OK | {"max_tokens": 4.5}, "max_tokens", "invalid_type"),
    ("threshold above 1", OK | {"judge_threshold": 1.5}, "judge_threshold", None),
    ("threshold below 0", OK | {"judge_threshold": -0.1}, "judge_threshold", None),
    ("threshold NaN", b'{"prompt": "x", "judge_threshold": NaN}', "judge_threshold", None),
    ("threshold string", OK | {"judge_threshold": "0.5"}, "judge_threshold", "invalid_type"),
    ("unknown profile", OK | {"task_profile": "poetry"}, "task_profile", None),
    ("window too wide", OK | {"num_speculative_tokens": 9}, "num_speculative_tokens", None),
    ("negative window", OK | {"num_speculative_tokens": -1}, "num_speculative_tokens", None),
    ("speculative not bool", OK | {"speculative": "off"}, "speculative", "invalid_type"),
    ("stream not bool", OK | {"stream": 1}, "stream", "invalid_type"),
    ("temperature too high", OK | {"temperature": 5}, "temperature", None),
    ("top_p zero", OK | {"top_p": 0}, "top_p", None),
    ("empty stop", OK | {"stop": [""]}, "stop", None),
    ("n > 1", OK | {"n": 2}, "n", "unsupported_parameter"),
    ("best_of", OK | {"best_of": 3}, "best_of", "unsupported_parameter"),
    ("logprobs", OK | {"logprobs": 2}, "logprobs", "unsupported_parameter"),
    ("logit_bias", OK | {"logit_bias": {"5": 1}}, "logit_bias", "unsupported_parameter"),
    ("min_p", OK | {"min_p": 0.1}, "min_p", "unsupported_parameter"),
    ("tools", OK | {"tools": [{"type": "function"}]}, "tools", "unsupported_parameter"),
    ("json mode", OK | {"response_format": {"type": "json_object"}}, "response_format", None),
    ("unknown spec metrics", OK | {"spec_metrics": "full"}, "spec_metrics", None),
]


@pytest.mark.parametrize(("name", "body", "param", "code"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_completion_bodies_get_an_openai_400(target, draft, name, body, param, code):
    async def scenario():
        async with served(target, draft) as (http, s):
            if isinstance(body, bytes):
                r = await http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            else:
                r = await http.post("/v1/completions", json=body)
            ok = await http.post("/v1/completions", json=OK)
            return r, ok, s.client.health().num_requests

    r, ok, open_requests = run(scenario)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert ok.status_code == 200 and open_requests == 0


BAD_CHATS = [
    ("no messages", {"messages": []}, "messages"),
    ("bad role", {"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    (
        "content not text",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages",
    ),
    (
        "max_completion_tokens zero",
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
        "max_completion_tokens",
    ),
]


@pytest.mark.parametrize(("name", "body", "param"), BAD_CHATS, ids=[b[0] for b in BAD_CHATS])
def test_bad_chat_bodies_get_an_openai_400(target, draft, name, body, param):
    async def scenario():
        async with served(target, draft) as (http, _):
            return await http.post("/v1/chat/completions", json=body)

    r = run(scenario)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_unknown_model_and_route_are_404(target, draft):
    async def scenario():
        async with served(target, draft) as (http, _):
            model = await http.post("/v1/completions", json=OK | {"model": "gpt-9"})
            route = await http.get("/v1/nothing")
            method = await http.get("/v1/completions")
            return model, route, method

    model, route, method = run(scenario)
    assert model.status_code == 404 and model.json()["error"]["code"] == "model_not_found"
    assert route.status_code == 404 and route.json()["error"]["type"] == "not_found_error"
    assert method.status_code == 405 and "error" in method.json()


def test_oversized_body_is_413(target, draft):
    async def scenario():
        async with served(target, draft, Settings(max_body_bytes=2048)) as (http, _):
            big = await http.post("/v1/completions", json={"prompt": "x" * 4096, "max_tokens": 1})

            async def chunks():
                for _ in range(4):
                    yield b'{"prompt": "' + b"x" * 1024

            streamed = await http.post("/v1/completions", content=chunks())  # no Content-Length
            return big, streamed

    big, streamed = run(scenario)
    assert big.status_code == 413 and big.json()["error"]["code"] == "too_large"
    assert streamed.status_code == 413


def test_api_key(target, draft):
    async def scenario():
        async with served(target, draft, Settings(api_key="sekret")) as (http, _):
            return (
                await http.post("/v1/completions", json=OK),
                await http.post("/v1/completions", json=OK, headers={"Authorization": "Bearer wrong"}),
                await http.post("/v1/completions", json=OK, headers={"Authorization": "Bearer sekret"}),
                await http.get("/v1/models", headers={"Authorization": "sekret"}),
                await http.get("/health"),
            )

    missing, wrong, right, no_scheme, health = run(scenario)
    for r in (missing, wrong, no_scheme):
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert right.status_code == 200 and health.status_code == 200


def test_full_queue_is_429_with_retry_after(target, draft):
    async def scenario():
        async with served(target, draft, slots=1, max_waiting=1) as (http, s):
            s.gate.hold_after(0)
            held = [
                await s.client.generate(Request(f"h{i}", (1, 2, 3), SamplingParams(max_tokens=50))) for i in range(2)
            ]
            r = await http.post("/v1/completions", json=OK)
            for h in held:
                h.close()
            return r

    r = run(scenario)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"


def test_not_accepting_is_503_but_alive(target, draft):
    async def scenario():
        async with served(target, draft) as (http, s):
            s.client.stop_accepting()
            return await http.post("/v1/completions", json=OK), await http.get("/ready"), await http.get("/health")

    work, ready, health = run(scenario)
    assert work.status_code == 503 and work.json()["error"]["type"] == "overloaded_error"
    assert ready.status_code == 503 and health.status_code == 200


def test_engine_fault_fails_requests_cleanly_and_the_server_stays_up(target, draft, monkeypatch):
    async def scenario():
        async with served(target, draft) as (http, s):
            real_step, calls = s.engine.step, []

            def failing_step(arrived=None):
                calls.append(1)
                if len(calls) == 3:
                    raise RuntimeError("kernel fault")
                return real_step(arrived)

            monkeypatch.setattr(s.engine, "step", failing_step)
            body = {"prompt": PROMPT, "max_tokens": 100, "stream": True}
            streamed = await http.post("/v1/completions", json=body)
            plain = await http.post("/v1/completions", json=OK)
            return streamed, plain, await http.get("/health"), await http.get("/metrics")

    streamed, plain, health, metrics = run(scenario)
    for gauge in ("autojudge_num_requests_running", "autojudge_batch_size", "autojudge_kv_cache_usage_perc"):
        assert sample(metrics.text, gauge, model_name=MODEL) == 0  # the failed step's rows are not load
    events = sse_events(streamed.text)
    assert streamed.status_code == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "overloaded_error" and "kernel fault" in events[-2]["error"]["message"]
    assert plain.status_code == 503 and plain.json()["error"]["type"] == "overloaded_error"
    assert health.status_code == 503 and metrics.status_code == 200
    labels = {"model_name": MODEL, "task_profile": "lossless"}
    assert sample(metrics.text, "autojudge_request_success_total", finished_reason="error", **labels) == 1


def test_a_request_whose_numerics_fail_is_a_500_for_it_alone(target, draft):
    nan_token = 5  # "$": `overflowing` makes its embedding NaN; PROMPT does not hold it
    broken = {"prompt": [8, nan_token, 9], "max_tokens": 20}

    async def scenario():
        async with served(overflowing(target, nan_token), draft) as (http, _):
            plain, streamed, fine = await asyncio.gather(
                http.post("/v1/completions", json=broken),
                http.post("/v1/completions", json={**broken, "stream": True}),
                http.post("/v1/completions", json=OK),
            )
            return plain, streamed, fine, await http.get("/health"), await http.get("/metrics")

    plain, streamed, fine, health, metrics = run(scenario)
    assert plain.status_code == 500 and plain.json()["error"]["code"] == "request_failed"
    assert "not finite" in plain.json()["error"]["message"]
    events = sse_events(streamed.text)
    assert streamed.status_code == 200 and events[-1] == "[DONE]" and events[-2]["error"]["code"] == "request_failed"
    assert fine.status_code == 200 and health.status_code == 200
    labels = {"model_name": MODEL, "task_profile": "lossless"}
    assert sample(metrics.text, "autojudge_request_success_total", finished_reason="error", **labels) == 2
    assert sample(metrics.text, "autojudge_request_success_total", finished_reason="length", **labels) == 1


def test_request_timeout_aborts_and_frees_the_slot(target, draft):
    async def scenario():
        async with served(target, draft, Settings(request_timeout=0.05)) as (http, s):
            s.gate.hold_after(1)
            plain = await http.post("/v1/completions", json=OK | {"max_tokens": 100})
            open_requests = s.client.health().num_requests
            s.gate.release()
            await async_wait_for(lambda: not s.engine.has_unfinished())
            return plain, open_requests, s.engine.num_free_slots

    plain, open_requests, free = run(scenario)
    assert plain.status_code == 504 and plain.json()["error"]["type"] == "timeout_error"
    assert open_requests == 0 and free == 4


def test_request_id_is_echoed(target, draft):
    async def scenario():
        async with served(target, draft) as (http, _):
            return await http.post("/v1/completions", json=OK, headers={"X-Request-Id": "abc-1"})

    assert run(scenario).headers["x-request-id"] == "abc-1"


# --- metrics -------------------------------------------------------------------------------------------


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                return float(value)
    return 0.0


def test_metrics_move_as_a_request_runs_and_reconcile(target, draft):
    async def scenario():
        async with served(target, draft) as (http, s):
            s.gate.hold_after(2)
            body = {"prompt": PROMPT, "max_tokens": 60, "temperature": 0}
            task = asyncio.create_task(http.post("/v1/completions", json=body))
            await async_wait_for(lambda: s.gate.steps > 2)
            during = (await http.get("/metrics")).text
            s.gate.release()
            response = (await task).json()
            return during, (await http.get("/metrics")).text, response

    during, after, response = run(scenario)
    model = {"model_name": MODEL}
    assert sample(during, "autojudge_num_requests_running", **model) == 1
    assert sample(during, "autojudge_spec_decode_num_drafts_total", **model) > 0
    assert sample(during, "autojudge_request_success_total", **model) == 0
    assert sample(after, "autojudge_num_requests_running", **model) == 0
    labels = {"model_name": MODEL, "task_profile": "lossless"}
    assert sample(after, "autojudge_request_success_total", finished_reason="length", **labels) == 1
    sd = response["metrics"]["speculative_decoding"]
    assert sample(after, "autojudge_spec_decode_num_drafts_total", **labels) == sd["num_spec_steps"]
    assert sample(after, "autojudge_spec_decode_num_draft_tokens_total", **labels) == sd["num_draft_tokens"]
    assert sample(after, "autojudge_spec_decode_num_accepted_tokens_total", **labels) == sd["num_accepted_draft_tokens"]
    assert sample(after, "autojudge_generation_tokens_total", **labels) == 60
    assert sample(after, "autojudge_prompt_tokens_total", **labels) == len(PROMPT)
    assert sample(after, "autojudge_time_to_first_token_seconds_count", **labels) == 1
    assert sample(after, "autojudge_e2e_request_latency_seconds_count", **labels) == 1
    assert sample(after, "autojudge_request_queue_time_seconds_count", **labels) == 1
    per_pos = sum(
        sample(after, "autojudge_spec_decode_num_accepted_tokens_per_pos_total", position=str(i), **labels)
        for i in range(8)
    )
    assert per_pos == sd["num_accepted_draft_tokens"]
    http_ok = sample(after, "http_requests_total", handler="/v1/completions", method="POST", status="200")
    assert http_ok == 1
    assert sample(after, "autojudge_engine_step_seconds_count", **model) > 0
    for phase in ("prefill", "draft", "verify"):
        assert sample(after, "autojudge_engine_phase_seconds_total", phase=phase, **model) > 0
    assert f'autojudge_engine_phase_seconds_total{{model_name="{MODEL}",phase="judge"}}' in after


def test_metric_labels_stay_bounded(target, draft):
    async def scenario():
        async with served(target, draft, heads=True) as (http, _):
            for tau in (0.1, 0.2, 0.7):
                body = OK | {"judge_threshold": tau, "task_profile": "math"}
                await http.post("/v1/completions", json=body, headers={"X-Request-Id": f"id-{tau}"})
            await http.get("/no/such/route/123")
            return (await http.get("/metrics")).text

    text = run(scenario)
    assert "0.7" not in "".join(line for line in text.splitlines() if not line.startswith("#") and "le=" not in line)
    assert "id-0." not in text and "/no/such" not in text
    assert 'handler="other"' in text
    assert sample(text, "autojudge_judge_head_info", task_profile="math", head_sha256="ab" * 32) == 1
    assert not math.isnan(sample(text, "autojudge_kv_cache_usage_perc", model_name=MODEL))


def test_auto_windows_are_reported_per_response_in_metrics_and_version(target, draft):
    from test_autowindow_engine import DRAFTS_PAY

    async def scenario():
        async with served(target, draft, step_cost=DRAFTS_PAY) as (http, _):
            body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0}
            response = (await http.post("/v1/completions", json=body)).json()
            capped = (await http.post("/v1/completions", json=body | {"num_speculative_tokens": 2})).json()
            return response, capped, (await http.get("/metrics")).text, (await http.get("/version")).json()

    response, capped, text, version = run(scenario)
    assert response["choices"][0]["text"] == reference_text(target, draft, TOKENIZER.encode(PROMPT), 40)
    sd = response["metrics"]["speculative_decoding"]
    assert sd["window"] == "auto" and len(sd["window_histogram"]) == 9
    assert sum(sd["window_histogram"][1:]) == sd["num_spec_steps"] > 0 and sd["window_histogram"][0] >= 1
    assert len(capped["metrics"]["speculative_decoding"]["window_histogram"]) == 3  # the cap of that request
    labels = {"model_name": MODEL, "task_profile": "lossless"}
    steps = sum(sd["window_histogram"]) + sum(capped["metrics"]["speculative_decoding"]["window_histogram"])
    assert sample(text, "autojudge_spec_decode_window_count", **labels) == steps
    assert sample(text, "autojudge_engine_steps_without_draft_total", model_name=MODEL) >= 2  # the admitting steps
    assert sample(text, "autojudge_step_cost_predicted_seconds_total", model_name=MODEL) > 0
    assert sample(text, "autojudge_step_cost_error_ratio_count", model_name=MODEL) == steps
    spec = version["speculation"]
    assert spec["window"] == "auto" and spec["step_cost"] == DRAFTS_PAY.to_dict()


def test_a_request_may_ask_for_a_fixed_window_on_an_auto_server_and_not_auto_on_a_fixed_one(target, draft):
    from test_autowindow_engine import NEVER_PAYS

    body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "num_speculative_tokens": 3}

    async def scenario(step_cost, window):
        async with served(target, draft, step_cost=step_cost) as (http, _):
            return await http.post("/v1/completions", json=body | {"speculative_window": window})

    fixed = run(lambda: scenario(NEVER_PAYS, "fixed")).json()  # the planner alone would never draft here
    sd = fixed["metrics"]["speculative_decoding"]
    assert sd["window"] == "fixed" and sd["window_histogram"][1:3] == [0, 0] and sd["window_histogram"][3] > 0
    assert fixed["choices"][0]["text"] == reference_text(target, draft, TOKENIZER.encode(PROMPT), 30)
    refused = run(lambda: scenario(None, "auto"))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "speculative_window"
    bad = run(lambda: scenario(None, "sometimes"))
    assert bad.status_code == 400


def test_load_gauges_fall_to_zero_when_the_last_request_is_aborted_with_no_step_after(target, draft):
    async def scenario():
        async with served(target, draft) as (http, s):
            s.gate.hold_after(2)  # the engine thread waits inside its third step
            request = Request("gone", tuple(TOKENIZER.encode(PROMPT)), SamplingParams(max_tokens=100), SpecParams())
            stream = await s.client.generate(request)
            await async_wait_for(lambda: s.gate.steps > 2)
            during = (await http.get("/metrics")).text
            stream.close()  # the client went away: the abort waits in the inbox until this step ends
            s.gate.release()
            await async_wait_for(lambda: s.engine.load.num_running == 0)
            after = (await http.get("/metrics")).text
            return during, after, s.gate.steps

    during, after, steps = run(scenario)
    model = {"model_name": MODEL}
    assert sample(during, "autojudge_num_requests_running", **model) == 1
    assert sample(during, "autojudge_batch_size", **model) == 1
    assert sample(during, "autojudge_kv_cache_usage_perc", **model) > 0
    assert steps == 3  # the inbox is read before a step: none ran after the abort
    for gauge in ("autojudge_num_requests_running", "autojudge_num_requests_waiting", "autojudge_batch_size"):
        assert sample(after, gauge, **model) == 0
    assert sample(after, "autojudge_kv_cache_usage_perc", **model) == 0.0


def test_vllm_names_alias_the_load_and_token_series_for_routers(target, draft):
    async def scenario():
        async with served(target, draft, heads=True, vllm_names=True) as (http, s):
            before = (await http.get("/metrics")).text
            s.gate.hold_after(2)
            held = asyncio.create_task(http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 60}))
            await async_wait_for(lambda: s.gate.steps > 2)
            during = (await http.get("/metrics")).text
            s.gate.release()
            await held
            await http.post("/v1/completions", json=OK | {"task_profile": "math"})
            await http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})  # its slot kept it
            return before, during, (await http.get("/metrics")).text

    before, during, after = run(scenario)
    model = {"model_name": MODEL}
    assert sample(before, "vllm:prompt_tokens_total", **model) == 0 and "vllm:prompt_tokens_total" in before
    assert sample(during, "vllm:num_requests_running", **model) == 1
    assert sample(during, "vllm:kv_cache_usage_perc", **model) == sample(
        during, "autojudge_kv_cache_usage_perc", **model
    )
    assert sample(during, "vllm:gpu_cache_usage_perc", **model) > 0
    assert sample(after, "vllm:num_requests_running", **model) == 0
    for ours, theirs in (("autojudge_prompt_tokens_total", "vllm:prompt_tokens_total"),
                         ("autojudge_generation_tokens_total", "vllm:generation_tokens_total")):  # fmt: skip
        per_profile = [sample(after, ours, task_profile=p, **model) for p in ("lossless", "math")]
        assert all(per_profile) and sample(after, theirs, **model) == sum(per_profile)
    assert sample(after, "vllm:request_success_total", finished_reason="length", **model) == 3
    queries, hits = (sample(after, f"vllm:prefix_cache_{kind}_total", **model) for kind in ("queries", "hits"))
    assert queries == sample(after, "autojudge_prefix_cache_queries_total", **model)
    assert queries == sample(after, "vllm:prompt_tokens_total", **model)
    assert hits == sample(after, "autojudge_prefix_cache_hits_total", **model) > 0


def test_vllm_names_are_off_by_default(target, draft):
    async def scenario():
        async with served(target, draft) as (http, _):
            return (await http.get("/metrics")).text

    assert "vllm:" not in run(scenario)
