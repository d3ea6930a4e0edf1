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
        ({"breaker_failures": "-1"}, {}, "", "--breaker-failures: '-1' must be 0 or more"),
        ({}, {"MANDRILL_BREAKER_UNKNOWN": "x"}, "", "'x' is not a whole number"),
        ({"breaker_window": "0"}, {}, "", "--breaker-window: '0' must be a duration > 0"),
        ({"group_by": "zone"}, {}, "", "--group-by: 'zone' is not attribute:NAME or pattern"),
        ({}, {}, "group_by = 'pattern:web'\n", "group_by: pattern 'web' has 0 capture"),
        ({"max_concurrent_restarts_per_group": "0"}, {}, "", "'0' must be at least 1"),
        ({"block_on_alerts": "http://prom:9090"}, {}, "",
         "--block-on-alerts: 'http://prom:9090': say whose alerts"),
        ({}, {"MANDRILL_BLOCK_ALERT_FILTER": 'severity=="x"'}, "",
         "MANDRILL_BLOCK_ALERT_FILTER: cannot read"),
        ({}, {}, "block_alert_filter = 'alertname=~\"(\"'\n", "not a regular expression"),
        ({"block_on_command": "{hostname} x"}, {}, "",
         "--block-on-command: blocker command '{hostname}': the program name cannot"),
        ({"block_timeout": "0s"}, {}, "", "--block-timeout: '0s' must be a duration > 0"),
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
    ("seconds", "text"),
    [(604800, "7d"), (3600, "1h"), (60, "1m"), (90, "90s"), (10, "10s"), (0.5, "500ms"),
     (0, "0s"), (86400 + 1, "86401s"), (0.0005, "0.0005s")],
)
def test_durations_are_shown_as_written(seconds, text):
    assert config.format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=10**9))
def test_a_shown_duration_parses_back_to_the_same_value(milliseconds):
    seconds = milliseconds / 1000
    assert config.duration(config.format_duration(seconds)) == pytest.approx(seconds)


def test_shown_defaults_and_choices():
    by_name = config.BY_NAME
    assert by_name["min_restart_interval"].shown_default == "7d"
    assert by_name["max_in_flight"].shown_default == "256"
    assert by_name["publish"].shown_default == "on"
    assert by_name["live"].shown_default is None  # a switch that is off
    assert by_name["project"].shown_default is None
    assert by_name["exclude"].shown_default is None  # an empty list
    assert by_name["backend"].choices == ("asyncio", "trio")
    assert by_name["backend"].shown_metavar == "{asyncio,trio}"
    assert by_name["grace"].shown_metavar == "DURATION"
    for setting in config.SETTINGS:
        if setting.shown_default is not None and setting.name != "outcome_journal":
            assert setting.parse(setting.shown_default) == setting.parse(setting.default)


def test_publish_takes_no_subscription_settings():
    names = {setting.name for setting in config.settings_for("publish")}
    assert "subscription" not in names
    assert "dead_letter_topic" not in names
    assert {"project", "topic", "count", "rate"} <= names


