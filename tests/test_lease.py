"""The lease keeper, directly: one request per tick for the leases due, the rest left alone,
leases held past the maximum abandoned; run() keeps a lease alive past many deadlines.

Durations are in units of the ``unit`` fixture: free under trio's autojumping MockClock,
short real time on asyncio."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import anyio
import pytest

from mandrill.holdings import Holdings
from mandrill.lease import LeaseKeeper
from mandrill.message import Delivery
from mandrill.obs.counters import Counters

pytestmark = pytest.mark.autojump


class RecordingSource:
    """A source whose only work is to record lease extensions."""

    keeps_dead_letters = False

    def __init__(self, ack_deadline: float) -> None:
        self.ack_deadline = ack_deadline
        self.extensions: list[tuple[list[str], float]] = []

    async def pull(self, max_messages: int) -> Sequence[Delivery]:
        raise AssertionError("the lease keeper never pulls")

    async def acknowledge(self, ack_ids: Sequence[str]) -> None:
        raise AssertionError("the lease keeper never acks")

    async def modify_ack_deadline(self, ack_ids: Sequence[str], seconds: float) -> None:
        self.extensions.append((list(ack_ids), seconds))

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        raise AssertionError("the lease keeper never dead-letters")


def delivery(ack_id: str, attributes: Mapping[str, str] | None = None) -> Delivery:
    return Delivery(ack_id, f"m-{ack_id}", b"{}", attributes or {}, datetime.now(UTC))


def keeper_for(
    unit: float, *, max_lease: float = 100.0
) -> tuple[LeaseKeeper, RecordingSource, Holdings, Counters]:
    source = RecordingSource(ack_deadline=10 * unit)
    holdings = Holdings(16)
    counters = Counters()
    keeper = LeaseKeeper(source, holdings, counters, max_lease=max_lease * unit)
    return keeper, source, holdings, counters


async def test_a_tick_extends_every_lease_due_in_one_request(unit):
    keeper, source, holdings, counters = keeper_for(unit)
    now = anyio.current_time()
    holdings.add(delivery("a"), now, 2 * unit)  # due: expires within the margin (5)
    holdings.add(delivery("b"), now, 4 * unit)  # due
    holdings.add(delivery("c"), now, 9 * unit)  # not yet

    await keeper.tick()

    assert source.extensions == [(["a", "b"], keeper.extension)]
    assert keeper.extension == 10 * unit
    assert counters.lease_extensions == 2
    leases = {ack_id: expires for ack_id, expires, _ in holdings.leases()}
    # Counted from before the request, and only for the leases extended.
    assert leases["a"] == leases["b"] == pytest.approx(now + 10 * unit, abs=unit)
    assert leases["c"] == now + 9 * unit


async def test_a_tick_with_nothing_due_sends_nothing(unit):
    keeper, source, holdings, counters = keeper_for(unit)
    holdings.add(delivery("a"), anyio.current_time(), 9 * unit)
    await keeper.tick()
    assert source.extensions == []
    assert counters.lease_extensions == 0


async def test_leases_held_past_the_maximum_are_abandoned(unit):
    keeper, source, holdings, counters = keeper_for(unit, max_lease=20)
    now = anyio.current_time()
    holdings.add(delivery("old"), now - 25 * unit, 1 * unit)  # held 25 > 20: let go
    holdings.add(delivery("young"), now, 1 * unit)

    await keeper.tick()

    assert source.extensions == [(["young"], keeper.extension)]
    assert counters.leases_abandoned == 1
    # Still held (the worker may finish and settle it), but never extended again.
    assert "old" in holdings
    assert [ack_id for ack_id, _, _ in holdings.leases()] == ["young"]
    await anyio.sleep(keeper.margin + unit)
    await keeper.tick()
    assert all("old" not in ack_ids for ack_ids, _ in source.extensions)


async def test_run_keeps_a_lease_alive_until_the_maximum(unit):
    keeper, source, holdings, counters = keeper_for(unit, max_lease=60)
    holdings.add(delivery("a"), anyio.current_time(), 10 * unit)
    async with anyio.create_task_group() as tg:
        await tg.start(keeper.run)
        # Past the first lease's end, many times over, and past the maximum lease.
        await anyio.sleep(80 * unit)
        tg.cancel_scope.cancel()
    extended_at = [ack_ids for ack_ids, _ in source.extensions]
    assert extended_at == [["a"]] * len(extended_at)
    # At least one extension per ack deadline until the maximum lease (60 / 10)...
    assert len(extended_at) >= 6
    # ...then none: it was abandoned once.
    assert counters.leases_abandoned == 1
    assert list(holdings.leases()) == []
