"""Configuration: precedence, validation naming every bad variable, and the secret kept out."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import DEFAULT_MODELS, ConfigError, load_config
from tests.conftest import FAKE_KEY

ENV = {"WAVESPEED_API_KEY": FAKE_KEY}


def test_defaults_match_the_spec() -> None:
    """With only a key set, every setting has the SPEC's default."""
    config = load_config(None, ENV)
    assert config.upstream_url == "https://api.wavespeed.ai"
    assert config.allowed_models == DEFAULT_MODELS
    assert (config.host, config.port, config.admin_host, config.admin_port) == (
        "127.0.0.1", 8080, "127.0.0.1", 9091,
    )  # fmt: skip
    assert (config.connect_timeout, config.first_byte_timeout) == (10, 300)
    assert (config.idle_timeout, config.max_stream_seconds) == (120, 3600)
    assert (config.max_body_bytes, config.shutdown_grace) == (1_048_576, 60)
    assert (config.log_level, config.log_format) == ("info", "json")


def test_precedence_is_flag_then_environment_then_file(tmp_path: Path) -> None:
    """A flag beats the environment, which beats the file, which beats the default."""
    file = tmp_path / "relay.toml"
    file.write_text('port = 7000\nidle_timeout = 5\nlog_level = "debug"\n')
    env = {**ENV, "RELAY_PORT": "7100", "RELAY_IDLE_TIMEOUT": "6"}
    config = load_config(file, env, {"port": "7200"})
    assert config.port == 7200
    assert config.idle_timeout == 6
    assert config.log_level == "debug"


def test_admin_host_follows_host_unless_set() -> None:
    """RELAY_ADMIN_HOST defaults to RELAY_HOST."""
    env = {**ENV, "RELAY_HOST": "0.0.0.0", "RELAY_ALLOW_ANONYMOUS": "true"}
    assert load_config(None, env).admin_host == "0.0.0.0"


def test_every_bad_variable_is_named_at_once() -> None:
    """All problems come together, each naming its variable and reason."""
    env = {
        "RELAY_PORT": "http",
        "RELAY_ADMIN_PORT": "70000",
        "RELAY_IDLE_TIMEOUT": "0",
        "RELAY_LOG_FORMAT": "xml",
        "RELAY_UPSTREAM_URL": "ftp://example.com",
        "RELAY_ALLOWED_MODELS": "UPPER/case, ok/*",
        "RELAY_MAX_BODY_BYTES": "-5",
    }
    with pytest.raises(ConfigError) as error:
        load_config(None, env)
    named = [problem.split(":")[0] for problem in error.value.problems]
    assert sorted(named) == sorted([*env, "WAVESPEED_API_KEY"])


def test_the_key_value_never_appears_in_repr_or_problems(tmp_path: Path) -> None:
    """The key is absent from repr, the redacted view and every error message."""
    config = load_config(None, ENV)
    assert FAKE_KEY not in repr(config)
    assert FAKE_KEY not in str(config.redacted())
    assert config.redacted()["api_key"] == "<redacted>"
    with pytest.raises(ConfigError) as error:
        load_config(None, {**ENV, "WAVESPEED_API_KEY_FILE": str(tmp_path / "k")})
    assert FAKE_KEY not in str(error.value)


def test_key_from_a_file(tmp_path: Path) -> None:
    """WAVESPEED_API_KEY_FILE is read and stripped (container secrets)."""
    secret = tmp_path / "key"
    secret.write_text(FAKE_KEY + "\n")
    assert load_config(None, {"WAVESPEED_API_KEY_FILE": str(secret)}).api_key == FAKE_KEY


def test_unknown_file_settings_and_bad_toml_are_reported(tmp_path: Path) -> None:
    """A typo in the file is named rather than ignored."""
    file = tmp_path / "relay.toml"
    file.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="prot"):
        load_config(file, ENV)
    file.write_text("port = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(file, ENV)
