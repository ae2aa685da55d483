"""Command-line flags that choose and place a draft/target pair, shared by `autojudge` and `autojudge-train`.

Defaults come from `AUTOJUDGE_*` environment variables, read here and in the commands' own flags only.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from engine.model.assets import default_cache_dir
from engine.model.pair import DRAFT_CHOICES_HELP, DTYPES, PAIRS, QUANTIZE


def env(name: str, default: str) -> str:
    return os.environ.get(f"AUTOJUDGE_{name}", default)


def add_pair_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pair", choices=PAIRS, default=env("PAIR", PAIRS[0]))
    p.add_argument("--target", help="target: a Hugging Face directory or a .gguf file (overrides --pair)")
    p.add_argument("--draft", default=env("DRAFT", "int8"), help=DRAFT_CHOICES_HELP)
    p.add_argument(
        "--quantize", choices=QUANTIZE, default=env("QUANTIZE", "none"), help="int8: W8A8 target and draft checkpoint"
    )
    p.add_argument(
        "--dtype", choices=DTYPES, default=env("DTYPE", "auto"), help="auto: the pair's own (heads record it)"
    )
    p.add_argument("--device", default=env("DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
    p.add_argument("--threads", type=int, default=int(env("THREADS", "0")), help="CPU threads (0: torch's)")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir())
