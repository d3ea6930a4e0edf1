"""Blackout dates (``--skip-dates``, ``--skip-dates-file``): read and validated with the
configuration, checked in the safety windows' time zone on a clock the test sets, recorded
in the ledger as skips with their reason code; and once through the daemon."""

from __future__ import annotations

import dataclasses
import sqlite3
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from mandrill import config
from mandrill.errors import ConfigError
from mandrill.ledger import open_ledger
from mandrill.parts import worker_settings
from mandrill.policy import Reason, Settlement
from tests.ledger import delivery
from tests.support.daemon import run_to_end
from tests.test_decider import _drain, close, make_bench

DATES_FILE = """\
# change freeze
2026-12-24
2026-12-31   # new year's eve

"""


def run_config(tmp_path: Path, **flags: str) -> config.RunConfig:
    cfg = config.command_config("run", {"ledger": str(tmp_path / "l.db"), **flags}, {})
    assert isinstance(cfg, config.RunConfig)
    return cfg


def test_dates_from_the_flag_the_file_the_environment_and_toml(tmp_path):
    path = tmp_path / "blackout"
    path.write_text(DATES_FILE)
    cfg = run_config(tmp_path, skip_dates="2027-01-01", skip_dates_file=str(path))
    assert cfg.safety.skip_dates == {date(2027, 1, 1)}
    assert cfg.safety.skip_dates_file == {date(2026, 12, 24), date(2026, 12, 31)}
    env = {"MANDRILL_SKIP_DATES": "2026-12-24,2026-12-25"}
    assert config.load("run", {}, env)["skip_dates"] == {date(2026, 12, 24), date(2026, 12, 25)}
    toml = tmp_path / "m.toml"
    toml.write_text(f'skip_dates = ["2026-12-24"]\nskip_dates_file = "{path}"\n')
    values = config.load("run", {}, {}, str(toml))
    assert values["skip_dates"] == {date(2026, 12, 24)}
    assert len(values["skip_dates_file"]) == 2


@pytest.mark.parametrize(
    ("flags", "file_text", "message"),
    [
        ({"skip_dates": "2026-12-24,2026-12-32"}, None,
         "--skip-dates: '2026-12-32' is not a date (YYYY-MM-DD)"),
        ({}, "2026-12-24\n# x\n12/31/2026\n",
         "--skip-dates-file: {path} line 3: '12/31/2026' is not a date (YYYY-MM-DD)"),
        ({"skip_dates_file": "/no/such/file"}, None,
         "--skip-dates-file: cannot read /no/such/file: No such file or directory"),
    ],
)
def test_a_bad_date_or_file_is_one_line_naming_it(tmp_path, flags, file_text, message):
    path = tmp_path / "blackout"
    if file_text is not None:
        path.write_text(file_text)
        flags = {**flags, "skip_dates_file": str(path)}
    with pytest.raises(ConfigError) as info:
        config.load("run", flags, {})
    assert str(info.value) == message.format(path=path)


async def test_a_message_on_a_blackout_date_is_skipped_and_recorded(tmp_path):
    """The decider's clock is the test's: 2026-12-23 23:30 UTC is already the 24th in
    Paris, the time zone of the safety windows."""
    path = tmp_path / "blackout"
    path.write_text(DATES_FILE)
    cfg = run_config(tmp_path, skip_dates_file=str(path), timezone="Europe/Paris")
    now = datetime(2026, 12, 23, 23, 30, tzinfo=UTC)
    settings = dataclasses.replace(worker_settings(cfg), wall_clock=lambda: now.timestamp())
    ledger = await open_ledger(str(tmp_path / "l.db"))
    bench = await make_bench(ledger, settings)
    try:
        await bench.decider.decide(bench.held(delivery("m1", "web-1")))
        assert bench.settlements() == {"m1": Settlement.ACK}
        assert _drain(bench.restarts) == []
        assert bench.counters.skip_reasons == {Reason.BLACKOUT_DATE: 1}
        now -= timedelta(hours=1)  # 23:30 in Paris on the 23rd: restarts go ahead
        await bench.decider.decide(bench.held(delivery("m2", "web-2")))
        assert [c.message.message_id for c in _drain(bench.restarts)] == ["m2"]
    finally:
        ledger.owned.settled(ledger.owned.claims())
        await close(bench)
        await ledger.aclose()
    with sqlite3.connect(tmp_path / "l.db") as conn:
        rows = conn.execute("SELECT message_id, outcome, reason, detail FROM restarts"
                            " WHERE outcome = 'skipped'").fetchall()
    assert rows == [("m1", "skipped", "blackout_date",
                     "blackout date: it is 2026-12-24 (Europe/Paris)")]


@pytest.mark.slow
async def test_the_daemon_skips_every_restart_on_a_blackout_date(tmp_path, backend_name):
    zone = "Pacific/Kiritimati"  # UTC+14: its date is rarely the machine's
    today = datetime.now(ZoneInfo(zone)).date()
    # Yesterday and tomorrow too: the run may cross midnight there.
    days = [today + timedelta(days=n) for n in (-1, 0, 1)]
    path = tmp_path / "blackout"
    path.write_text("# freeze\n" + "".join(f"{day.isoformat()}\n" for day in days))
    db = str(tmp_path / "l.db")
    code, _, err = await run_to_end([
        "run", "--backend", backend_name, "--count", "5", "--rate", "0",
        "--restart-latency", "0s", "--ledger", db, "--log-format", "json",
        "--skip-dates-file", str(path), "--timezone", zone,
    ])
    assert code == 0, err
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT outcome, reason, detail FROM restarts").fetchall()
    assert len(rows) >= 5
    assert {(outcome, reason) for outcome, reason, _ in rows} == {("skipped", "blackout_date")}
    assert all(detail.startswith("blackout date: it is ") for _, _, detail in rows)
    assert all(detail.endswith(f"({zone})") for _, _, detail in rows)


@pytest.mark.slow
async def test_a_bad_date_stops_the_daemon_before_it_starts(tmp_path):
    code, _, err = await run_to_end([
        "run", "--ledger", str(tmp_path / "l.db"), "--skip-dates", "2026-12-24,tomorrow",
    ])
    assert code == 2
    assert err == "mandrill: error: --skip-dates: 'tomorrow' is not a date (YYYY-MM-DD)\n"
    assert not (tmp_path / "l.db").exists()
