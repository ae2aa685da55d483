"""Server settings from, in rising precedence: defaults, an optional config file (TOML or JSON, keys named as the
fields), `AUTOJUDGE_<FIELD>` environment variables and command-line flags (`--field-name`)."""

from __future__ import annotations

import argparse
import json
import tomllib
import types
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from engine import (
    DEFAULT_CACHE_DIR,
    DTYPES,
    PAIRS,
    CacheConfig,
    EngineConfig,
    ModelSource,
    ProfileSpec,
    SchedulerConfig,
    SpecConfig,
)

ENV_PREFIX = "AUTOJUDGE_"
SPEC_METRICS = ("none", "summary", "detailed")
AUTO = "auto"  # num_speculative_tokens: the window planner
PROFILE_KEYS: dict[str, type] = {
    "name": str,
    "judge_head": str,
    "sha256": str,
    "judge_threshold": float,
    "threshold_index": int,
    "num_speculative_tokens": int,
    "description": str,
}


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = _opt("127.0.0.1", "address to listen on")
    port: int = _opt(8000, "port to listen on")
    api_key: str | None = _opt(None, "require `Authorization: Bearer <key>` on /v1 routes")
    docs: bool = _opt(True, "interactive API docs at /docs (the OpenAPI document is always at /openapi.json)")
    max_body_bytes: int = _opt(1 << 20, "largest accepted request body (413 beyond)")
    request_timeout: float = _opt(600.0, "seconds a request may run before it is aborted")
    shutdown_timeout: float = _opt(30.0, "seconds in-flight requests get to finish on shutdown")
    drain_grace: float = _opt(
        0.0,
        "seconds after SIGTERM that /ready is 503 while requests are still admitted, so a balancer's health "
        "checks take the replica out before it refuses any (HAProxy as shipped: 3)",
    )
    default_profile: str = _opt("lossless", "task profile of requests that name none")
    profiles: str | None = _opt(None, "task profiles file (TOML or JSON); default: lossless + one per head in heads")
    vllm_metrics: bool = _opt(
        False, "also expose running/waiting/KV/token series under vLLM's `vllm:` names, for routers and autoscalers"
    )
    step_log: str | None = _opt(
        None, "append one JSON line per engine step (windows, timings, the cost model's prediction) to this file"
    )
    step_log_max_mb: float = _opt(
        100.0, "rotate the step log to <file>.1 when it would pass this size (MiB; 0: never), so it stays bounded"
    )
    spec_metrics: str = _opt("summary", "none | summary | detailed: per-request stats of requests that ask none")
    log_level: str = _opt("info", "debug | info | warning | error")
    pair: str = _opt(PAIRS[0], "named model pair: " + " | ".join(PAIRS))
    target: str | None = _opt(None, "target checkpoint: a Hugging Face directory or .gguf file (overrides pair)")
    draft: str = _opt("int8", "int8 | int8-body | none | a draft checkpoint")
    draft_shares_kv: bool = _opt(
        True,
        "a draft made from the target (int8, int8-body) reads the target's K/V for context it has not computed "
        "instead of running its own prefill and catch-up forwards (drafts change slightly, lossless output not)",
    )
    heads: str = _opt("shipped", "judge heads: shipped | none | a directory of <profile>/head.json folders")
    served_model_name: str | None = _opt(None, "model id in the API (default: the target file name)")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = _opt("auto", " | ".join(DTYPES) + " (auto: the pair's own precision)")
    quantize: str = _opt("none", "none | int8: W8A8 target and draft checkpoint (the heads record which)")
    threads: int = _opt(0, "CPU threads for torch (0: torch's default)")
    cache_dir: str = _opt(str(DEFAULT_CACHE_DIR), "converted-model cache")
    max_slots: int = _opt(8, "batch slots (requests decoded together)")
    max_model_len: int = _opt(2048, "context limit: prompt + max_tokens")
    reuse_prefix: bool = _opt(True, "keep a finished request's K/V in its slot and reuse a shared prompt prefix")
    max_waiting: int = _opt(64, "requests waiting for a slot before 429")
    max_speculative_tokens: int = _opt(8, "largest window K a request may ask for")
    num_speculative_tokens: str = _opt(
        AUTO,
        "default window: auto (the cost model picks each row's window every step, 0 included, up to the request's "
        "num_speculative_tokens or max_speculative_tokens) or a fixed K drafted every cycle",
    )
    reprofile: bool = _opt(False, "auto windows: measure the step-cost profile again instead of reading its cache")
    bonus_token: bool = _opt(True, "emit the target's bonus token after a fully accepted window")

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError("port must be in 1..65535")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 1024")
        if self.request_timeout <= 0 or self.shutdown_timeout < 0 or self.drain_grace < 0:
            raise ValueError("request_timeout must be > 0, shutdown_timeout and drain_grace >= 0")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
        if not 0 <= self.step_log_max_mb < 1 << 20:  # NaN and inf included
            raise ValueError("step_log_max_mb must be in [0, 2**20)")
        if self.spec_metrics not in SPEC_METRICS:
            raise ValueError(f"spec_metrics must be one of {', '.join(SPEC_METRICS)}")
        width = str(self.num_speculative_tokens)
        if width != AUTO and not (width.isdigit() and int(width) <= self.max_speculative_tokens):
            raise ValueError(
                f"num_speculative_tokens must be {AUTO!r} or an integer in 0..max_speculative_tokens "
                f"({self.max_speculative_tokens}), got {width!r}"
            )

    def model_source(self) -> ModelSource:
        return ModelSource(
            pair=self.pair,
            target=self.target,
            draft=self.draft,
            heads=self.heads,
            device=self.device,
            dtype=self.dtype,
            quantize=self.quantize,
            threads=self.threads,
            cache_dir=Path(self.cache_dir),
            reprofile=self.reprofile,
            draft_shares_kv=self.draft_shares_kv,
            model_name=self.served_model_name,
            profiles=read_profiles_file(Path(self.profiles)) if self.profiles else None,
        )

    def engine_config(self) -> EngineConfig:
        auto = str(self.num_speculative_tokens) == AUTO
        return EngineConfig(
            cache=CacheConfig(
                max_slots=self.max_slots, max_model_len=self.max_model_len, reuse_prefix=self.reuse_prefix
            ),
            spec=SpecConfig(
                max_speculative_tokens=self.max_speculative_tokens,
                default_speculative_tokens=self.max_speculative_tokens if auto else int(self.num_speculative_tokens),
                bonus_token=self.bonus_token,
                auto_window=auto,
            ),
            scheduler=SchedulerConfig(max_waiting=self.max_waiting),
        )


