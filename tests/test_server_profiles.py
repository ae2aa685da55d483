"""Task profiles from a startup file: parsing (TOML, JSON, refusals), loading and checking the heads (sha256,
threshold_index, pair), the built-in defaults, and the effective τ and W in the profiles route and `metrics.judge`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import httpx
import pytest

from engine import AsyncEngine, CacheConfig, Engine, EngineConfig, ProfileSpec, SchedulerConfig, SpecConfig
from engine.build import default_profiles, engine_info, load_profiles
from engine.model.fingerprint import pair_fingerprint
from judge.io import load_head, save_head
from server.app import create_app
from server.settings import Settings, read_profiles_file
from test_client import MAX_MODEL_LEN, one_torch_thread  # noqa: F401 (an autouse fixture)
from test_server_api import PROMPT, TOKENIZER, math_head

TOKENIZER_SHA = "0" * 64


@pytest.fixture
def head_dir(tmp_path, target, draft) -> Path:
    """A saved head fitted (by its fingerprint) for the tiny pair."""
    head = dataclasses.replace(math_head(), meta={"pair": pair_fingerprint(target, draft, TOKENIZER_SHA)})
    save_head(head, tmp_path / "heads" / "math")
    return tmp_path / "heads" / "math"


def sha_of(directory: Path) -> str:
    return json.loads((directory / "head.json").read_text())["tensors_sha256"]


def load(specs, target, draft):
    return load_profiles(specs, pair_fingerprint(target, draft, TOKENIZER_SHA), "cpu")


# --- the file ------------------------------------------------------------------------------------------


def test_toml_and_json_profiles_files(tmp_path):
    toml = tmp_path / "profiles.toml"
    toml.write_text(
        '[[profiles]]\nname = "lossless"\nnum_speculative_tokens = 6\n\n'
        '[[profiles]]\nname = "math"\njudge_head = "heads/math"\nsha256 = "' + "ab" * 32 + '"\n'
        'threshold_index = 13\nnum_speculative_tokens = 3\ndescription = "GSM8K, mid-curve"\n'
    )
    lossless, math = read_profiles_file(toml)
    assert lossless == ProfileSpec("lossless", num_speculative_tokens=6)
    assert math.judge_head == tmp_path / "heads" / "math"  # relative to the file
    assert (math.sha256, math.threshold_index, math.num_speculative_tokens) == ("ab" * 32, 13, 3)
    assert math.description == "GSM8K, mid-curve"

    path = tmp_path / "profiles.json"
    path.write_text(json.dumps({"profiles": [{"name": "code", "judge_head": "/abs/code", "judge_threshold": 1}]}))
    (code,) = read_profiles_file(path)
    assert code.judge_head == Path("/abs/code") and code.judge_threshold == 1.0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"profile": []}, "one non-empty `profiles` list"),
        ({"profiles": []}, "one non-empty `profiles` list"),
        ({"profiles": [{"judge_head": "h"}]}, "with a name"),
        ({"profiles": [{"name": "m", "judge_head": "h", "tau": 0.1}]}, "unknown keys tau"),
        ({"profiles": [{"name": "m", "judge_head": "h", "threshold_index": 2.0}]}, "threshold_index must be int"),
        ({"profiles": [{"name": "m", "judge_head": "h", "judge_threshold": True}]}, "judge_threshold must be float"),
        ({"profiles": [{"name": "m", "judge_head": "h", "judge_threshold": 0.1, "threshold_index": 1}]}, "not both"),
        ({"profiles": [{"name": "m", "judge_head": "h", "judge_threshold": 1.5}]}, r"in \[0, 1\]"),
        ({"profiles": [{"name": "m"}]}, "only 'lossless' has no judge_head"),
        ({"profiles": [{"name": "lossless", "judge_head": "h"}]}, "only 'lossless' has no judge_head"),
        ({"profiles": [{"name": "lossless", "judge_threshold": 0.2}]}, "τ = 0"),
        ({"profiles": [{"name": "lossless", "sha256": "ab" * 32}]}, "there is none"),
        ({"profiles": [{"name": "a b", "judge_head": "h"}]}, "profile name"),
        ({"profiles": [{"name": "m", "judge_head": "h", "sha256": "xyz"}]}, "64 lowercase hex"),
    ],
)
def test_bad_profiles_files_are_refused(tmp_path, content, message):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        read_profiles_file(path)


def test_profiles_file_is_a_setting(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"profiles": [{"name": "m", "judge_head": "h"}]}))
    assert Settings(profiles=str(path)).model_source().profiles == (ProfileSpec("m", tmp_path / "h"),)
    assert Settings().model_source().profiles is None
    with pytest.raises(FileNotFoundError, match="profiles file"):
        Settings(profiles=str(tmp_path / "missing.toml")).model_source()


# --- loading the heads ---------------------------------------------------------------------------------


def test_profiles_resolve_tau_from_the_head(head_dir, target, draft):
    head = load_head(head_dir)
    specs = [
        ProfileSpec("math", head_dir, sha256=sha_of(head_dir), num_speculative_tokens=3, description="d"),
        ProfileSpec("math-q20", head_dir, threshold_index=20),
        ProfileSpec("math-fixed", head_dir, judge_threshold=0.05),
    ]
    judge, infos = load(specs, target, draft)
    assert [p.name for p in infos] == ["lossless", "math", "math-q20", "math-fixed"]  # lossless is always served
    by_name = {p.name: p for p in infos}
    assert by_name["math"].judge_threshold == head.default_threshold
    assert by_name["math"].num_speculative_tokens == 3 and by_name["math"].description == "d"
    assert by_name["math-q20"].judge_threshold == float(head.thresholds[20])
    assert by_name["math-fixed"].judge_threshold == 0.05
    assert by_name["math"].head_sha256 == sha_of(head_dir) and by_name["lossless"].head_sha256 is None
    assert set(judge.heads) == {"math", "math-q20", "math-fixed"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (dict(sha256="cd" * 32), "the head's sha256 is [0-9a-f]{64}, the profile expects cdcd"),
        (dict(threshold_index=26), "threshold_index must be < 26"),
    ],
)
def test_head_checks_fail_at_start_up(head_dir, target, draft, spec, message):
    with pytest.raises(ValueError, match=message):
        load([ProfileSpec("math", head_dir, **spec)], target, draft)


def test_duplicates_a_missing_head_and_no_draft_are_refused(head_dir, target, draft, tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        load([ProfileSpec("math", head_dir), ProfileSpec("math", head_dir)], target, draft)
    with pytest.raises(FileNotFoundError):
        load([ProfileSpec("math", tmp_path / "nothing")], target, draft)
    with pytest.raises(ValueError, match="no draft model is loaded"):
        load_profiles([ProfileSpec("math", head_dir)], None, "cpu")


def test_built_in_defaults_are_lossless_plus_one_per_head(head_dir):
    heads = str(head_dir.parent)
    assert [p.name for p in default_profiles(heads, "smollm2", False, True)] == ["lossless", "math"]
    assert [p.name for p in default_profiles(heads, "smollm2", False, False)] == ["lossless"]
    assert [p.name for p in default_profiles("none", "smollm2", False, True)] == ["lossless"]
    assert [p.name for p in default_profiles("shipped", "smollm2", True, True)] == ["lossless"]


# --- served --------------------------------------------------------------------------------------------


def test_effective_profile_values_are_served_and_echoed(head_dir, target, draft):
    specs = [
        ProfileSpec("lossless", num_speculative_tokens=2),
        ProfileSpec("math", head_dir, threshold_index=25, num_speculative_tokens=3, description="all in"),
    ]
    judge, infos = load(specs, target, draft)
    config = EngineConfig(
        cache=CacheConfig(max_slots=2, max_model_len=MAX_MODEL_LEN),
        spec=SpecConfig(max_speculative_tokens=8, default_speculative_tokens=4),
        scheduler=SchedulerConfig(max_waiting=4),
    )
    engine = Engine(config, target, draft, judge=judge, detokenize=TOKENIZER.decode)
    client = AsyncEngine(engine, engine_info(engine, "tiny", "tiny-draft", infos))
    app = create_app(client, Settings(default_profile="math"), TOKENIZER)

    async def scenario():
        await client.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
                body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
                default = (await http.post("/v1/completions", json=body)).json()
                lossless = (await http.post("/v1/completions", json=body | {"task_profile": "lossless"})).json()
                explicit = (await http.post("/v1/completions", json=body | {"num_speculative_tokens": 5})).json()
                return default, lossless, explicit, (await http.get("/v1/profiles")).json()
        finally:
            await client.shutdown(5)

    default, lossless, explicit, listing = asyncio.run(scenario())
    judge_block = default["metrics"]["judge"]
    tau = float(load_head(head_dir).thresholds[25])
    assert judge_block["task_profile"] == "math" and judge_block["judge_threshold"] == tau
    assert judge_block["num_speculative_tokens"] == 3 and judge_block["judge_head_sha256"] == sha_of(head_dir)
    assert lossless["metrics"]["judge"]["num_speculative_tokens"] == 2
    assert lossless["metrics"]["judge"]["judge_threshold"] == 0.0
    assert explicit["metrics"]["judge"]["num_speculative_tokens"] == 5  # explicit > profile > server
    rows = {p["name"]: p for p in listing["data"]}
    assert listing["default"] == "math" and rows["math"]["default"]
    assert rows["math"]["num_speculative_tokens"] == 3 and rows["math"]["judge_threshold"] == tau
    assert rows["math"]["description"] == "all in" and rows["lossless"]["num_speculative_tokens"] == 2


def test_a_profile_window_over_the_limit_is_refused_at_start(head_dir, target, draft):
    _, infos = load([ProfileSpec("math", head_dir, num_speculative_tokens=9)], target, draft)
    config = EngineConfig(cache=CacheConfig(max_slots=1, max_model_len=MAX_MODEL_LEN))
    engine = Engine(config, target, draft)
    client = AsyncEngine(engine, engine_info(engine, "tiny", "tiny-draft", infos))
    with pytest.raises(ValueError, match="num_speculative_tokens 9 exceeds max_speculative_tokens 8"):
        create_app(client, Settings(), TOKENIZER)
