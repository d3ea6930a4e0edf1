"""Restart outcomes kept on disk while the ledger is unreachable, and recorded after."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from mandrill.errors import LedgerError
from mandrill.ledger import AUTO, open_ledger, sqlite
from mandrill.ledger.base import Finish
from mandrill.ledger.journal import OutcomeJournal, default_journal_path
from mandrill.policy import Outcome, Verdict
from tests.ledger import T0, Clock, decide, decide_one, message, running, verdict


async def test_kept_outcomes_are_listed_until_forgotten(tmp_path: Path) -> None:
    journal = OutcomeJournal(tmp_path / "outcomes.jsonl", "ledger-a")
    assert await journal.entries() == []
    for restart_id in (1, 2, 3):
        await journal.keep(restart_id, T0 + restart_id, Outcome.RESTARTED, "done")
    kept = await journal.entries()
    assert [entry.restart_id for entry in kept] == [1, 2, 3]
    assert kept[0].outcome is Outcome.RESTARTED

    await journal.forget(kept[:2])
    assert [entry.restart_id for entry in await journal.entries()] == [3]
    await journal.forget(await journal.entries())
    assert not journal.path.exists()


async def test_another_ledgers_outcomes_are_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "outcomes.jsonl"
    mine, theirs = OutcomeJournal(path, "ledger-a"), OutcomeJournal(path, "ledger-b")
    await mine.keep(1, T0, Outcome.RESTARTED, "")
    await theirs.keep(1, T0, Outcome.FAILED, "")
    await mine.forget(await mine.entries())
    assert [entry.outcome for entry in await theirs.entries()] == [Outcome.FAILED]
    assert await mine.entries() == []


async def test_an_unreadable_line_is_skipped_and_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = OutcomeJournal(tmp_path / "outcomes.jsonl", "ledger-a")
    await journal.keep(1, T0, Outcome.RESTARTED, "")
    cut_short = '{"ledger": "ledger-a", "restart_id": 2, "fini\n'  # by a crash mid-write
    journal.path.write_text(journal.path.read_text() + cut_short)
    kept = await journal.entries()
    assert [entry.restart_id for entry in kept] == [1]
    assert "unreadable line ignored" in caplog.text
    await journal.forget(kept)
    assert journal.path.read_text().count("\n") == 1


async def test_daemons_sharing_a_journal_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "outcomes.jsonl"
    daemons = [OutcomeJournal(path, "ledger-a") for _ in range(3)]

    async def keep_and_forget(journal: OutcomeJournal, first: int) -> None:
        for restart_id in range(first, first + 30):
            await journal.keep(restart_id, T0, Outcome.RESTARTED, "")
            if restart_id % 10 == 0:  # another daemon's outcomes may be forgotten too
                await journal.forget([e for e in await journal.entries() if e.restart_id % 2])

    async with anyio.create_task_group() as tg:
        for number, journal in enumerate(daemons):
            tg.start_soon(keep_and_forget, journal, number * 100)
    left = {entry.restart_id for entry in await daemons[0].entries()}
    # Every even id kept (never forgotten) is there; odd ones may remain from after the
    # last forget.
    assert {n for n in left if n % 2 == 0} == {
        n for d in range(3) for n in range(d * 100, d * 100 + 30) if n % 2 == 0
    }


async def test_an_unwritable_journal_raises_ledger_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    journal = OutcomeJournal(tmp_path / "file" / "outcomes.jsonl", "ledger-a")
    with pytest.raises(LedgerError, match="outcome journal"):
        await journal.keep(1, T0, Outcome.RESTARTED, "")


async def test_an_unusable_journal_is_refused_when_the_ledger_opens(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(LedgerError, match=r"outcome journal .*file/outcomes.jsonl: "):
        await open_ledger(
            str(tmp_path / "ledger.db"), journal=str(tmp_path / "file" / "outcomes.jsonl")
        )


def test_default_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    path = default_journal_path("postgresql://u:***@db/ledger")
    assert path.parent == tmp_path / "mandrill"
    assert path != default_journal_path("postgresql://u:***@db/other")


# -- the ledger with a journal ---------------------------------------------------------


@pytest.fixture
def locked_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[sqlite3.Connection]:
    """Another process's connection to the ledger file, for holding its write lock."""
    monkeypatch.setattr(sqlite, "BUSY_TIMEOUT_MS", 50)  # fail in 50 ms, not 5 s
    other = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None,
                            check_same_thread=False)
    yield other
    other.close()


