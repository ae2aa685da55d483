"""Load a draft/target pair by name or path: the embedded SmolLM2 with its int8 copy, the Qwen2.5-Coder pair,
or any checkpoints; the one place both command lines get their models from."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from engine.model.assets import QWEN_CODER_DRAFT, embedded_target_path, fetch_qwen_pair
from engine.model.decoder import Decoder
from engine.model.loader import LoadedModel, check_pair, load_model
from engine.model.quant import quantize_int8

PAIRS = ("smollm2", "qwen-coder")  # named pairs; the first is the embedded default
DTYPES = ("auto", "float32", "bfloat16", "float16")
# The precision each named pair is served, mined and judged in ("auto"); docs/qwen-pair.md says why bf16 for Qwen.
PAIR_DTYPES = {"smollm2": "float32", "qwen-coder": "bfloat16"}
QUANTIZE = ("none", "int8")  # int8: W8A8 Int8Linear for the target and a draft checkpoint (docs/qwen-pair.md)
DRAFT_CHOICES_HELP = (
    "'int8' (int8 copy of the target, the default), 'int8-body' (lm_head kept fp32), 'none', "
    "or a Hugging Face directory / .gguf file"
)


def twin_draft(pair: str, target: str | None, draft: str) -> bool:
    """Whether `load_pair` makes the draft from the target itself (an int8 copy): the pair then shares one
    architecture and one set of weights before quantization, so the target's K/V can stand in for the draft's."""
    return draft in ("int8", "int8-body") and (bool(target) or pair != "qwen-coder")


def draft_name(pair: str, target: str | None, draft: str) -> str | None:
    """What `load_pair` serves as the draft, by name: the twin's flag, the named pair's draft model, or the given
    checkpoint's file or directory name; None without a draft."""
    if draft == "none":
        return None
    if twin_draft(pair, target, draft):
        return draft
    if not target and pair == "qwen-coder":
        return QWEN_CODER_DRAFT.name
    return Path(draft).name.removesuffix(".gguf") or draft  # "." or "/" have no name of their own


def load_pair(
    *,
    pair: str,
    target: str | None,
    draft: str,
    dtype: str,
    device: torch.device,
    cache_dir: Path,
    quantize: str = "none",
) -> tuple[LoadedModel, Decoder | None]:
    """Target and draft; `target` overrides `pair`; a draft checkpoint must share the target's tokenizer.

    `quantize="int8"` serves the target and a draft checkpoint through W8A8 `Int8Linear`; an int8-copy draft is
    made from the unquantized target as always. The pair fingerprint records it, so heads follow the precision.
    """
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    torch_dtype = resolve_dtype(pair, target, dtype)
    draft_path: Path | None = None
    if target:
        target_path = Path(target)
    elif pair == "qwen-coder":
        draft_path, target_path = fetch_qwen_pair(cache_dir)
    elif pair == "smollm2":
        target_path = embedded_target_path()
    else:
        raise ValueError(f"unknown pair {pair!r}; choose one of {', '.join(PAIRS)}, or give --target")
    loaded = load_model(target_path, dtype=torch_dtype, device=device, cache_dir=cache_dir)
    served = _quantized(loaded, quantize)
    if draft == "none":
        return served, None
    if twin_draft(pair, target, draft):
        return served, quantize_int8(loaded.model, include_lm_head=draft == "int8")
    other = load_model(draft_path or Path(draft), dtype=torch_dtype, device=device, cache_dir=cache_dir)
    check_pair(other, loaded)
    return served, _quantized(other, quantize).model


def _quantized(loaded: LoadedModel, quantize: str) -> LoadedModel:
    if quantize == "none":
        return loaded
    return dataclasses.replace(loaded, model=quantize_int8(loaded.model))


def resolve_dtype(pair: str, target: str | None, dtype: str) -> torch.dtype:
    """`auto`: the named pair's own precision (fp32 for a checkpoint given by path); else the named dtype."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        dtype = "float32" if target else PAIR_DTYPES.get(pair, "float32")
    resolved: torch.dtype = getattr(torch, dtype)
    return resolved
