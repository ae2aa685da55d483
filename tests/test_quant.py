"""Int8 draft: `Int8Linear` accuracy and row independence, and `quantize_int8` on a tiny Decoder."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from engine.config import ModelConfig
from engine.model.decoder import Decoder, fuse_projections
from engine.model.protocol import ForwardBatch
from engine.model.quant import Int8Linear, quantize_int8

CPU = torch.device("cpu")


def _tiny_decoder(seed: int = 0, tied: bool = True) -> Decoder:
    config = ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    return Decoder(config).eval()


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


def test_int8_linear_close_to_fp32() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    x = torch.randn(2, 5, 96)  # [B, Q, K]: leading dims are flattened and restored
    with torch.no_grad():
        y = Int8Linear(linear)(x)
        ref = linear(x)
    assert y.shape == (2, 5, 40) and y.dtype == torch.float32
    assert _rel_err(y, ref) < 0.025


def test_rows_do_not_depend_on_the_batch() -> None:
    torch.manual_seed(1)
    q = Int8Linear(nn.Linear(64, 48))
    x = torch.randn(9, 64)  # [M, K]
    x[3] *= 100.0  # an outlier row would coarsen every other row under a per-tensor scale
    with torch.no_grad():
        batched = q(x)
        for i in range(x.shape[0]):
            assert torch.equal(q(x[i : i + 1])[0], batched[i])


def test_fewer_activation_bits_are_coarser() -> None:
    torch.manual_seed(2)
    linear = nn.Linear(64, 32)
    x = torch.randn(6, 64)
    with torch.no_grad():
        ref = linear(x)
        errors = [_rel_err(Int8Linear(linear, act_bits=b)(x), ref) for b in (8, 6, 4)]
    assert errors == sorted(errors) and errors[-1] > 4 * errors[0]


def test_rejects_rows_the_kernel_cannot_read() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        Int8Linear(nn.Linear(12, 16))


def test_quantize_leaves_the_original_untouched() -> None:
    model = _tiny_decoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    draft = quantize_int8(model)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(type(m) is not Int8Linear for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sum(type(m) is Int8Linear for m in draft.modules()) == 2 * 4 + 1  # per layer: qkv, o, gate_up, down
    assert not any(type(m) is nn.Linear for m in draft.modules())


def test_tied_lm_head_is_untied_and_embedding_stays_fp32() -> None:
    model = _tiny_decoder()
    draft = quantize_int8(model)
    assert isinstance(draft.lm_head, Int8Linear)
    assert not draft.config.tie_word_embeddings
    embed = draft.model.embed_tokens.weight
    assert embed.dtype == torch.float32 and embed.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(embed, model.model.embed_tokens.weight)
    draft.tie_weights()  # untied config: must not re-share the embedding with the int8 head
    assert isinstance(draft.lm_head, Int8Linear)


def test_lm_head_can_stay_fp32() -> None:
    draft = quantize_int8(_tiny_decoder(), include_lm_head=False)
    assert type(draft.lm_head) is nn.Linear
    assert draft.lm_head.weight is draft.model.embed_tokens.weight
    assert draft.config.tie_word_embeddings


@pytest.mark.parametrize("include_lm_head", [True, False])
def test_quantized_decoder_runs_with_cache(include_lm_head: bool) -> None:
    model = _tiny_decoder(seed=3)
    draft = quantize_int8(model, include_lm_head=include_lm_head)
    rows = [[5, 17, 42, 8, 91], [3, 60, 7]]
    with torch.no_grad():
        cache = draft.new_cache(max_slots=4, max_len=32)
        hidden = draft(ForwardBatch.build(rows, [0, 0], [2, 0], CPU), cache)  # [B, Q, D]
        step = draft(ForwardBatch.build([[11], [12]], [5, 3], [2, 0], CPU), cache)  # [B, 1, D]
        logits = draft.compute_logits(step[:, -1])  # [B, V]
        # Decoding over the cache must match one uncached forward over the whole row.
        full = draft(ForwardBatch.build([rows[0] + [11]], [0], [0], CPU), None)
        ref = model.compute_logits(model(ForwardBatch.build([rows[0] + [11]], [0], [0], CPU), None)[:, -1])
    assert hidden.shape == (2, 5, 32) and logits.shape == (2, 97)
    assert torch.isfinite(logits).all()
    assert torch.allclose(step[0, -1], full[0, -1], atol=1e-4)
    assert _rel_err(logits[:1], ref) < 0.1


def _biased_decoder(seed: int) -> Decoder:
    """Qwen2-style: q/k/v and MLP biases, so the fused layers must carry biases too."""
    config = dataclasses.replace(_tiny_decoder().config, qkv_bias=True, mlp_bias=True)
    torch.manual_seed(seed)
    model = Decoder(config).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_()
    return model


def test_fused_projections_compute_what_the_separate_layers_do() -> None:
    model = _biased_decoder(seed=4)
    fused = copy.deepcopy(model)
    fuse_projections(fused)
    assert not hasattr(fused.model.layers[0].self_attn, "q_proj")
    batch = ForwardBatch.build([[5, 17, 42, 8, 91], [3, 60, 7]], [0, 0], [0, 1], CPU)
    with torch.no_grad():
        torch.testing.assert_close(fused(batch, None), model(batch, None), atol=1e-6, rtol=0)


def test_the_int8_draft_fuses_bit_for_bit() -> None:
    """Per-output-channel scales: the fused int8 product equals quantizing each Linear on its own."""
    model = _biased_decoder(seed=5)
    draft = quantize_int8(model)
    x = torch.randn(6, 32)
    for layer, source in zip(draft.model.layers, model.model.layers, strict=True):
        attn, mlp = source.self_attn, source.mlp
        with torch.no_grad():
            qkv = torch.cat([Int8Linear(m)(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)], dim=-1)
            gate_up = torch.cat([Int8Linear(m)(x) for m in (mlp.gate_proj, mlp.up_proj)], dim=-1)
            assert torch.equal(layer.self_attn.qkv_proj(x), qkv)
            assert torch.equal(layer.mlp.gate_up_proj(x), gate_up)
