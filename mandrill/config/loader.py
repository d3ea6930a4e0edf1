"""Loading: flags > ``MANDRILL_*`` environment > TOML file > defaults, for one command,
each value parsed by its setting's parser; a bad value is a one-line ``ConfigError``."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from typing import Any

from mandrill.config.table import BY_NAME, settings_for
from mandrill.errors import ConfigError


def load(
    command: str,
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> dict[str, Any]:
    """Merge the sources for ``command``; raises :class:`ConfigError` (one line) on any
    invalid value (in the file, also of settings other commands use), unknown TOML key or
    unreadable file."""
    environ = os.environ if environ is None else environ
    file_values = _read_toml(config_file) if config_file else {}
    values: dict[str, Any] = {}
    for setting in settings_for(command):
        if flags.get(setting.name) is not None:
            raw, origin = flags[setting.name], setting.flag
        elif environ.get(setting.env, "") != "":
            raw, origin = environ[setting.env], setting.env
        elif setting.name in file_values:
            raw, origin = file_values[setting.name], f"{config_file}: {setting.name}"
        else:
            values[setting.name] = setting.default
            continue
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{origin}: {exc}") from None
    # The file is checked whole, whichever command reads it: a value `run` would refuse
    # shows up at `mandrill history --config`, not only at the daemon's next start.
    for name, raw in file_values.items():
        if name not in values:
            try:
                BY_NAME[name].parse(raw)
            except ValueError as exc:
                raise ConfigError(f"{config_file}: {name}: {exc}") from None
    return values


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    # Accept both a flat file and a [mandrill] table.
    table = data.get("mandrill", data)
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [mandrill] must be a table")
    normalised = {key.replace("-", "_"): value for key, value in table.items()}
    unknown = sorted(set(normalised) - set(BY_NAME))
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s): {', '.join(unknown)}")
    return normalised
