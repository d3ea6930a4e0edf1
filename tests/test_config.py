import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mandrill import config
from mandrill.errors import ConfigError


def test_defaults():
    values = config.load("run", {}, {})
    assert values["backend"] == "asyncio"
    assert values["min_restart_interval"] == 7 * 86400
    assert values["source"] == "memory"


def test_precedence_is_flags_then_env_then_file(tmp_path):
    toml = tmp_path / "mandrill.toml"
    toml.write_text('[mandrill]\ngrace = "1s"\nmax_in_flight = 7\ndomain = "file.example"\n')
    env = {"MANDRILL_GRACE": "2s", "MANDRILL_MAX_IN_FLIGHT": "8"}
    values = config.load("run", {"grace": "3s"}, env, str(toml))
    assert values["grace"] == 3.0  # flag beats env and file
    assert values["max_in_flight"] == 8  # env beats file
    assert values["domain"] == "file.example"  # file beats default


def test_flat_toml_with_dashes_is_accepted(tmp_path):
    toml = tmp_path / "m.toml"
    toml.write_text('max-in-flight = 3\nrestart_failure_rate = 0.5\n')
    values = config.load("run", {}, {}, str(toml))
    assert (values["max_in_flight"], values["restart_failure_rate"]) == (3, 0.5)


@pytest.mark.parametrize(
    ("flags", "env", "toml", "message"),
    [
        ({"grace": "soon"}, {}, "", "--grace: 'soon' is not a duration"),
        ({}, {"MANDRILL_MAX_IN_FLIGHT": "-1"}, "", "MANDRILL_MAX_IN_FLIGHT: '-1' must be"),
        ({}, {}, "max_in_flight = true\n", "max_in_flight: True is not a whole number"),
        ({}, {}, "restart_failure_rate = 2\n", "must be between 0 and 1"),
        ({}, {}, "typo_setting = 1\n", "unknown setting(s): typo_setting"),
        ({}, {}, "not toml [", "is not valid TOML"),
        ({"rate": "-5"}, {}, "", "--rate: '-5' must be a rate"),
        ({"domain": "-bad-.com"}, {}, "", "not a valid DNS domain"),
    ],
)
def test_invalid_values_are_one_line_errors(tmp_path, flags, env, toml, message):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        config.load("run", flags, env, str(path))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_settings_of_other_commands_are_not_loaded():
    assert "grace" not in config.load("history", {}, {})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("7d", 604800), ("90s", 90), ("250ms", 0.25), ("1.5", 1.5), ("2w", 1209600), (3, 3)],
)
def test_durations(text, seconds):
    assert config.duration(text) == seconds


@given(st.text(max_size=20))
def test_duration_never_raises_anything_but_value_error(text):
    with contextlib.suppress(ValueError):
        assert config.duration(text) >= 0


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://europe-west1-pubsub.googleapis.com", "https://europe-west1-pubsub.googleapis.com/v1"),
        ("https://europe-west1-pubsub.googleapis.com/v1/", "https://europe-west1-pubsub.googleapis.com/v1"),
        ("http://127.0.0.1:8085/v1", "http://127.0.0.1:8085/v1"),
    ],
)
def test_pubsub_api_root_from_flag_env_or_file(tmp_path, given, expected):
    toml = tmp_path / "m.toml"
    toml.write_text(f'pubsub_api_root = "{given}"\n')
    assert config.load("run", {"pubsub_api_root": given}, {})["pubsub_api_root"] == expected
    assert config.load("publish", {}, {"MANDRILL_PUBSUB_API_ROOT": given})["pubsub_api_root"] == (
        expected
    )
    assert config.load("setup", {}, {}, str(toml))["pubsub_api_root"] == expected
    assert config.load("run", {}, {})["pubsub_api_root"] is None


@pytest.mark.parametrize("given", ["pubsub.googleapis.com", "ftp://x/v1", "https://", "https://h/v1?x=1"])
def test_a_bad_pubsub_api_root_is_one_line(given):
    with pytest.raises(ConfigError, match=r"^--pubsub-api-root: .* is not an http\(s\) URL"):
        config.load("run", {"pubsub_api_root": given}, {})
