"""Load a draft/target pair by name or path: the embedded SmolLM2 with its int8 copy, the Qwen2.5-Coder pair,
or any checkpoints; the one place both command lines get their models from."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.model.assets import embedded_target_path, fetch_qwen_pair
from engine.model.decoder import Decoder
from engine.model.loader import LoadedModel, check_pair, load_model
from engine.model.quant import quantize_int8

PAIRS = ("smollm2", "qwen-coder")  # named pairs; the first is the embedded default
DRAFT_CHOICES_HELP = (
    "'int8' (int8 copy of the target, the default), 'int8-body' (lm_head kept fp32), 'none', "
    "or a Hugging Face directory / .gguf file"
)


def load_pair(
    *,
    pair: str,
    target: str | None,
    draft: str,
    dtype: torch.dtype,
    device: torch.device,
    cache_dir: Path,
) -> tuple[LoadedModel, Decoder | None]:
    """Target and draft; `target` overrides `pair`; a draft checkpoint must share the target's tokenizer."""
    draft_path: Path | None = None
    if target:
        target_path = Path(target)
    elif pair == "qwen-coder":
        draft_path, target_path = fetch_qwen_pair(cache_dir)
    elif pair == "smollm2":
        target_path = embedded_target_path()
    else:
        raise ValueError(f"unknown pair {pair!r}; choose one of {', '.join(PAIRS)}, or give --target")
    loaded = load_model(target_path, dtype=dtype, device=device, cache_dir=cache_dir)
    if draft == "none":
        return loaded, None
    if draft in ("int8", "int8-body") and draft_path is None:
        return loaded, quantize_int8(loaded.model, include_lm_head=draft == "int8")
    other = load_model(draft_path or Path(draft), dtype=dtype, device=device, cache_dir=cache_dir)
    check_pair(other, loaded)
    return loaded, other.model