def test_a_file_is_checked_whole_whichever_command_reads_it(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('ledger = "l.db"\ngrace = "soon"\n')
    with pytest.raises(ConfigError, match=r"c.toml: grace: 'soon' is not a duration"):
        config.load("history", {}, {}, str(path))


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


# --- the typed configuration, checked against the table ---------------------------------


def leaves(cls, path=()):
    """``(setting name, field path, the dataclass holding it)`` of every leaf of ``cls``."""
    from dataclasses import fields

    from mandrill.config.typed import parts_of, setting_name

    nested = parts_of(cls)
    for f in fields(cls):
        if f.name in nested:
            yield from leaves(nested[f.name], (*path, f.name))
        else:
            yield setting_name(f), (*path, f.name), cls


@pytest.mark.parametrize("command", sorted(config.COMMANDS))
def test_every_setting_lands_in_exactly_one_field(command):
    """The table and the dataclasses cannot drift: a command's configuration holds each of
    its settings once, and nothing else but its own flags (``history --limit``)."""
    from mandrill.config.typed import COMMAND_FLAGS

    found = [(name, holder) for name, _, holder in leaves(config.COMMANDS[command])
             if getattr(holder, "GROUP", None) != COMMAND_FLAGS]
    names = [name for name, _ in found]
    assert sorted(names) == sorted(s.name for s in config.settings_for(command))
    assert len(names) == len(set(names))
    # A concern's dataclass holds the settings of its --help group, and only those.
    for name, holder in found:
        if hasattr(holder, "GROUP"):
            assert config.BY_NAME[name].group == holder.GROUP, (name, holder.__name__)


@pytest.mark.parametrize("command", sorted(config.COMMANDS))
def test_command_flags_are_the_parsers(command):
    from mandrill.cli import build_parser
    from mandrill.config.typed import COMMAND_FLAGS

    own = {name for name, _, holder in leaves(config.COMMANDS[command])
           if getattr(holder, "GROUP", None) == COMMAND_FLAGS}
    parser = build_parser()
    args = vars(parser.parse_args([command]))
    assert own <= set(args)


@pytest.mark.parametrize("command", sorted(config.COMMANDS))
def test_typed_configuration_holds_the_loaded_values(command, tmp_path):
    """Every field is the value the loader parsed for its setting (defaults here, and each
    setting given in a TOML file)."""
    from mandrill.cli import build_parser

    flags = vars(build_parser().parse_args([command]))
    cfg = config.command_config(command, flags, {})
    values = config.load(command, flags, {})
    for name, path, _ in leaves(config.COMMANDS[command]):
        value = cfg
        for step in path:
            value = getattr(value, step)
        assert value == values.get(name, flags.get(name)), path


def test_run_configuration_is_typed_and_frozen():
    cfg = config.command_config(
        "run", {"ledger": "x.db", "restarter": "command", "notify_url": "https://h/x",
                "max_restarts": "3", "grace": "2s", "source": "pubsub", "project": "p"}, {}
    )
    assert isinstance(cfg, config.RunConfig)
    assert cfg.ledger.url == "x.db"
    assert cfg.restarter.kind == "command"
    assert cfg.notify.url == "https://h/x"
    assert cfg.safety.max_restarts == 3
    assert cfg.shutdown.grace == 2.0
    assert cfg.source.kind == "pubsub"
    assert cfg.source.pubsub.project == "p"
    with pytest.raises(AttributeError):
        cfg.shutdown.grace = 1.0


def conforms(value, hint) -> bool:
    """``value`` is of the type ``hint`` names (the parts dataclass fields use)."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(conforms(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(conforms(item, args[0]) for item in value)
        return len(value) == len(args) and all(map(conforms, value, args))
    if origin is frozenset:
        return isinstance(value, frozenset) and all(conforms(item, args[0]) for item in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, hint)


@pytest.mark.parametrize(
    "flags",
    [
        {},
        {"weekdays": "mon-fri", "hours": "09:00-17:00", "exclude": "db-*,web-*", "seed": "3",
         "notify_url": "https://h/x", "notify_header": ["A=b"], "rate": "0", "count": "4",
         "notify_template": '{"text": "{host}"}', "metrics_addr": "127.0.0.1:0",
         "max_restarts": "2", "slow_callback_ms": "50", "group_by": "attribute:zone",
         "max_concurrent_restarts_per_group": "2", "breaker_failures": "3",
         "breaker_window": "10m"},
    ],
)
def test_loaded_values_have_the_fields_types(flags):
    """The one place mypy cannot see (a parser returns what its setting's field says)."""
    import typing

    cfg = config.command_config("run", flags, {})
    for _, path, holder in leaves(config.RunConfig):
        value = cfg
        for step in path:
            value = getattr(value, step)
        hint = typing.get_type_hints(holder)[path[-1]]
        assert conforms(value, hint), (path, value, hint)


def test_the_source_outage_limit_is_forever_unless_given(tmp_path):
    import math

    assert config.load("run", {}, {})["source_outage_limit"] == math.inf
    toml = tmp_path / "m.toml"
    toml.write_text('source_outage_limit = "10m"\n')
    assert config.load("run", {}, {}, str(toml))["source_outage_limit"] == 600
    env = {"MANDRILL_SOURCE_OUTAGE_LIMIT": "90s"}
    assert config.load("run", {}, env, str(toml))["source_outage_limit"] == 90
    assert config.load("run", {"source_outage_limit": "forever"}, env)[
        "source_outage_limit"] == math.inf
    cfg = config.command_config("run", {"source_outage_limit": "2m"}, {})
    assert cfg.source.outage_limit == 120


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        ({"source_outage_limit": "0s"}, {}, "--source-outage-limit: '0s' must be a duration > 0,"
                                            " or 'forever'"),
        ({}, {"MANDRILL_SOURCE_OUTAGE_LIMIT": "soon"},
         "MANDRILL_SOURCE_OUTAGE_LIMIT: 'soon' is not a duration (examples: 30s, 10m, 1h) or"
         " 'forever'"),
    ],
)
def test_a_bad_source_outage_limit_is_a_one_line_error(flags, env, message):
    with pytest.raises(ConfigError) as info:
        config.load("run", flags, env)
    assert str(info.value) == message
