"""The ledger contract, against every SQL ledger: SQLite (memory and file) and PostgreSQL."""

from __future__ import annotations

from mandrill.ledger import SQLLedger, open_ledger
from mandrill.ledger.base import DeadLetterRecord, Finish, Request
from mandrill.message import encode_payload
from mandrill.policy import Outcome, Reason, Refusal, Rules, Verdict
from tests.ledger import (
    HOUR,
    RULES,
    T0,
    WEEK,
    Clock,
    decide,
    decide_one,
    delivery,
    finish,
    message,
    running,
    verdict,
)


async def test_decided_messages_are_kept_for_replay(ledger: SQLLedger, clock: Clock) -> None:
    await decide(ledger, message("m1", "web-1"))
    clock.now = T0 + 10
    await decide(ledger, message("m2", "db-2"))

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


async def test_redelivery_counts_deliveries(ledger: SQLLedger, clock: Clock) -> None:
    first = await decide_one(ledger, message("m1"))
    for attempt in (1, 2):
        clock.now = T0 + attempt
        await decide_one(ledger, message("m1"))
    await finish(ledger, first, Outcome.RESTARTED)

    counts = await ledger.counts()
    assert (counts["messages_received"], counts["deliveries_received"]) == (1, 3)
    (saved,) = await ledger.saved_messages()
    assert saved.first_seen == T0


async def test_restart_then_skip_then_duplicate(ledger: SQLLedger, clock: Clock) -> None:
    first = await decide_one(ledger, message("m1"))
    assert verdict(first) == (Verdict.RESTART, "")
    assert first.claim is not None
    assert first.claim.failures == 0
    clock.now = T0 + 5
    await finish(ledger, first, Outcome.RESTARTED, "ok")

    clock.now = T0 + HOUR
    second = await decide_one(ledger, message("m2"))
    assert verdict(second) == (Verdict.SKIP, "host restarted 1h ago")
    assert second.decision is not None
    assert second.decision.reason is Reason.INTERVAL
    assert second.claim is None

    history = await ledger.history(hostname="web-1.example.net")
    assert [(h.message_id, h.outcome, h.detail) for h in history] == [
        ("m2", "skipped", "host restarted 1h ago"),
        ("m1", "restarted", "ok"),
    ]
    assert history[0].finished_at == T0 + HOUR
    assert (history[1].decided_at, history[1].finished_at) == (T0, T0 + 5)

    clock.now = T0 + 2 * HOUR
    again = await decide_one(ledger, message("m1"))
    assert verdict(again) == (Verdict.DUPLICATE, "already restarted")
    skipped_again = await decide_one(ledger, message("m2"))
    assert verdict(skipped_again)[0] is Verdict.DUPLICATE
    counts = await ledger.counts()
    assert (counts["restarts_restarted"], counts["restarts_skipped"]) == (1, 1)


async def test_interval_is_per_host(ledger: SQLLedger, clock: Clock) -> None:
    web, db = await decide(ledger, message("m1", "web-1"), message("m2", "db-1"))
    assert verdict(web)[0] is verdict(db)[0] is Verdict.RESTART
    await finish(ledger, web, Outcome.RESTARTED)
    await finish(ledger, db, Outcome.RESTARTED)

    clock.now = T0 + WEEK + 1
    assert verdict(await decide_one(ledger, message("m3", "web-1")))[0] is Verdict.RESTART


async def test_failed_restart_is_retried_and_counted(ledger: SQLLedger, clock: Clock) -> None:
    first = await decide_one(ledger, message("m1"))
    await finish(ledger, first, Outcome.FAILED, "timed out")

    clock.now = T0 + 60
    retry = await decide_one(ledger, message("m1"))
    assert verdict(retry)[0] is Verdict.RESTART
    assert retry.claim is not None
    assert first.claim is not None
    assert retry.claim.failures == 1
    assert retry.claim.restart_id != first.claim.restart_id
    await finish(ledger, retry, Outcome.RESTARTED)


async def test_a_live_claim_makes_its_message_busy(ledger: SQLLedger, clock: Clock) -> None:
    first = await decide_one(ledger, message("m1"))
    clock.now = T0 + HOUR
    busy = await decide_one(ledger, message("m1"))
    assert verdict(busy) == (Verdict.BUSY, "a restart for this message is under way")
    assert busy.decision is not None
    assert busy.decision.reason is Reason.MESSAGE_UNDER_WAY
    assert busy.claim is None
    await finish(ledger, first, Outcome.RESTARTED)


async def test_a_restart_under_way_does_not_count_as_done(
    ledger: SQLLedger, clock: Clock
) -> None:
    # Issue 10, bug 1: a second message for a host whose restart is under way was skipped
    # as "host restarted 0s ago"; when that restart then failed, the host was never
    # restarted. It now waits for the outcome.
    first = await decide_one(ledger, message("m1"))
    waiting = await decide_one(ledger, message("m2"))
    assert verdict(waiting) == (
        Verdict.BUSY, "host is being restarted (message m1); waiting for it",
    )
    assert waiting.claim is None
    assert [h.message_id for h in await ledger.history()] == ["m1"]  # nothing recorded

    clock.now = T0 + 5
    await finish(ledger, first, Outcome.FAILED, "exit 1")
    clock.now = T0 + 10
    decided = await decide_one(ledger, message("m2"))
    assert verdict(decided)[0] is Verdict.RESTART
    await finish(ledger, decided, Outcome.RESTARTED)