def load_settings(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Settings:
    parser = _parser()
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config") or environ.get(f"{ENV_PREFIX}CONFIG")
    values: dict[str, Any] = read_config_file(Path(config_file)) if config_file else {}
    hints = get_type_hints(Settings)
    for f in fields(Settings):
        env = environ.get(ENV_PREFIX + f.name.upper())
        if env is not None:
            values[f.name] = env
        if args[f.name] is not None:
            values[f.name] = args[f.name]
    unknown = set(values) - {f.name for f in fields(Settings)}
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
    return Settings(**{name: coerce(name, value, hints[name]) for name, value in values.items()})


def read_config_file(path: Path) -> dict[str, Any]:
    return {str(k).replace("-", "_"): v for k, v in read_table(path, "config").items()}


def read_table(path: Path, kind: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file {path} does not exist")
    if path.suffix == ".toml":
        data = tomllib.loads(path.read_text())
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
    else:
        raise ValueError(f"{kind} file {path} must be .toml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"{kind} file {path} must hold a table")
    return data


def read_profiles_file(path: Path) -> tuple[ProfileSpec, ...]:
    """`[[profiles]]` tables (TOML) or `{"profiles": [...]}` (JSON), keys as `PROFILE_KEYS`; a relative
    `judge_head` is taken from the file's directory."""
    data = read_table(path, "profiles")
    entries = data.get("profiles")
    if set(data) != {"profiles"} or not isinstance(entries, list) or not entries:
        raise ValueError(f"profiles file {path} must hold one non-empty `profiles` list and nothing else")
    return tuple(profile_spec(entry, path, i) for i, entry in enumerate(entries))


def profile_spec(entry: Any, path: Path, index: int) -> ProfileSpec:
    where = f"{path}: profiles[{index}]"
    if not isinstance(entry, dict) or "name" not in entry:
        raise ValueError(f"{where} must be a table with a name")
    unknown = set(entry) - set(PROFILE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for key, value in entry.items():
        kind = PROFILE_KEYS[key]
        number = kind is float and isinstance(value, int)
        if isinstance(value, bool) or not (isinstance(value, kind) or number):
            raise ValueError(f"{where}: {key} must be {kind.__name__}, got {value!r}")
        values[key] = float(value) if kind is float else value
    if "judge_head" in values:
        values["judge_head"] = path.parent / values["judge_head"]
    try:
        return ProfileSpec(**values)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def coerce(name: str, value: Any, hint: Any) -> Any:
    """A file or environment value into the field's type (`none` clears an optional field)."""
    base = _base_type(hint)
    optional = base is not hint
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("", "none"))):
        return None
    if base is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ValueError(f"{name} must be a boolean, got {value!r}")
        return text in ("1", "true", "yes", "on")
    try:
        return base(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be {base.__name__}, got {value!r}") from e


def _base_type(hint: Any) -> Any:
    if get_origin(hint) in (Union, types.UnionType):
        return next(a for a in get_args(hint) if a is not type(None))
    return hint


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autojudge-serve", description="OpenAI-compatible AutoJudge server.")
    p.add_argument("--config", help="TOML or JSON settings file (also AUTOJUDGE_CONFIG)")
    hints = get_type_hints(Settings)
    for f in fields(Settings):
        base = _base_type(hints[f.name])
        default = "none" if f.default is MISSING else f.default
        help_text = f"{f.metadata['help']} (default {default}; env {ENV_PREFIX}{f.name.upper()})"
        flag = "--" + f.name.replace("_", "-")
        if base is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(flag, type=base, default=None, help=help_text)
    return p
