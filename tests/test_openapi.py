"""The published contract: `/openapi.json` documents every route with the models that validate its bodies, and
every kind of response the server sends matches its documented model (which forbid undocumented fields)."""

from __future__ import annotations

from typing import Any

from conftest import VOCAB
from server import openapi
from server.schemas import ChatCompletionRequest, CompletionRequest
from server.settings import Settings
from test_server_api import OK, PROMPT, run, served, sse_events

EXTENSIONS = ("task_profile", "judge_threshold", "num_speculative_tokens", "speculative_window", "spec_metrics")
GENERATION = ("/v1/completions", "/v1/chat/completions")
CHAT = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6}


def document(target, draft, settings: Settings | None = None) -> tuple[dict[str, Any], int]:
    async def scenario():
        async with served(target, draft, settings, heads=True) as (http, _):
            return (await http.get("/openapi.json")).json(), (await http.get("/docs")).status_code

    return run(scenario)


def test_every_route_is_documented_with_the_models_that_validate_it(target, draft):
    doc, docs_status = document(target, draft)
    assert docs_status == 200
    paths = doc["paths"]
    assert set(paths) == {"/health", "/ready", "/metrics", "/version", "/v1/models", "/v1/profiles", *GENERATION}
    schemas = doc["components"]["schemas"]
    for path, model in zip(GENERATION, (CompletionRequest, ChatCompletionRequest), strict=True):
        op = paths[path]["post"]
        body = op["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model.__name__}"}
        own = model.model_json_schema(ref_template=openapi.REF)["properties"]
        openapi.branch(own["num_speculative_tokens"], "integer")["maximum"] = 8  # this server's limits
        if "prompt" in own:
            openapi.branch(own["prompt"], "array")["items"]["maximum"] = VOCAB - 1
        assert schemas[model.__name__]["properties"] == own  # one source of truth, with this server's limit
        assert set(op["responses"]) == {"200", "400", "404", "413", "429", "500", "503", "504"}  # no key: no 401
        assert set(op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
        for status in ("400", "429", "503"):
            error = op["responses"][status]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    fields = schemas["CompletionRequest"]["properties"]
    for name in EXTENSIONS:
        assert fields[name]["description"], name
    threshold = next(s for s in fields["judge_threshold"]["anyOf"] if s.get("type") == "number")
    assert (threshold["minimum"], threshold["maximum"]) == (0.0, 1.0)
    window = openapi.branch(fields["num_speculative_tokens"], "integer")
    assert (window["minimum"], window["maximum"]) == (0, 8)  # this server's max_speculative_tokens
    for name in ("Completion", "CompletionChunk", "ChatCompletionChunk", "Version", "ProfileList", "ErrorResponse"):
        assert schemas[name]["additionalProperties"] is False, name  # an undocumented field is a contract error
    assert "securitySchemes" not in doc["components"]


def test_an_api_key_is_documented_and_the_interactive_docs_can_be_turned_off(target, draft):
    doc, docs_status = document(target, draft, Settings(api_key="s3cret", docs=False))
    assert docs_status == 404
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    for path in ("/v1/models", "/v1/profiles", *GENERATION):
        op = next(iter(doc["paths"][path].values()))
        assert op["security"] == [{"bearer": []}] and "401" in op["responses"]
    assert "security" not in doc["paths"]["/health"]["get"]


def responses(target, draft) -> list[tuple[type, Any]]:
    """(documented model, body) for every kind of response: JSON, SSE chunks, errors, the info routes."""

    async def scenario():
        got: list[tuple[type, Any]] = []
        async with served(target, draft, heads=True) as (http, _):
            for extra in ({}, {"spec_metrics": "detailed"}, {"spec_metrics": "none"}, {"speculative": False},
                          {"task_profile": "math", "judge_threshold": 0.9}, {"stop": "e"}):  # fmt: skip
                got.append((openapi.Completion, (await http.post(GENERATION[0], json=OK | extra)).json()))
                got.append((openapi.ChatCompletion, (await http.post(GENERATION[1], json=CHAT | extra)).json()))
            for options in (None, {"include_usage": True}, {"include_usage": True, "continuous_usage_stats": True}):
                stream = {"stream": True} | ({"stream_options": options} if options else {})
                for path, body, chunk in ((GENERATION[0], OK, openapi.CompletionChunk),
                                          (GENERATION[1], CHAT, openapi.ChatCompletionChunk)):  # fmt: skip
                    events = sse_events((await http.post(path, json=body | stream)).text)
                    assert events[-1] == "[DONE]"
                    got += [(chunk, e) for e in events[:-1]]
            for bad in (OK | {"max_tokens": 0}, OK | {"model": "other"}, OK | {"n": 3}):
                got.append((openapi.ErrorResponse, (await http.post(GENERATION[0], json=bad)).json()))
            got.append((openapi.ErrorResponse, (await http.get("/nowhere")).json()))
            for path, model in (("/version", openapi.Version), ("/ready", openapi.Ready),
                                ("/v1/models", openapi.ModelList), ("/v1/profiles", openapi.ProfileList)):  # fmt: skip
                got.append((model, (await http.get(path)).json()))
        return got

    return run(scenario)


def test_every_kind_of_response_matches_its_documented_model(target, draft):
    got = responses(target, draft)
    for model, body in got:
        model.model_validate(body)  # raises on a missing, mistyped or undocumented field
    kinds = {model for model, _ in got}
    assert {openapi.Completion, openapi.ChatCompletion, openapi.CompletionChunk, openapi.ErrorResponse} <= kinds
    metrics = [b.get("metrics") for m, b in got if m is openapi.Completion]
    assert None in metrics and any(m and m["speculative_decoding"] is None for m in metrics)
    assert any(m and m["speculative_decoding"] and "per_step_accepted" in m["speculative_decoding"] for m in metrics)


def test_an_integral_number_is_an_integer_as_in_json_schema(target, draft):
    async def scenario():
        async with served(target, draft) as (http, _):
            return await http.post(GENERATION[0], json=OK | {"max_tokens": 4.0, "seed": 3.0, "temperature": 1})

    r = run(scenario)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
