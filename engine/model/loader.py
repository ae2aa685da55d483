"""Checkpoint loading: an HF safetensors directory or a `.gguf` file -> `LoadedModel` (Decoder and tokenizer).

A GGUF file is converted once into a sha256-verified safetensors cache. `check_pair` refuses a draft/target
pair whose tokenizers or vocabularies disagree.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from engine.config import ModelConfig, UnsupportedModelError
from engine.model.decoder import Decoder

MANIFEST = "manifest.json"
SOURCE_HASHES = "source_sha256.json"
_HASH_CHUNK = 1 << 22
_MAX_KEYS_SHOWN = 10


class CheckpointError(ValueError):
    """The checkpoint or its cache cannot be loaded as is."""


class IncompatiblePairError(ValueError):
    """The draft and target models cannot share token ids."""


@dataclass(frozen=True)
class LoadedModel:
    """A ready-to-run decoder with its tokenizer and where it came from."""

    model: Decoder
    tokenizer: PreTrainedTokenizerBase
    source: str  # the path given to `load_model`
    source_sha256: str | None  # of the GGUF file; None for a Hugging Face directory
    model_dir: Path  # the Hugging Face directory actually loaded (the safetensors cache for GGUF)


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: Path,
) -> LoadedModel:
    """Load a Hugging Face safetensors directory, or a `.gguf` file through its safetensors cache."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist")
    source_sha256 = None
    model_dir = path
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path} is a file but not a .gguf; expected a .gguf or a Hugging Face directory")
        source_sha256 = source_sha256_of(path, cache_dir)
        model_dir = gguf_cache(path, source_sha256, cache_dir)
    model = load_decoder(model_dir, dtype=dtype, device=torch.device(device))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return LoadedModel(model, tokenizer, str(path), source_sha256, model_dir)


def load_decoder(model_dir: Path, *, dtype: torch.dtype, device: torch.device) -> Decoder:
    """config.json + safetensors weights -> our Decoder in eval mode on `device`."""
    config = read_model_config(model_dir)
    state_dict = _read_weights(model_dir, dtype)
    with torch.device("meta"):
        model = Decoder(config)
    try:
        result = model.load_state_dict(state_dict, assign=True, strict=False)
    except RuntimeError as e:  # shape mismatches still raise with strict=False
        raise CheckpointError(f"{model_dir}: weights do not match config.json: {e}") from e
    _check_keys(model_dir, config, result.missing_keys, result.unexpected_keys)
    model.tie_weights()
    model.reset_rope()  # the rotary buffer is still on meta; it is rebuilt in fp32 and `.to` keeps that dtype
    return model.to(device).eval()


def read_model_config(model_dir: Path) -> ModelConfig:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json; expected a Hugging Face model directory")
    try:
        return ModelConfig.from_hf(json.loads(config_path.read_text()))
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{model_dir}: {e}") from e


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise CheckpointError(f"{model_dir}: shards listed in {index.name} are missing: {missing}")
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if any(model_dir.glob("pytorch_model*.bin")):
        raise CheckpointError(
            f"{model_dir} has only pytorch_model*.bin weights; convert them to safetensors "
            "(load with transformers and save_pretrained) so no pickle is ever loaded"
        )
    raise CheckpointError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")