async def test_a_message_waiting_on_a_successful_restart_is_then_skipped(
    ledger: SQLLedger, clock: Clock
) -> None:
    first = await decide_one(ledger, message("m1"))
    clock.now = T0 + 1
    assert verdict(await decide_one(ledger, message("m2")))[0] is Verdict.BUSY
    clock.now = T0 + 5
    await finish(ledger, first, Outcome.RESTARTED, "exit 0")

    clock.now = T0 + 10
    later = await decide_one(ledger, message("m2"))
    assert verdict(later) == (Verdict.SKIP, "host restarted 10s ago")


async def test_a_refusal_is_recorded_as_a_skip_without_a_claim(ledger: SQLLedger) -> None:
    refusal = Refusal(Reason.EXCLUDED, "host excluded by pattern 'web-*'")
    (refused,) = await ledger.decide([Request(message("m1"), refusal)], RULES)
    assert refused.decision is not None
    assert (refused.decision.verdict, refused.decision.reason) == (Verdict.SKIP, Reason.EXCLUDED)
    assert refused.claim is None

    (row,) = await ledger.history()
    assert (row.outcome, row.detail, row.finished_at) == ("skipped", refusal.detail, T0)
    again = await decide_one(ledger, message("m1"))
    assert verdict(again) == (Verdict.DUPLICATE, "already skipped")
    (saved,) = await ledger.saved_messages()
    assert saved.message_id == "m1"


async def test_dead_letters_keep_the_delivery_and_reason(
    ledger: SQLLedger, clock: Clock
) -> None:
    await ledger.dead_letter([DeadLetterRecord(
        delivery("bad", data=b"\xff not json"), Reason.INVALID, "invalid: payload is not JSON"
    )])
    failing = await decide_one(ledger, message("m1"))
    assert failing.claim is not None
    clock.now = T0 + 1
    await ledger.dead_letter([DeadLetterRecord(
        delivery("m1"), Reason.MAX_ATTEMPTS, "restart failed 5 times",
        Finish(failing.claim, Outcome.FAILED, "exit 1"),
    )])

    dead = await ledger.saved_messages(status="dead_letter")
    assert [(d.message_id, d.reason) for d in dead] == [
        ("bad", "invalid: payload is not JSON"),
        ("m1", "restart failed 5 times"),
    ]
    assert dead[0].data == b"\xff not json"
    assert dead[0].hostname is None
    assert dead[1].hostname == "web-1.example.net"
    assert [(h.message_id, h.outcome) for h in await ledger.history()] == [("m1", "failed")]
    assert len(ledger.owned) == 0  # the claim's outcome is recorded: not held any more


async def test_counts_by_outcome_and_status(ledger: SQLLedger) -> None:
    first, second, third = await decide(
        ledger, message("m1", "a"), message("m2", "a"), message("m3", "b")
    )
    await finish(ledger, first, Outcome.RESTARTED)
    assert verdict(second)[0] is Verdict.BUSY
    assert await ledger.counts() == {
        "messages_received": 3,
        "deliveries_received": 3,
        "restarts_restarted": 1,
        "restarts_restarting": 1,
    }
    await finish(ledger, third, Outcome.RESTARTED)


async def test_history_filters_and_limit(ledger: SQLLedger, clock: Clock) -> None:
    for i in range(5):
        clock.now = T0 + i
        await finish(ledger, await decide_one(ledger, message(f"m{i}", f"host-{i}")),
                     Outcome.RESTARTED)

    assert [h.message_id for h in await ledger.history(limit=2)] == ["m4", "m3"]
    assert [h.message_id for h in await ledger.history(since=T0 + 3)] == ["m4", "m3"]
    assert [h.hostname for h in await ledger.history(hostname="host-1.example.net")] == [
        "host-1.example.net"
    ]


async def test_history_of_outcomes(ledger: SQLLedger, clock: Clock) -> None:
    """For `mandrill history --outcome`: the filter applies before the limit."""
    for i in range(4):
        clock.now = T0 + i
        claimed = await decide_one(ledger, message(f"m{i}", f"host-{i}"))
        await finish(ledger, claimed, Outcome.FAILED if i % 2 else Outcome.RESTARTED)

    failed = await ledger.history_of_outcomes({"failed"}, limit=10)
    assert [h.message_id for h in failed] == ["m3", "m1"]
    both = await ledger.history_of_outcomes({"failed", "restarted"}, since=T0 + 1, limit=2)
    assert [h.message_id for h in both] == ["m3", "m2"]
    one_host = await ledger.history_of_outcomes({"restarted"}, hostname="host-2.example.net")
    assert [h.message_id for h in one_host] == ["m2"]


async def test_an_unknown_restart_is_retried_only_when_told(
    ledger: SQLLedger, clock: Clock
) -> None:
    claimed = await decide_one(ledger, message("m1"))
    await finish(ledger, claimed, Outcome.UNKNOWN, "interrupted")
    counted = await decide_one(ledger, message("m2"))
    assert verdict(counted) == (Verdict.SKIP, "host restarted 0s ago")
    retried = await decide_one(ledger, message("m1"), rules=Rules(WEEK, retry_unknown=True))
    assert verdict(retried)[0] is Verdict.RESTART
    assert retried.claim is not None
    assert retried.claim.failures == 1
    await finish(ledger, retried, Outcome.RESTARTED)


async def test_reopened_ledger_keeps_its_records(durable_url: str) -> None:
    for attempt in range(2):
        async with running(durable_url) as opened:
            (decided,) = await decide(opened, message("m1"))
            if attempt == 0:
                await finish(opened, decided, Outcome.RESTARTED)
    reopened = await open_ledger(durable_url)
    try:
        counts = await reopened.counts()
        assert (counts["messages_received"], counts["deliveries_received"]) == (1, 2)
        assert counts["restarts_restarted"] == 1
    finally:
        await reopened.aclose()
