"""Test doubles for the parts that have no real counterpart to drive (a restarter that
fails on cue); the broker and the ledger in these tests are the real ones."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import anyio

from mandrill.errors import RestartFailed
from mandrill.message import Message
from mandrill.sources.memory import MemoryBroker


class FakeTime:
    """A clock that only moves when the code under test sleeps (for retry loops)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


class ScriptedRestarter:
    """Records every call; fails a host's first ``fail_first[host]`` restarts; blocks
    hosts listed in ``block`` until cancelled."""

    def __init__(
        self,
        *,
        fail_first: dict[str, int] | None = None,
        always_fail: Sequence[str] = (),
        block: Sequence[str] = (),
        latency: float = 0.0,
    ) -> None:
        self.calls: Counter[str] = Counter()
        self.fail_first = fail_first or {}
        self.always_fail = set(always_fail)
        self.block = set(block)
        self.latency = latency
        self.started = anyio.Event()

    async def restart(self, message: Message) -> str:
        host = message.instance_name
        self.calls[host] += 1
        self.started.set()
        if host in self.block:
            await anyio.sleep_forever()
        await anyio.sleep(self.latency)
        if host in self.always_fail or self.calls[host] <= self.fail_first.get(host, 0):
            raise RestartFailed(f"scripted failure {self.calls[host]}")
        return "scripted"


class LosesFirstAcks(MemoryBroker):
    """A broker whose first ``n`` acks are lost on the way, as on a flaky network: the
    message is then redelivered although it was processed."""

    def __init__(self, lose: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.to_lose = lose

    async def acknowledge(self, ack_ids: Sequence[str]) -> None:
        kept = list(ack_ids)
        while self.to_lose and kept:
            kept.pop(0)
            self.to_lose -= 1
        await super().acknowledge(kept)


class SlowSettlement(MemoryBroker):
    """Settlement requests take a while (and so have to survive cancellation)."""

    def __init__(self, delay: float, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.delay = delay

    async def modify_ack_deadline(self, ack_ids: Sequence[str], seconds: float) -> None:
        await anyio.sleep(self.delay)
        await super().modify_ack_deadline(ack_ids, seconds)


def payloads(*names: str) -> list[tuple[bytes, dict[str, str]]]:
    from mandrill.message import encode_payload

    return [(encode_payload(name), {}) for name in names]


Predicate = Callable[[], bool]