def _read_weights(model_dir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state_dict: dict[str, torch.Tensor] = {}
    for file in _weight_files(model_dir):
        for name, tensor in safetensors.torch.load_file(file).items():
            state_dict[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state_dict


def _check_keys(model_dir: Path, config: ModelConfig, missing: list[str], unexpected: list[str]) -> None:
    # Tied checkpoints omit lm_head.weight; older transformers saved the rotary buffer, which we recompute.
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    bad_missing = sorted(set(missing) - allowed_missing)
    bad_unexpected = sorted(k for k in unexpected if not k.endswith("rotary_emb.inv_freq"))
    problems = []
    if bad_missing:
        problems.append(f"missing {len(bad_missing)} weights: {bad_missing[:_MAX_KEYS_SHOWN]}")
    if bad_unexpected:
        problems.append(f"unexpected {len(bad_unexpected)} weights: {bad_unexpected[:_MAX_KEYS_SHOWN]}")
    if problems:
        raise CheckpointError(f"{model_dir} ({config.architecture}): " + "; ".join(problems))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def source_sha256_of(path: Path, cache_dir: Path) -> str:
    """sha256 of a source file, remembered by (path, size, mtime) so a restart does not rehash it."""
    stat = path.stat()
    key = str(path.resolve())
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo_path = cache_dir / SOURCE_HASHES
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    entry = memo.get(key)
    if entry and {k: entry[k] for k in stamp} == stamp:
        return str(entry["sha256"])
    digest = sha256_file(path)
    memo[key] = {**stamp, "sha256": digest}
    _write_json_atomic(memo_path, memo)
    return digest


def gguf_cache(gguf: Path, source_sha256: str, cache_dir: Path) -> Path:
    """The verified safetensors cache of `gguf`, converting it first if there is none."""
    target = cache_dir / source_sha256[:16]
    if not target.exists():
        _convert_into(gguf, source_sha256, target)
    verify_cache(target, source_sha256)
    return target


def verify_cache(model_dir: Path, source_sha256: str) -> None:
    """Refuse a cache whose manifest is absent, belongs to another source or lists a changed file."""
    manifest_path = model_dir / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{model_dir} has no {MANIFEST}; delete the directory to convert again")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("source_sha256") != source_sha256:
        raise CheckpointError(
            f"{model_dir} was converted from sha256 {manifest.get('source_sha256')}, not {source_sha256}"
        )
    changed = [
        name
        for name, digest in manifest["files"].items()
        if not (model_dir / name).is_file() or sha256_file(model_dir / name) != digest
    ]
    if changed:
        raise CheckpointError(
            f"{model_dir}: cached files missing or changed since conversion: {changed}; delete the directory"
        )


def _convert_into(gguf: Path, source_sha256: str, target: Path) -> None:
    # NOTE: convert into a temp dir next to the target and rename it into place, so an interrupted
    # conversion never leaves a half cache behind.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the cache from other users, e.g. a container's app user
    try:
        _convert_gguf(gguf, tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "source_file": gguf.name,
            "source_sha256": source_sha256,
            "files": files,
            "transformers_version": transformers.__version__,
        }
        _write_json_atomic(tmp / MANIFEST, manifest)
        os.replace(tmp, target)
    except OSError:
        if not (target / MANIFEST).is_file():
            raise
        # Another process finished the same conversion first; its cache is as good as ours.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint with transformers and save it as fp32 safetensors plus tokenizer files."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model loaded through the GGUF quantizer; the weights are plain fp32 by now.
    model.hf_quantizer = None  # type: ignore[assignment]  # Module.__setattr__ is typed for tensors only
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _tokenizer_parts(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What must agree for two models to exchange token ids."""
    specials = ("bos", "eos", "pad", "unk")
    return {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special token ids": {name: getattr(tokenizer, f"{name}_token_id") for name in specials},
        "added tokens": sorted((i, t.content, t.special) for i, t in tokenizer.added_tokens_decoder.items()),
    }


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 over the sorted vocab, the bos/eos/pad/unk ids and the added tokens."""
    payload = json.dumps(_tokenizer_parts(tokenizer), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def check_pair(draft: LoadedModel, target: LoadedModel) -> None:
    """Refuse a draft/target pair whose tokenizers differ or whose logits cannot cover every token id."""
    if tokenizer_fingerprint(draft.tokenizer) != tokenizer_fingerprint(target.tokenizer):
        raise IncompatiblePairError(
            f"tokenizers of draft {draft.source} and target {target.source} differ: "
            + _tokenizer_difference(draft.tokenizer, target.tokenizer)
        )
    num_tokens = len(target.tokenizer)
    draft_vocab, target_vocab = draft.model.config.vocab_size, target.model.config.vocab_size
    # NOTE: embedding rows are often padded past the tokenizer, so unequal sizes are fine while both
    # still cover every token id; the padded rows never win an argmax that matters.
    if draft_vocab != target_vocab and min(draft_vocab, target_vocab) < num_tokens:
        raise IncompatiblePairError(
            f"vocab sizes differ (draft {draft_vocab}, target {target_vocab}) and the smaller one does not "
            f"cover the tokenizer's {num_tokens} tokens"
        )


def _tokenizer_difference(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> str:
    parts_a, parts_b = _tokenizer_parts(a), _tokenizer_parts(b)
    diffs = []
    if len(parts_a["vocab"]) != len(parts_b["vocab"]):
        diffs.append(f"vocab size {len(parts_a['vocab'])} vs {len(parts_b['vocab'])}")
    elif parts_a["vocab"] != parts_b["vocab"]:
        only_a = sorted(set(parts_a["vocab"]) - set(parts_b["vocab"]))[:5]
        diffs.append(f"vocab entries differ (draft only: {only_a})")
    for part in ("special token ids", "added tokens"):
        if parts_a[part] != parts_b[part]:
            diffs.append(f"{part} {parts_a[part]} vs {parts_b[part]}")
    return "; ".join(diffs)


def eos_token_ids(loaded: LoadedModel) -> tuple[int, ...]:
    """The tokenizer's EOS plus any in generation_config.json (chat models often end turns with another)."""
    ids = {loaded.tokenizer.eos_token_id}
    gen = loaded.model_dir / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos])
    return tuple(sorted(i for i in ids if i is not None))