async def test_an_outcome_the_ledger_cannot_take_is_recorded_at_the_next_start(
    tmp_path: Path, locked_out: sqlite3.Connection
) -> None:
    url = str(tmp_path / "ledger.db")
    clock = Clock()
    ledger = await open_ledger(url, journal=AUTO, clock=clock)
    assert ledger.journal is not None
    assert ledger.journal.path == Path(url + "-outcomes.jsonl")
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(ledger.run)
            claimed = await decide_one(ledger, message("m1", "web-1"))
            assert claimed.claim is not None
            locked_out.execute("BEGIN IMMEDIATE")  # the ledger is unreachable from here
            clock.now = T0 + 1
            kept = await ledger.finish([Finish(claimed.claim, Outcome.RESTARTED, "simulated")])
            assert kept == [True]  # kept durably: in the journal
            entries = await ledger.journal.entries()
            assert [(e.restart_id, e.finished_at) for e in entries] == [
                (claimed.claim.restart_id, T0 + 1)
            ]
            assert "m1" in ledger.owned.held()  # held until the ledger has its outcome
            tg.cancel_scope.cancel()
    finally:
        await ledger.aclose()  # stopped without its mark: the ledger is locked
    locked_out.execute("COMMIT")

    # The next start records it before anything else: the redelivery is a duplicate.
    async with running(url, Clock(T0 + 2), journal=AUTO) as reopened:
        again = await decide_one(reopened, message("m1", "web-1"))
        assert verdict(again) == (Verdict.DUPLICATE, "already restarted")
        (row,) = await reopened.history()
        assert (row.outcome, row.detail, row.finished_at) == ("restarted", "simulated", T0 + 1)
        assert reopened.journal is not None
        assert await reopened.journal.entries() == []


async def test_kept_outcomes_are_recorded_once_the_ledger_is_back(
    tmp_path: Path, locked_out: sqlite3.Connection
) -> None:
    clock = Clock()
    async with running(str(tmp_path / "ledger.db"), clock,
                       journal=str(tmp_path / "j.jsonl")) as ledger:
        claimed = await decide(ledger, *(message(f"m{n}", f"web-{n}") for n in range(3)))
        claims = [c.claim for c in claimed if c.claim is not None]
        assert len(claims) == 3
        locked_out.execute("BEGIN IMMEDIATE")
        assert await ledger.finish([Finish(claims[0], Outcome.RESTARTED, ""),
                                    Finish(claims[1], Outcome.FAILED, "boom")]) == [True] * 2
        assert not await ledger.record_kept_outcomes()  # still unreachable
        locked_out.execute("COMMIT")
        assert await ledger.record_kept_outcomes()
        assert {"m0", "m1"}.isdisjoint(ledger.owned.held())  # their outcomes are recorded
        # Recording twice (a crash between recording and forgetting) changes nothing,
        # and never overwrites a later outcome.
        await ledger.finish([Finish(claims[2], Outcome.RESTARTED, "")])
        assert ledger.journal is not None
        await ledger.journal.keep(claims[2].restart_id, T0 + 9, Outcome.CANCELLED, "stale")
        assert await ledger.record_kept_outcomes()
        outcomes = {row.message_id: row.outcome for row in await ledger.history()}
        assert outcomes == {"m0": "restarted", "m1": "failed", "m2": "restarted"}
        assert await ledger.journal.entries() == []


async def test_without_a_journal_an_outcome_is_kept_in_memory_until_it_is_written(
    tmp_path: Path, locked_out: sqlite3.Connection
) -> None:
    async with running(str(tmp_path / "ledger.db")) as ledger:
        assert ledger.journal is None
        claimed = await decide_one(ledger, message("m1"))
        assert claimed.claim is not None
        locked_out.execute("BEGIN IMMEDIATE")
        # Not durable: the caller must not ack its message (the settler defers it).
        assert await ledger.finish([Finish(claimed.claim, Outcome.RESTARTED, "")]) == [False]
        locked_out.execute("COMMIT")
        assert await ledger.record_kept_outcomes()  # what a heartbeat does
        assert [row.outcome for row in await ledger.history()] == ["restarted"]
        assert "m1" not in ledger.owned.held()


async def test_an_in_memory_ledger_needs_no_journal() -> None:
    ledger = await open_ledger(":memory:", journal=AUTO)
    assert ledger.journal is None
    await ledger.aclose()


async def test_journal_lines_are_json(tmp_path: Path) -> None:
    journal = OutcomeJournal(tmp_path / "outcomes.jsonl", "ledger-a")
    await journal.keep(7, T0, Outcome.RESTARTED, "ok")
    assert json.loads(journal.path.read_text()) == {
        "ledger": "ledger-a", "restart_id": 7, "finished_at": T0,
        "outcome": "restarted", "detail": "ok", "reason": "",
    }


async def test_a_journal_path_naming_a_directory_is_refused_at_start(tmp_path: Path) -> None:
    # The outcome journal is checked by opening it for append: a directory, which is
    # writable as a directory, cannot take an outcome (found during an outage, too late).
    (tmp_path / "outcomes").mkdir()
    with pytest.raises(LedgerError, match="outcomes"):
        await open_ledger(str(tmp_path / "ledger.db"), journal=str(tmp_path / "outcomes"))
