"""Unknown ``MANDRILL_*`` variables: found, named, and the likely one suggested."""

from __future__ import annotations

import pytest

from mandrill import config
from mandrill.config.environment import known_variables


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("MANDRILL_LEDGR", "MANDRILL_LEDGER"),
        ("MANDRILL_GRCE", "MANDRILL_GRACE"),
        ("MANDRILL_MAX_INFLIGHT", "MANDRILL_MAX_IN_FLIGHT"),
        ("MANDRILL_MIN_RESTART_INTERVALL", "MANDRILL_MIN_RESTART_INTERVAL"),
    ],
)
def test_a_typo_is_named_with_the_variable_it_resembles(name, suggestion):
    (line,) = config.unknown_variables({name: "x", "PATH": "/bin"})
    assert line == f"unknown environment variable {name} ignored (did you mean {suggestion}?)"


def test_a_name_like_no_other_gets_no_suggestion():
    (line,) = config.unknown_variables({"MANDRILL_FOO": "1"})
    assert line == "unknown environment variable MANDRILL_FOO ignored"


def test_known_variables_are_not_reported():
    """Every setting's variable, whichever command takes it (one environment serves them
    all), and the variables read elsewhere (the test suite's PostgreSQL)."""
    environ = {setting.env: "x" for setting in config.SETTINGS}
    environ |= {"MANDRILL_TEST_POSTGRES": "postgresql://", "MANDRILLS": "1", "HOME": "/"}
    assert list(config.unknown_variables(environ)) == []
    assert "MANDRILL_GRACE" in known_variables()


def test_one_line_each_in_name_order():
    lines = list(config.unknown_variables({"MANDRILL_ZZZ": "", "MANDRILL_AAA": ""}))
    assert [line.split()[3] for line in lines] == ["MANDRILL_AAA", "MANDRILL_ZZZ"]


# --- the log format of usage errors (mandrill.usage) ------------------------------------


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        ([], {}, "auto"),
        (["run", "--log-format", "json"], {}, "json"),
        (["run", "--log-format=JSON"], {}, "json"),
        (["run", "--log-format", "json", "--log-format", "text"], {}, "text"),  # the last
        (["run"], {"MANDRILL_LOG_FORMAT": "json"}, "json"),
        (["run", "--log-format", "text"], {"MANDRILL_LOG_FORMAT": "json"}, "text"),
        (["run"], {"MANDRILL_LOG_FORMAT": ""}, "auto"),
        (["run", "--config", "/no/such/file.toml"], {}, "auto"),
        (["run", "--log-format"], {}, "auto"),  # argparse says what is missing
    ],
)
def test_the_log_format_asked_for(argv, environ, expected):
    from mandrill.usage import requested_log_format

    assert requested_log_format(argv, environ) == expected


def test_the_log_format_of_a_config_file(tmp_path):
    from mandrill.usage import requested_log_format

    flat, table = tmp_path / "flat.toml", tmp_path / "table.toml"
    flat.write_text('log-format = "json"\n')
    table.write_text('[mandrill]\nlog_format = "json"\n')
    for path in (flat, table):
        assert requested_log_format(["run", "--config", str(path)], {}) == "json"
        assert requested_log_format(
            ["run", "--config", str(path)], {"MANDRILL_LOG_FORMAT": "text"}
        ) == "text"
