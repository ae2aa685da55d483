"""Shared fixtures: tiny seeded random decoders (target, a perturbed draft that disagrees often) and a driver."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from engine import CacheConfig, Engine, EngineConfig, ModelConfig, Request, SpecConfig
from engine.model.decoder import Decoder

VOCAB = 97


def tiny_config(layers: int = 2, arch: str = "LlamaForCausalLM") -> ModelConfig:
    return ModelConfig(
        architecture=arch,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )


def tiny_decoder(seed: int, layers: int = 2) -> Decoder:
    """Random weights with a wide init so greedy outputs vary instead of looping on one token."""
    torch.manual_seed(seed)
    model = Decoder(tiny_config(layers)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


def perturbed(model: Decoder, scale: float, seed: int) -> Decoder:
    """A draft that agrees with `model` on part of the positions: its weights plus relative noise."""
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.abs().mean())
    return draft


def overflowing(model: Decoder, token: int) -> Decoder:
    """A copy whose input embedding of `token` is NaN (as an fp16 overflow leaves it), the output head untied and
    finite: only a sequence holding `token` gets non-finite logits."""
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.lm_head.weight = torch.nn.Parameter(broken.lm_head.weight.detach().clone())
        broken.model.embed_tokens.weight[token] = float("nan")
    return broken


@pytest.fixture(scope="session")
def target() -> Decoder:
    return tiny_decoder(0)


@pytest.fixture(scope="session")
def draft(target: Decoder) -> Decoder:
    return perturbed(target, 0.02, seed=1)  # about 55% greedy agreement


def make_engine(target: Decoder, draft: Decoder | None, slots: int = 8, **kwargs: object) -> Engine:
    spec = SpecConfig(
        max_speculative_tokens=8,
        default_speculative_tokens=4,
        bonus_token=bool(kwargs.pop("bonus", True)),
        draft_shares_kv=bool(kwargs.pop("shares_kv", False)),
    )
    reuse = bool(kwargs.pop("reuse_prefix", True))
    config = EngineConfig(cache=CacheConfig(max_slots=slots, max_model_len=160, reuse_prefix=reuse), spec=spec)
    return Engine(config, target, draft, **kwargs)  # type: ignore[arg-type]


def run_all(
    engine: Engine,
    requests: list[Request],
    join_at: dict[int, list[Request]] | None = None,
    arrived: Callable[[], bool] | None = None,
):
    """Drive the engine to completion; `join_at[step]` requests are added before that step; `arrived` is passed
    to every step."""
    for r in requests:
        engine.add_request(r)
    tokens: dict[str, list[int]] = {}
    finals = {}
    step = 0
    while engine.has_unfinished() or (join_at and any(k >= step for k in join_at)):
        for r in (join_at or {}).get(step, []):
            engine.add_request(r)
        for out in engine.step(arrived):
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finals[out.request_id] = out
        step += 1
        assert step < 10_000
    return tokens, finals
