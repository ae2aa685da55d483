"""What identifies a draft/target pair for a judge head: shapes, quantization and the tokenizer's hash.

A head reads hidden states of these exact models, so loading it against another pair must fail (judge/io.py).
"""

from __future__ import annotations

from typing import Any

import torch

from engine.model.decoder import Decoder
from engine.model.quant import Int8Linear


def describe_model(model: Decoder) -> dict[str, Any]:
    c = model.config
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    quant = "none"
    if int8:
        head = "int8" if isinstance(model.lm_head, Int8Linear) else "fp"
        quant = f"int8-w8a{int8[0].act_qmax.bit_length() + 1}(lm_head={head})"
    described = {
        "architecture": c.architecture,
        "hidden_size": c.hidden_size,
        "num_layers": c.num_layers,
        "vocab_size": c.vocab_size,
        "quantization": quant,
    }
    dtype = next(model.parameters()).dtype  # the embedding: int8 linears keep it in the load dtype
    if dtype != torch.float32:  # fp32 is unmarked, so heads fitted before dtypes were recorded still load
        described["dtype"] = str(dtype).removeprefix("torch.")
    return described


def pair_fingerprint(target: Decoder, draft: Decoder | None, tokenizer_sha256: str) -> dict[str, Any]:
    return {
        "target": describe_model(target),
        "draft": describe_model(draft) if draft is not None else None,
        "tokenizer_sha256": tokenizer_sha256,
    }
