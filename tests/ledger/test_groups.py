"""``--max-concurrent-restarts-per-group`` in the ledger: never more live claims in a group
than its limit, fleet-wide; a message over it is deferred (it comes back), its group
recorded on every row. Against SQLite (memory, file) and PostgreSQL; the property test
with two daemons on one SQLite file or one PostgreSQL schema."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mandrill.grouping import GroupLimit, parse_group_by
from mandrill.ledger import SQLLedger, groups, open_ledger, sql
from mandrill.ledger.base import Decided, Request
from mandrill.ledger.sqlite import DIALECT as SQLITE
from mandrill.message import Message
from mandrill.policy import Outcome, Reason, Refusal, Rules, Settlement, Verdict, settlement_for
from tests.ledger import HOUR, WEEK, Clock, decide, finish, message, running, verdict

ZONES = Rules(WEEK, groups=GroupLimit(parse_group_by("attribute:zone"), 2))


def in_zone(message_id: str, instance: str, zone: str | None) -> Message:
    msg = message(message_id, instance)
    return msg._replace(attributes={} if zone is None else {"zone": zone})


def held_by_group(decided: Decided) -> bool:
    decision = decided.decision
    assert decision is not None, decided.error
    if decision.reason is not Reason.GROUP_LIMIT:
        return False
    assert decision.verdict is Verdict.BUSY
    assert settlement_for(decision) is Settlement.DEFER
    assert decided.claim is None
    return True


async def live_claims_by_group(ledger: SQLLedger) -> Counter[str | None]:
    def count(cur: Any) -> list[tuple[Any, ...]]:
        cur.execute("SELECT group_name FROM restarts WHERE outcome = 'restarting'")
        return list(cur.fetchall())

    return Counter(group for (group,) in await ledger._tx.query(count))


async def test_a_group_at_its_limit_defers_the_next_restart(ledger_url: str) -> None:
    async with running(ledger_url, Clock()) as ledger:
        first = await decide(
            ledger, in_zone("m1", "a1", "a"), in_zone("m2", "a2", "a"), in_zone("m3", "a3", "a"),
            in_zone("m4", "b1", "b"), rules=ZONES,
        )
        assert [held_by_group(d) for d in first] == [False, False, True, False]
        assert first[2].decision is not None
        assert first[2].decision.detail == (
            "group 'a' at its limit: 2 restarts under way (limit 2 per group)"
        )
        # Across transactions too, and messages without the attribute are one group.
        again = await decide(ledger, in_zone("m3", "a3", "a"), in_zone("m5", "x1", None),
                             in_zone("m6", "x2", None), in_zone("m7", "x3", None), rules=ZONES)
        assert [held_by_group(d) for d in again] == [True, False, False, True]
        assert await live_claims_by_group(ledger) == {"a": 2, "b": 1, "": 2}

        # A restart that ends frees its place.
        await finish(ledger, first[0], Outcome.FAILED)
        (third,) = await decide(ledger, in_zone("m3", "a3", "a"), rules=ZONES)
        assert verdict(third)[0] is Verdict.RESTART
        for decided in (first[1], first[3], again[1], again[2], third):
            await finish(ledger, decided, Outcome.RESTARTED)

        # Every row records its group: claims, and skips (here a safety control's).
        refused = Request(in_zone("m8", "b2", "b"), Refusal(Reason.EXCLUDED, "excluded"))
        await ledger.decide([refused], ZONES)

        def groups(cur: Any) -> list[tuple[Any, ...]]:
            cur.execute("SELECT message_id, outcome, group_name FROM restarts ORDER BY id")
            return list(cur.fetchall())

        assert await ledger._tx.query(groups) == [
            ("m1", "failed", "a"), ("m2", "restarted", "a"), ("m4", "restarted", "b"),
            ("m5", "restarted", ""), ("m6", "restarted", ""), ("m3", "restarted", "a"),
            ("m8", "skipped", "b"),
        ]


async def test_without_groups_no_group_is_recorded(ledger_url: str) -> None:
    async with running(ledger_url, Clock()) as ledger:
        results = await decide(ledger, in_zone("m1", "a1", "a"), in_zone("m2", "a2", "a"),
                               in_zone("m3", "a3", "a"))
        assert [verdict(d)[0] for d in results] == [Verdict.RESTART] * 3
        assert await live_claims_by_group(ledger) == {None: 3}
        for decided in results:
            await finish(ledger, decided, Outcome.RESTARTED)


async def test_the_count_of_a_groups_claims_reads_an_index_of_grouped_claims_only(
    tmp_path: Path,
) -> None:
    """Claims without a group (no ``--group-by``, the common case) are not in the index
    (writing it cost every claim and every outcome), and the count still reads it."""
    path = tmp_path / "ledger.db"
    await (await open_ledger(str(path))).aclose()
    plans: list[str] = []
    with sqlite3.connect(path) as conn:

        class Explaining:
            def __init__(self) -> None:
                self._cur = conn.cursor()

            def execute(self, text: str, params: Any = ()) -> Any:
                plans.extend(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + text, params))
                return self._cur.execute(text, params)

            def fetchall(self) -> list[Any]:
                return self._cur.fetchall()

        groups.UnderWay.read(Explaining(), SQLITE, ZONES.groups,  # type: ignore[arg-type]
                             {"a", "b"}, lambda *owner: False)
        (index,) = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'restarts_under_way_by_group'"
        ).fetchone()
    assert any("USING INDEX restarts_under_way_by_group" in plan for plan in plans), plans
    assert "group_name IS NOT NULL" in index


async def test_a_dead_daemons_claim_holds_no_place(ledger_url: str) -> None:
    clock = Clock()
    async with running(ledger_url, clock, instance_timeout=30.0) as ledger:
        def orphan(cur: Any) -> None:
            sql.insert_many(cur, ledger._d, [sql.restart_row(
                "", in_zone("m0", "a0", "a"), clock.now - HOUR, Outcome.RESTARTING, "",
                finished=False, owner="ghost", group="a",
            )])
        await ledger._tx.run(orphan)
        results = await decide(ledger, in_zone("m1", "a1", "a"), in_zone("m2", "a2", "a"),
                               rules=ZONES)
        assert [verdict(d)[0] for d in results] == [Verdict.RESTART] * 2
        for decided in results:
            await finish(ledger, decided, Outcome.RESTARTED)


# -- the property: random arrivals and completions, two daemons ------------------------------

#: One example: the hosts' zones (None: no attribute), the limit, then the steps.
HOSTS = st.lists(st.sampled_from(["a", "b", "c", None]), min_size=3, max_size=9)


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
async def test_never_more_than_the_limit_in_a_group_and_each_restarted_once(
    durable_url: str, data: st.DataObject
) -> None:
    """Messages of several groups reach two daemons in random orders and batches (sometimes
    both deciding at once), restarts end in a random order; after every step, no group has
    more live claims than its limit; in the end every message was restarted exactly once."""
    zones = data.draw(HOSTS, label="zones")
    limit = data.draw(st.integers(1, 2), label="limit")
    rules = Rules(WEEK, groups=GroupLimit(parse_group_by("attribute:zone"), limit))
    messages = [in_zone(f"m{i}", f"host-{i}", zone) for i, zone in enumerate(zones)]
    clock = Clock()
    async with running(durable_url, clock) as a, running(durable_url, clock) as b:
        await _clear(a)
        daemons = (a, b)
        under_way: list[tuple[SQLLedger, Decided]] = []
        done: set[str] = set()

        async def deliver(ledger: SQLLedger, batch: list[Message]) -> None:
            for msg, decided in zip(batch, await decide(ledger, *batch, rules=rules,
                                                       beat=False), strict=True):
                kind = verdict(decided)[0]
                assert kind in (Verdict.RESTART, Verdict.BUSY), decided
                if kind is Verdict.RESTART:
                    assert msg.message_id not in done
                    under_way.append((ledger, decided))

        async def check() -> None:
            live = await live_claims_by_group(a)
            assert max(live.values(), default=0) <= limit, live
            assert sum(live.values()) == len(under_way)

        def waiting() -> list[Message]:
            return [m for m in messages if m.message_id not in done]

        async def complete(index: int) -> None:
            ledger, decided = under_way.pop(index)
            await finish(ledger, decided, Outcome.RESTARTED)
            assert decided.claim is not None
            done.add(decided.claim.message_id)

        for ledger in daemons:
            await ledger._beat()
        # Every step draws the same shape whatever the ledger decided: which daemon wins a
        # concurrent claim is not up to Hypothesis, so no draw may depend on it.
        for _ in range(data.draw(st.integers(1, 25), label="steps")):
            action = data.draw(st.sampled_from(["one", "both", "complete"]), label="action")
            which = data.draw(st.integers(0, 99), label="which")
            picks = [data.draw(st.lists(st.integers(0, len(messages) - 1), min_size=1,
                                        max_size=4), label="batch") for _ in range(2)]
            first = data.draw(st.integers(0, 1), label="daemon")
            if action == "complete" and under_way:
                await complete(which % len(under_way))
            elif action != "complete":
                left = waiting()
                batches = [[left[i % len(left)] for i in pick] for pick in picks] if left else []
                async with anyio.create_task_group() as tg:
                    for i, batch in enumerate(batches[: 2 if action == "both" else 1]):
                        tg.start_soon(deliver, daemons[(first + i) % 2], batch)
            await check()

        # Then everything arrives and ends, until nothing is left.
        rounds = 0
        while waiting():
            rounds += 1
            assert rounds <= 2 * len(messages) + 2
            while under_way:
                await complete(0)
            await deliver(daemons[rounds % 2], waiting())
            await check()

        restarted = Counter(h.message_id for h in await a.history(limit=1000)
                            if h.outcome == Outcome.RESTARTED)
        assert restarted == {m.message_id: 1 for m in messages}


async def _clear(ledger: SQLLedger) -> None:
    """A fresh ledger for each example (they share the test's database)."""
    def clear(cur: Any) -> None:
        for table in ("restarts", "messages", "breakers"):
            cur.execute(f"DELETE FROM {table}")

    await ledger._tx.run(clear)
