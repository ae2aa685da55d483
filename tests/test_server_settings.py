"""Server settings: defaults < config file (TOML or JSON) < AUTOJUDGE_* environment < command-line flags."""

from __future__ import annotations

import json

import pytest

from server.main import main
from server.settings import Settings, load_settings


def test_defaults_serve_lossless_on_loopback():
    s = load_settings([], {})
    assert (s.host, s.port, s.default_profile, s.api_key) == ("127.0.0.1", 8000, "lossless", None)
    config = s.engine_config()
    assert config.cache.max_slots == 8 and config.spec.auto_window
    assert config.spec.default_speculative_tokens == config.spec.max_speculative_tokens == 8  # auto: a cap
    assert s.model_source().pair == "smollm2" and s.model_source().heads == "shipped"


def test_a_fixed_window_turns_the_planner_off_and_bad_windows_are_refused():
    spec = load_settings(["--num-speculative-tokens", "4"], {}).engine_config().spec
    assert not spec.auto_window and spec.default_speculative_tokens == 4
    assert (
        load_settings([], {"AUTOJUDGE_NUM_SPECULATIVE_TOKENS": "0"}).engine_config().spec.default_speculative_tokens
        == 0
    )
    assert load_settings(["--reprofile"], {}).model_source().reprofile
    for bad in ("9", "-1", "fast"):
        with pytest.raises(ValueError, match=r"num_speculative_tokens must be 'auto' or an integer in 0\.\.max_spec"):
            load_settings(["--num-speculative-tokens", bad], {})


def test_precedence_file_env_flags(tmp_path):
    toml = tmp_path / "serve.toml"
    toml.write_text('port = 9000\nmax-slots = 3\napi_key = "from-file"\nbonus_token = false\n')
    env = {"AUTOJUDGE_CONFIG": str(toml), "AUTOJUDGE_PORT": "9100", "AUTOJUDGE_DEVICE": "cpu"}
    s = load_settings(["--port", "9200", "--max-waiting", "5"], env)
    assert s.port == 9200  # flag beats env beats file
    assert s.max_slots == 3 and s.api_key == "from-file" and s.bonus_token is False
    assert s.device == "cpu" and s.max_waiting == 5
    assert s.engine_config().scheduler.max_waiting == 5 and not s.engine_config().spec.bonus_token


def test_json_file_and_boolean_flags(tmp_path):
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"bonus_token": False, "target": "none"}))
    s = load_settings(["--config", str(path), "--bonus-token"], {"AUTOJUDGE_REQUEST_TIMEOUT": "2.5"})
    assert s.bonus_token is True and s.target is None and s.request_timeout == 2.5
    assert load_settings(["--no-reuse-prefix"], {}).engine_config().cache.reuse_prefix is False
    assert load_settings([], {}).engine_config().cache.reuse_prefix is True


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {"AUTOJUDGE_PORT": "eighty"}, "port must be int"),
        ([], {"AUTOJUDGE_BONUS_TOKEN": "maybe"}, "bonus_token must be a boolean"),
        (["--port", "0"], {}, "port must be in"),
        (["--step-log-max-mb", "-1"], {}, r"step_log_max_mb must be in \[0, 2\*\*20\)"),
        (["--step-log-max-mb", "inf"], {}, "step_log_max_mb must be in"),
        ([], {"AUTOJUDGE_API_KEY": ""}, None),
    ],
)
def test_bad_values_are_refused(argv, env, message):
    if message is None:  # an empty key means "no key" for an optional field
        assert load_settings(argv, env).api_key is None
        return
    with pytest.raises(ValueError, match=message):
        load_settings(argv, env)


def test_unknown_keys_in_a_file_are_refused(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text("prot = 1\n")
    with pytest.raises(ValueError, match="unknown settings: prot"):
        load_settings(["--config", str(path)], {})


def test_cli_exits_with_a_message_on_bad_settings(capsys):
    assert main(["--port", "70000"]) == 2
    assert "port must be in" in capsys.readouterr().err


def test_settings_are_frozen():
    with pytest.raises(AttributeError):
        Settings().port = 1  # type: ignore[misc]
