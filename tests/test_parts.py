"""The wiring: which adapters open_parts opens for a typed configuration, and the settings
serve() and the worker get from it (the Pub/Sub and gce wiring: test_pubsub_service.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mandrill import config
from mandrill.blockers.alerts import AlertsBlocker
from mandrill.blockers.command import CommandBlocker
from mandrill.errors import ConfigError
from mandrill.ledger import SQLLedger
from mandrill.parts import is_dry_run, open_parts, service_settings, worker_settings
from mandrill.policy import BreakerRule
from mandrill.restarters.command import CommandRestarter
from mandrill.restarters.simulated import SimulatedRestarter
from mandrill.sources.memory import MemoryBroker


def run_config(**flags: Any) -> config.RunConfig:
    cfg = config.command_config("run", {"ledger": ":memory:", **flags}, {})
    assert isinstance(cfg, config.RunConfig)
    return cfg


async def test_the_embedded_demo():
    async with open_parts(run_config()) as parts:
        assert isinstance(parts.source, MemoryBroker)
        assert isinstance(parts.ledger, SQLLedger)
        assert isinstance(parts.restarter, SimulatedRestarter)
        assert parts.publisher is not None  # the talk's publisher feeds the broker
        assert list(parts.companions) == []
        assert parts.on_decision is None


async def test_no_publisher_without_publish():
    async with open_parts(run_config(publish=False)) as parts:
        assert parts.publisher is None


async def test_the_command_restarter_dry_runs_unless_live(tmp_path: Path):
    cfg = run_config(restarter="command", restart_command="true {hostname}",
                     ledger=str(tmp_path / "l.db"))
    async with open_parts(cfg) as parts:
        assert isinstance(parts.restarter, CommandRestarter)
    assert worker_settings(cfg).dry_run
    assert not worker_settings(run_config(restarter="command", live=True)).dry_run
    assert worker_settings(run_config(dry_run=True)).dry_run
    assert not is_dry_run(cfg.restarter, run_config(live=True).safety)


async def test_a_command_restarter_needs_its_command():
    with pytest.raises(ConfigError, match=r"^--restart-command is required with --restarter"):
        async with open_parts(run_config(restarter="command")):
            pass


async def test_a_notifier_runs_beside_the_service():
    cfg = run_config(notify_url="http://127.0.0.1:9/hook", notify_header=["X-A=b"])
    async with open_parts(cfg) as parts:
        (task,) = parts.companions
        notifier = task.__self__  # the Notifier whose run() serve() starts
        assert notifier.url == "http://127.0.0.1:9/hook"
        assert parts.on_decision is not None
        notifier.close()
        await task()


async def test_notify_settings_need_a_url():
    with pytest.raises(ConfigError, match=r"^--notify-header needs --notify-url"):
        async with open_parts(run_config(notify_header=["X-A=b"])):
            pass


async def test_blockers_open_from_their_settings(tmp_path: Path):
    async with open_parts(run_config()) as parts:
        assert parts.blockers is None
    cfg = run_config(block_on_alerts="prometheus+http://127.0.0.1:9", block_timeout="3s",
                     block_alert_filter='severity="critical"', block_on_command="true")
    assert cfg.blockers.timeout == 3.0
    async with open_parts(cfg) as parts:
        assert parts.blockers is not None
        alerts, command = parts.blockers.blockers
        assert isinstance(alerts, AlertsBlocker)
        assert alerts.api.url == "http://127.0.0.1:9/api/v1/alerts"
        assert str(alerts.alert_filter) == 'severity="critical"'
        assert alerts.time_limit == 3.0
        assert isinstance(command, CommandBlocker)
        assert command.time_limit == 3.0


async def test_an_alert_filter_needs_the_alerts_url():
    with pytest.raises(ConfigError, match=r"^--block-alert-filter needs --block-on-alerts$"):
        async with open_parts(run_config(block_alert_filter='severity="critical"')):
            pass


def test_settings_for_serve_and_the_worker():
    cfg = run_config(
        max_in_flight="7", grace="3s", settle_timeout="2s", max_lease="1h", count="5",
        domain="corp.example", min_restart_interval="1d", retry_unknown=True,
        max_attempts="2", max_concurrent_restarts="4", max_restarts="9",
        max_restarts_window="10m", exclude="db-*",
    )
    service = service_settings(cfg)
    assert (service.max_in_flight, service.grace, service.settle_timeout, service.max_lease,
            service.stop_after) == (7, 3.0, 2.0, 3600.0, 5)
    worker = worker_settings(cfg)
    assert worker.domain == "corp.example"
    assert worker.min_restart_interval == 86400.0
    assert worker.retry_unknown
    assert worker.max_attempts == 2
    assert worker.max_concurrent_restarts == 4
    assert worker.rate_limit is not None
    assert (worker.rate_limit.restarts, worker.rate_limit.window) == (9, 600.0)
    assert len(worker.skip_checks) == 1  # the host and time-window controls
    assert worker_settings(run_config()).skip_checks == []
    assert worker_settings(run_config()).rate_limit is None


def test_a_limit_per_group_needs_both_settings():
    assert worker_settings(run_config()).rules.groups is None
    groups = worker_settings(run_config(
        group_by="pattern:^[^.]+\\.([^.]+)\\.", max_concurrent_restarts_per_group="2"
    )).rules.groups
    assert groups is not None
    assert (str(groups.by), groups.limit) == ("pattern:^[^.]+\\.([^.]+)\\.", 2)
    with pytest.raises(ConfigError, match=r"^--group-by needs --max-concurrent-restarts-per"):
        worker_settings(run_config(group_by="attribute:zone"))
    with pytest.raises(ConfigError, match=r"^--max-concurrent-restarts-per-group needs --gr"):
        worker_settings(run_config(max_concurrent_restarts_per_group="2"))


def test_the_breaker_is_off_unless_a_limit_is_given():
    assert worker_settings(run_config()).breaker is None
    assert worker_settings(run_config()).rules.breaker is None
    rule = worker_settings(run_config(breaker_failures="0")).rules.breaker
    assert rule == BreakerRule(0, None, 3600.0)
    rule = worker_settings(run_config(breaker_unknown="2", breaker_window="10m")).breaker
    assert rule == BreakerRule(None, 2, 600.0)
    with pytest.raises(ConfigError, match=r"^--breaker-window needs --breaker-failures or"
                       r" --breaker-unknown$"):
        worker_settings(run_config(breaker_window="10m"))
