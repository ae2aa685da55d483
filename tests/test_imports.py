"""The import graph of design §2.1, checked on each module's AST."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"engine", "judge", "server", "training", "loadtest"}


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("path", modules("judge"), ids=str)
def test_judge_is_a_leaf(path):
    allowed = {"torch", "numpy", "safetensors", "judge", "__future__"}
    stdlib = {"math", "json", "hashlib", "dataclasses", "pathlib", "typing", "collections"}
    assert {top(n) for n in imports_of(path)} <= allowed | stdlib


@pytest.mark.parametrize("path", modules("engine"), ids=str)
def test_engine_boundaries(path):
    found = {top(n) for n in imports_of(path)}
    assert not found & {"server", "training", "fastapi", "prometheus_client", "sklearn", "uvicorn"}
    rel = path.relative_to(ROOT).as_posix()
    if "transformers" in found:
        assert rel == "engine/model/loader.py", "transformers is the loader only"
    if "flash_attn" in found:
        assert rel == "engine/model/attention.py"


@pytest.mark.parametrize("path", modules("server"), ids=str)
def test_server_never_imports_torch(path):
    found = imports_of(path)
    assert not {top(n) for n in found} & {"torch", "training"}
    assert all(n == "engine" or not n.startswith("engine.") for n in found), "server uses the public API only"


def test_nothing_imports_server_or_training():
    for package in ("engine", "judge"):
        for path in modules(package):
            assert not {top(n) for n in imports_of(path)} & {"server", "training"}, path
