"""The ledger contract, against every SQL ledger: SQLite (memory and file) and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from mandrill.errors import LedgerError
from mandrill.ledger import SQLLedger, open_ledger, reads, sql
from mandrill.ledger.batch import Batcher, Database
from mandrill.ledger.ops import Op
from mandrill.ledger.postgres import PostgresDatabase
from mandrill.ledger.sqlite import SQLiteDatabase
from mandrill.message import encode_payload
from mandrill.policy import Outcome, Verdict
from tests.ledger import HOUR, T0, WEEK, delivery, message, writing


@pytest.fixture
async def ledger(ledger_url: str) -> AsyncIterator[SQLLedger]:
    async with writing(await open_ledger(ledger_url)) as opened:
        yield opened


async def test_saved_messages_are_kept_for_replay(ledger: SQLLedger) -> None:
    await ledger.save(message("m1", "web-1"), T0)
    await ledger.save(message("m2", "db-2"), T0 + 10)

    saved = await ledger.saved_messages()
    assert [s.message_id for s in saved] == ["m1", "m2"]
    first = saved[0]
    assert first.data == encode_payload("web-1")
    assert first.attributes == {"origin": "test"}
    assert first.hostname == "web-1.example.net"
    assert first.first_seen == T0
    assert (first.status, first.reason) == ("received", "")

    by_host = await ledger.saved_messages(hostname="db-2.example.net")
    assert [s.message_id for s in by_host] == ["m2"]
    assert [s.message_id for s in await ledger.saved_messages(since=T0 + 1)] == ["m2"]
    assert [s.message_id for s in await ledger.saved_messages(until=T0 + 1)] == ["m1"]
    assert await ledger.saved_messages(status="dead_letter") == []
    assert await ledger.history() == []


async def test_redelivery_counts_deliveries(ledger: SQLLedger) -> None:
    for attempt in range(3):
        await ledger.save(message("m1"), T0 + attempt)

    assert await ledger.counts() == {"messages_received": 1, "deliveries_received": 3}
    (saved,) = await ledger.saved_messages()
    assert saved.first_seen == T0


async def test_restart_then_skip_then_duplicate(ledger: SQLLedger) -> None:
    first = await ledger.claim(message("m1"), T0, WEEK)
    assert first.decision.verdict is Verdict.RESTART
    assert first.restart_id is not None
    await ledger.finish(first.restart_id, T0 + 5, Outcome.RESTARTED, "ok")

    second = await ledger.claim(message("m2"), T0 + HOUR, WEEK)
    assert second.decision.verdict is Verdict.SKIP
    assert second.decision.reason == "host restarted 1h ago"
    assert second.restart_id is None

    history = await ledger.history(hostname="web-1.example.net")
    assert [(h.message_id, h.outcome, h.detail) for h in history] == [
        ("m2", "skipped", "host restarted 1h ago"),
        ("m1", "restarted", "ok"),
    ]
    assert history[0].finished_at == T0 + HOUR
    assert (history[1].decided_at, history[1].finished_at) == (T0, T0 + 5)

    again = await ledger.claim(message("m1"), T0 + 2 * HOUR, WEEK)
    assert (again.decision.verdict, again.decision.reason) == (
        Verdict.DUPLICATE,
        "already restarted",
    )
    skipped_again = await ledger.claim(message("m2"), T0 + 2 * HOUR, WEEK)
    assert skipped_again.decision.verdict is Verdict.DUPLICATE
    assert await ledger.counts() == {"restarts_restarted": 1, "restarts_skipped": 1}


async def test_interval_is_per_host(ledger: SQLLedger) -> None:
    web = await ledger.claim(message("m1", "web-1"), T0, WEEK)
    db = await ledger.claim(message("m2", "db-1"), T0, WEEK)
    assert web.decision.verdict is db.decision.verdict is Verdict.RESTART
    assert web.restart_id is not None
    await ledger.finish(web.restart_id, T0 + 1, Outcome.RESTARTED, "")

    later = await ledger.claim(message("m3", "web-1"), T0 + WEEK + 1, WEEK)
    assert later.decision.verdict is Verdict.RESTART


async def test_failed_restart_is_retried_and_counted(ledger: SQLLedger) -> None:
    first = await ledger.claim(message("m1"), T0, WEEK)
    assert first.restart_id is not None
    await ledger.finish(first.restart_id, T0 + 1, Outcome.FAILED, "timed out")

    retry = await ledger.claim(message("m1"), T0 + 60, WEEK)
    assert retry.decision.verdict is Verdict.RESTART
    assert retry.decision.failures == 1
    assert retry.restart_id not in (None, first.restart_id)


async def test_a_live_claim_makes_its_message_busy(ledger: SQLLedger) -> None:
    first = await ledger.claim(message("m1"), T0, WEEK)
    assert first.decision.verdict is Verdict.RESTART

    busy = await ledger.claim(message("m1"), T0 + HOUR, WEEK)
    assert busy.decision.verdict is Verdict.BUSY
    assert busy.restart_id is None


async def test_a_restart_under_way_does_not_count_as_done(ledger: SQLLedger) -> None:
    # Issue 10, bug 1: a second message for a host whose restart is under way was skipped
    # as "host restarted 0s ago"; when that restart then failed, the host was never
    # restarted. It now waits for the outcome.
    first = await ledger.claim(message("m1"), T0, WEEK)
    assert first.restart_id is not None
    waiting = await ledger.claim(message("m2"), T0, WEEK)
    assert (waiting.decision.verdict, waiting.decision.reason) == (
        Verdict.BUSY,
        "host is being restarted (message m1); waiting for it",
    )
    assert waiting.restart_id is None
    assert [h.message_id for h in await ledger.history()] == ["m1"]  # nothing recorded

    await ledger.finish(first.restart_id, T0 + 5, Outcome.FAILED, "exit 1")
    decided = await ledger.claim(message("m2"), T0 + 10, WEEK)
    assert decided.decision.verdict is Verdict.RESTART


async def test_a_message_waiting_on_a_successful_restart_is_then_skipped(
    ledger: SQLLedger,
) -> None:
    first = await ledger.claim(message("m1"), T0, WEEK)
    assert first.restart_id is not None
    assert (await ledger.claim(message("m2"), T0 + 1, WEEK)).decision.verdict is Verdict.BUSY
    await ledger.finish(first.restart_id, T0 + 5, Outcome.RESTARTED, "exit 0")

    later = await ledger.claim(message("m2"), T0 + 10, WEEK)
    assert (later.decision.verdict, later.decision.reason) == (
        Verdict.SKIP,
        "host restarted 10s ago",
    )


async def test_record_keeps_an_early_decision(ledger: SQLLedger) -> None:
    await ledger.record(message("m1"), T0, Outcome.SKIPPED, "host is in the deny list")

    (row,) = await ledger.history()
    assert (row.outcome, row.detail, row.finished_at) == ("skipped", "host is in the deny list", T0)
    again = await ledger.claim(message("m1"), T0 + 1, WEEK)
    assert again.decision.verdict is Verdict.DUPLICATE


async def test_dead_letter_keeps_the_delivery_and_reason(ledger: SQLLedger) -> None:
    await ledger.dead_letter(delivery("bad", data=b"\xff not json"), T0, "payload is not JSON")
    await ledger.save(message("m1"), T0)
    await ledger.dead_letter(delivery("m1"), T0 + 1, "too many failed restarts")

    dead = await ledger.saved_messages(status="dead_letter")
    assert [(d.message_id, d.reason) for d in dead] == [
        ("bad", "payload is not JSON"),
        ("m1", "too many failed restarts"),
    ]
    assert dead[0].data == b"\xff not json"
    assert dead[0].hostname is None
    assert dead[1].hostname == "web-1.example.net"
    assert await ledger.counts() == {"messages_dead_letter": 2, "deliveries_dead_letter": 3}


async def test_counts_by_outcome_and_status(ledger: SQLLedger) -> None:
    await ledger.save(message("m1", "a"), T0)
    await ledger.save(message("m2", "a"), T0)
    await ledger.save(message("m2", "a"), T0 + 1)
    claim = await ledger.claim(message("m1", "a"), T0, WEEK)
    assert claim.restart_id is not None
    await ledger.finish(claim.restart_id, T0 + 1, Outcome.RESTARTED, "")
    await ledger.claim(message("m2", "a"), T0, WEEK)
    await ledger.claim(message("m3", "b"), T0, WEEK)

    assert await ledger.counts() == {
        "messages_received": 2,
        "deliveries_received": 3,
        "restarts_restarted": 1,
        "restarts_skipped": 1,
        "restarts_restarting": 1,
    }


async def test_history_filters_and_limit(ledger: SQLLedger) -> None:
    for i in range(5):
        await ledger.claim(message(f"m{i}", f"host-{i}"), T0 + i, WEEK)

    assert [h.message_id for h in await ledger.history(limit=2)] == ["m4", "m3"]
    assert [h.message_id for h in await ledger.history(since=T0 + 3)] == ["m4", "m3"]
    assert [h.hostname for h in await ledger.history(hostname="host-1.example.net")] == [
        "host-1.example.net"
    ]


async def test_history_of_outcomes(ledger: SQLLedger) -> None:
    """For `mandrill history --outcome`: the filter applies before the limit."""
    for i in range(4):
        claim = await ledger.claim(message(f"m{i}", f"host-{i}"), T0 + i, WEEK)
        assert claim.restart_id is not None
        outcome = Outcome.FAILED if i % 2 else Outcome.RESTARTED
        await ledger.finish(claim.restart_id, T0 + i, outcome, "")

    failed = await ledger.history_of_outcomes({"failed"}, limit=10)
    assert [h.message_id for h in failed] == ["m3", "m1"]
    both = await ledger.history_of_outcomes({"failed", "restarted"}, since=T0 + 1, limit=2)
    assert [h.message_id for h in both] == ["m3", "m2"]
    one_host = await ledger.history_of_outcomes({"restarted"}, hostname="host-2.example.net")
    assert [h.message_id for h in one_host] == ["m2"]


async def test_save_and_claim_in_one_batch(ledger: SQLLedger) -> None:
    saved = ledger.save(message("m1"), T0)  # queued now, committed with the claim
    claim = await ledger.claim(message("m1"), T0, WEEK)
    await saved

    assert claim.decision.verdict is Verdict.RESTART
    assert await ledger.counts() == {
        "messages_received": 1,
        "deliveries_received": 1,
        "restarts_restarting": 1,
    }


async def test_reopened_ledger_keeps_its_records(durable_url: str) -> None:
    for _ in range(2):
        opened = await open_ledger(durable_url)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(opened.run)
                await opened.save(message("m1"), T0)
                tg.cancel_scope.cancel()
        finally:
            await opened.aclose()
    reopened = await open_ledger(durable_url)
    try:
        assert await reopened.counts() == {"messages_received": 1, "deliveries_received": 2}
    finally:
        await reopened.aclose()


def open_database(url: str) -> tuple[Database, sql.Dialect]:
    if url.startswith("postgresql://"):
        from mandrill.ledger.postgres import DIALECT as POSTGRES

        return PostgresDatabase(url), POSTGRES
    from mandrill.ledger.sqlite import DIALECT as SQLITE

    return SQLiteDatabase(url), SQLITE


async def test_a_failing_op_fails_alone(ledger_url: str) -> None:
    db, dialect = await anyio.to_thread.run_sync(open_database, ledger_url)
    batcher = Batcher(db)

    def missing_table(cur: Any) -> None:
        cur.execute("SELECT * FROM no_such_table")

    def bug(cur: Any) -> None:
        sql.save(cur, dialect, "", message("half-done"), T0)
        raise RuntimeError("a bug\nover two lines")

    try:
        async with anyio.create_task_group() as tg:
            # Queued before the batcher runs, so all five share one batch (one transaction).
            ops: list[Op[Any]] = [
                batcher.submit(lambda cur: sql.save(cur, dialect, "", message("m1"), T0)),
                batcher.submit(missing_table),
                batcher.submit(bug),
                batcher.submit(lambda cur: sql.save(cur, dialect, "", message("m2"), T0)),
                batcher.submit(lambda cur: 42),
            ]
            await tg.start(batcher.run)
            assert await ops[0] is None
            with pytest.raises(LedgerError, match="no_such_table"):
                await ops[1]
            with pytest.raises(LedgerError, match=r"^ledger write failed: a bug over two lines$"):
                await ops[2]
            assert await ops[3] is None
            assert await ops[4] == 42
            tg.cancel_scope.cancel()

        # The failed ops left nothing behind; their batch-mates were committed.
        saved = await batcher.query(
            lambda cur: reads.saved_messages(cur, dialect, None, None, None, None)
        )
        assert [s.message_id for s in saved] == ["m1", "m2"]
    finally:
        await anyio.to_thread.run_sync(db.close)
