import anyio
import pytest

from mandrill.sources.memory import MemoryBroker

pytestmark = pytest.mark.autojump


async def publish(broker: MemoryBroker, n: int) -> list[str]:
    return await broker.publish([(f"m{i}".encode(), {"i": str(i)}) for i in range(n)])


async def test_pull_leases_and_ack_settles(unit):
    broker = MemoryBroker(ack_deadline=10, pull_wait=unit)
    ids = await publish(broker, 3)
    deliveries = await broker.pull(10)
    assert [d.message_id for d in deliveries] == ids
    assert all(d.delivery_attempt == 1 for d in deliveries)
    await broker.acknowledge([d.ack_id for d in deliveries])
    assert broker.backlog == 0
    assert await broker.pull(10) == []


async def test_pull_respects_max_messages():
    broker = MemoryBroker()
    await publish(broker, 5)
    assert len(await broker.pull(2)) == 2
    assert len(await broker.pull(10)) == 3


async def test_nack_redelivers_at_once_with_the_next_attempt():
    broker = MemoryBroker(ack_deadline=600)
    await publish(broker, 1)
    (first,) = await broker.pull(1)
    await broker.modify_ack_deadline([first.ack_id], 0)
    with anyio.fail_after(1):
        (again,) = await broker.pull(1)
    assert again.message_id == first.message_id
    assert again.ack_id != first.ack_id
    assert again.delivery_attempt == 2


async def test_expired_lease_is_redelivered_after_the_deadline(unit):
    broker = MemoryBroker(ack_deadline=10 * unit, pull_wait=60 * unit)
    await publish(broker, 1)
    (first,) = await broker.pull(1)
    started = anyio.current_time()
    (again,) = await broker.pull(1)
    assert anyio.current_time() - started == pytest.approx(10 * unit, rel=0.5)
    assert again.delivery_attempt == 2
    # The stale ack id no longer settles anything.
    await broker.acknowledge([first.ack_id])
    assert broker.backlog == 1


async def test_extending_the_deadline_prevents_redelivery(unit):
    broker = MemoryBroker(ack_deadline=10 * unit, pull_wait=15 * unit)
    await publish(broker, 1)
    (first,) = await broker.pull(1)
    await anyio.sleep(8 * unit)
    await broker.modify_ack_deadline([first.ack_id], 20 * unit)
    assert await broker.pull(1) == []  # waited 15 s: past the original deadline
    await broker.acknowledge([first.ack_id])
    assert broker.backlog == 0


async def test_dead_letter_after_max_delivery_attempts(unit):
    broker = MemoryBroker(ack_deadline=10, max_delivery_attempts=3, pull_wait=unit)
    await publish(broker, 1)
    for attempt in (1, 2, 3):
        (delivery,) = await broker.pull(1)
        assert delivery.delivery_attempt == attempt
        await broker.modify_ack_deadline([delivery.ack_id], 0)
    assert await broker.pull(1) == []
    assert [d.reason for d in broker.dead_letters] == ["delivered 3 times"]
    assert broker.backlog == 0


async def test_a_waiting_pull_wakes_on_publish():
    broker = MemoryBroker(pull_wait=60)
    async with anyio.create_task_group() as tg:
        results = []

        async def puller() -> None:
            results.extend(await broker.pull(5))

        tg.start_soon(puller)
        await anyio.wait_all_tasks_blocked()
        await publish(broker, 2)
    assert len(results) == 2


async def test_message_ids_are_unique_across_brokers() -> None:
    first = await publish(MemoryBroker(), 3)
    second = await publish(MemoryBroker(), 3)
    assert not set(first) & set(second)
