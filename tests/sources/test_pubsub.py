"""The Pub/Sub source against the real emulator (both backends), and its pure helpers."""

from __future__ import annotations

import contextlib
import email.utils
import json
import random
import socket
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import aiohttp
import anyio
import pytest

from mandrill.errors import SourceError
from mandrill.message import Delivery, encode_payload
from mandrill.outage import Outage
from mandrill.sources.base import Source
from mandrill.sources.pubsub import (
    DEAD_LETTER_MESSAGE_ID_ATTRIBUTE,
    DEAD_LETTER_REASON_ATTRIBUTE,
    MAX_ACK_IDS_PER_REQUEST,
    MAX_ACK_REQUEST_BYTES,
    MAX_PUBLISH_REQUEST_BYTES,
    OUTAGE_RETRY,
    PubSubError,
    PubSubSource,
    RetryPolicy,
    backoff_delays,
    call_with_retries,
    chunk_ack_ids,
    chunk_messages,
    describe_error,
    is_transient,
    open_pubsub_source,
    open_pubsub_topic,
    setup_pubsub,
)
from tests.fixtures.emulator import PubSubEmulator, PubSubNames
from tests.support.fakes import FakeTime
from tests.support.holding_proxy import HoldingProxy
from tests.support.metadata import FakeMetadataServer

#: Every wait on the emulator is bounded by this; a healthy one answers in milliseconds.
WAIT = 15.0
#: How long to wait to see that nothing more comes. (A pull cut short leaves the emulator
#: with a dead pull that can swallow later redeliveries: do it last in a test.)
QUICK_PULL = 1.0


@contextlib.asynccontextmanager
async def opened(
    names: PubSubNames,
    backend: str,
    *,
    ack_deadline: int = 10,
    dead_letter: bool = False,
) -> AsyncIterator[PubSubSource]:
    """Set up the names' topic and subscription and open the source on them."""
    await setup_pubsub(
        project=names.project,
        topic=names.topic,
        subscription=names.subscription,
        backend=backend,
        ack_deadline=ack_deadline,
        dead_letter_topic=names.dead_letter_topic if dead_letter else None,
    )
    async with open_pubsub_source(
        project=names.project,
        subscription=names.subscription,
        backend=backend,
        dead_letter_topic=names.dead_letter_topic if dead_letter else None,
    ) as source:
        yield source


async def publish(
    names: PubSubNames, backend: str, messages: Sequence[tuple[bytes, dict[str, str]]]
) -> list[str]:
    async with open_pubsub_topic(
        project=names.project, topic=names.topic, backend=backend
    ) as topic:
        return await topic.publish(messages)


async def pull_nothing(source: Source) -> None:
    """Check that no delivery comes for ``QUICK_PULL`` seconds."""
    with anyio.move_on_after(QUICK_PULL):
        got = await source.pull(1000)
        pytest.fail(f"expected no delivery, got {got}")


async def pull_at_least(source: Source, count: int) -> list[Delivery]:
    """Pull until ``count`` deliveries came (fails after ``WAIT`` seconds)."""
    got: list[Delivery] = []
    with anyio.fail_after(WAIT):
        while len(got) < count:
            got.extend(await source.pull(1000))
    return got


# -- against the emulator ----------------------------------------------------------------------


@pytest.mark.emulator
async def test_setup_is_idempotent(pubsub_names: PubSubNames, backend_name: str) -> None:
    n = pubsub_names
    kwargs = {
        "project": n.project,
        "topic": n.topic,
        "subscription": n.subscription,
        "backend": backend_name,
        "ack_deadline": 20,
        "dead_letter_topic": n.dead_letter_topic,
    }
    first = await setup_pubsub(**kwargs)
    second = await setup_pubsub(**kwargs)

    sub = f"projects/{n.project}/subscriptions/{n.subscription}"
    dead_sub = f"projects/{n.project}/subscriptions/{n.dead_letter_topic}-sub"
    assert first == [
        f"created topic projects/{n.project}/topics/{n.topic}",
        f"created topic projects/{n.project}/topics/{n.dead_letter_topic}",
        f"created subscription {dead_sub}",
        f"created subscription {sub}",
    ]
    assert second == [line.replace("created", "found") for line in first]
    async with open_pubsub_source(
        project=n.project, subscription=n.subscription, backend=backend_name
    ) as source:
        assert source.ack_deadline == 20


@pytest.mark.emulator
async def test_with_an_api_root_tokens_are_fetched_and_a_failed_request_retried(
    pubsub_names: PubSubNames,
    backend_name: str,
    pubsub_emulator: PubSubEmulator,
    metadata_server: FakeMetadataServer,
) -> None:
    # The emulator reached through an API root stands in for the real service: every client
    # gets its token from the (fake) metadata server, whose first answer is a 503.
    n = pubsub_names
    api_root = f"{pubsub_emulator.url}/v1"
    metadata_server.fail_next(1)
    await setup_pubsub(
        project=n.project,
        topic=n.topic,
        subscription=n.subscription,
        backend=backend_name,
        api_root=api_root,
    )
    async with open_pubsub_topic(
        project=n.project, topic=n.topic, backend=backend_name, api_root=api_root
    ) as topic:
        (message_id,) = await topic.publish([(b"via-tokens", {})])
    async with open_pubsub_source(
        project=n.project, subscription=n.subscription, backend=backend_name, api_root=api_root
    ) as source:
        (delivery,) = await pull_at_least(source, 1)
        await source.acknowledge([delivery.ack_id])
    assert delivery.message_id == message_id
    # One token per opening (setup, topic, source); setup's first request was retried.
    assert [r.status for r in metadata_server.token_requests] == [503, 200, 200, 200]


@pytest.mark.emulator
async def test_an_emulator_host_is_used_without_tokens(
    pubsub_names: PubSubNames,
    backend_name: str,
    pubsub_emulator: PubSubEmulator,
    metadata_server: FakeMetadataServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST")
    n = pubsub_names
    host = pubsub_emulator.host
    await setup_pubsub(
        project=n.project, topic=n.topic, subscription=n.subscription, backend=backend_name,
        emulator_host=host,
    )
    async with open_pubsub_source(
        project=n.project, subscription=n.subscription, backend=backend_name, emulator_host=host
    ):
        pass
    assert metadata_server.token_requests == []


@pytest.mark.emulator
async def test_setup_reports_a_differing_subscription(
    pubsub_names: PubSubNames, backend_name: str
) -> None:
    n = pubsub_names
    await setup_pubsub(
        project=n.project,
        topic=n.topic,
        subscription=n.subscription,
        backend=backend_name,
        ack_deadline=10,
    )
    again = await setup_pubsub(
        project=n.project,
        topic=n.topic,
        subscription=n.subscription,
        backend=backend_name,
        ack_deadline=30,
    )
    assert again[-1].endswith("(its ack deadline is 10 s; left unchanged)")


@pytest.mark.emulator
async def test_publish_pull_ack_drains_the_subscription(
    pubsub_names: PubSubNames, backend_name: str
) -> None:
    count = 1500  # more than one pull's worth
    messages = [(encode_payload(f"host-{i}"), {"seq": str(i)}) for i in range(count)]
    async with opened(pubsub_names, backend_name) as source:
        ids = await publish(pubsub_names, backend_name, messages)
        assert len(set(ids)) == count

        got = await pull_at_least(source, count)
        assert sorted(d.message_id for d in got) == sorted(ids)
        by_seq = {d.attributes["seq"]: d for d in got}
        assert by_seq["7"].data == encode_payload("host-7")
        assert abs(by_seq["7"].publish_time - time.time()) < 60  # epoch seconds, recent
        await source.acknowledge([d.ack_id for d in got])

        await pull_nothing(source)


@pytest.mark.emulator
async def test_pull_returns_nothing_when_the_wait_ends(
    pubsub_names: PubSubNames, backend_name: str
) -> None:
    n = pubsub_names
    await setup_pubsub(
        project=n.project, topic=n.topic, subscription=n.subscription, backend=backend_name
    )
    async with open_pubsub_source(
        project=n.project, subscription=n.subscription, backend=backend_name, pull_wait=1
    ) as source:
        with anyio.fail_after(WAIT):
            assert await source.pull(10) == []


@pytest.mark.emulator
async def test_nack_redelivers_at_once(pubsub_names: PubSubNames, backend_name: str) -> None:
    async with opened(pubsub_names, backend_name) as source:
        [message_id] = await publish(pubsub_names, backend_name, [(b"{}", {})])
        [first] = await pull_at_least(source, 1)

        await source.modify_ack_deadline([first.ack_id], 0)
        # Well within the 10 s ack deadline: only the nack can bring it back this soon.
        with anyio.fail_after(5):
            [again] = await pull_at_least(source, 1)
        assert again.message_id == first.message_id == message_id
        await source.acknowledge([again.ack_id])


@pytest.mark.emulator
async def test_modify_ack_deadline_extends_the_lease(
    pubsub_names: PubSubNames, backend_name: str
) -> None:
    async with opened(pubsub_names, backend_name, ack_deadline=10) as source:
        await publish(pubsub_names, backend_name, [(b"kept", {}), (b"control", {})])
        leased = {d.data: d for d in await pull_at_least(source, 2)}
        await source.modify_ack_deadline([leased[b"kept"].ack_id], 60)

        # The control's redelivery shows that the 10 s deadline has passed for both.
        with anyio.fail_after(10 + WAIT):
            redelivered: list[Delivery] = []
            while not redelivered:
                redelivered = await source.pull(1000)
        assert [d.data for d in redelivered] == [b"control"]
        await pull_nothing(source)
        await source.acknowledge([leased[b"kept"].ack_id, redelivered[0].ack_id])


@pytest.mark.emulator
async def test_dead_letter_publishes_data_attributes_and_reason(
    pubsub_names: PubSubNames, backend_name: str
) -> None:
    n = pubsub_names
    async with opened(n, backend_name, dead_letter=True) as source:
        [message_id] = await publish(n, backend_name, [(b"not json", {"origin": "test"})])
        [bad] = await pull_at_least(source, 1)
        assert source.keeps_dead_letters
        await source.dead_letter(bad, "payload is not JSON: Expecting value\n")
        await source.acknowledge([bad.ack_id])

    async with open_pubsub_source(
        project=n.project,
        subscription=f"{n.dead_letter_topic}-sub",
        backend=backend_name,
    ) as dead:
        [letter] = await pull_at_least(dead, 1)
        await dead.acknowledge([letter.ack_id])
    assert letter.data == b"not json"
    assert letter.attributes == {
        "origin": "test",
        DEAD_LETTER_REASON_ATTRIBUTE: "payload is not JSON: Expecting value\n",
        DEAD_LETTER_MESSAGE_ID_ATTRIBUTE: message_id,
    }


@pytest.mark.emulator
async def test_dead_letter_without_a_topic_does_nothing(
    pubsub_names: PubSubNames, backend_name: str
) -> None:
    async with opened(pubsub_names, backend_name) as source:
        assert source.dead_letter_topic is None
        assert not source.keeps_dead_letters
        delivery = Delivery("ack", "1", b"x", {}, datetime.now(UTC))
        await source.dead_letter(delivery, "why")


@pytest.mark.emulator
async def test_delivery_attempt_counts_with_a_dead_letter_policy(
    pubsub_names: PubSubNames, backend_name: str
) -> None:
    async with opened(pubsub_names, backend_name, dead_letter=True) as source:
        await publish(pubsub_names, backend_name, [(b"{}", {})])
        [first] = await pull_at_least(source, 1)
        assert first.delivery_attempt == 1
        await source.modify_ack_deadline([first.ack_id], 0)
        [second] = await pull_at_least(source, 1)
        assert second.delivery_attempt == 2
        await source.acknowledge([second.ack_id])


@pytest.mark.emulator
async def test_missing_subscription_is_one_line_source_error(
    pubsub_names: PubSubNames, backend_name: str
) -> None:
    n = pubsub_names
    with pytest.raises(SourceError) as caught:
        async with open_pubsub_source(
            project=n.project, subscription=n.subscription, backend=backend_name
        ):
            pass
    assert (
        str(caught.value)
        == f"subscription projects/{n.project}/subscriptions/{n.subscription} not found"
    )


@pytest.mark.emulator
async def test_missing_topic_is_a_permanent_error(
    pubsub_names: PubSubNames, backend_name: str
) -> None:
    with pytest.raises(PubSubError) as caught:
        await publish(pubsub_names, backend_name, [(b"x", {})])
    assert caught.value.status == 404
    assert str(caught.value) == (
        f"publish to projects/{pubsub_names.project}/topics/{pubsub_names.topic}:"
        " HTTP 404 NOT_FOUND: Topic not found"
    )


async def test_unreachable_service_gives_up_after_the_retry_budget(backend_name: str) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    policy = RetryPolicy(initial=0.01, cap=0.05, total=0.3)
    told: list[str] = []
    with pytest.raises(
        PubSubError, match=r"gave up after (\d+) attempts in \d+\.\d s: Client\w*Error"
    ) as caught:
        async with open_pubsub_source(
            project="nowhere",
            subscription="nothing",
            backend=backend_name,
            retry=policy,
            emulator_host=f"127.0.0.1:{port}",
            on_transient_error=lambda what, error, delay: told.append(what),
        ):
            pass
    # Every failure but the last was reported as it happened.
    attempts = int(str(caught.value).split("gave up after ")[1].split()[0])
    assert told == ["get subscription projects/nowhere/subscriptions/nothing"] * (attempts - 1)


async def test_topic_protocol(backend_name: str) -> None:
    async with open_pubsub_topic(project="p", topic="t", backend=backend_name) as topic:
        assert topic.topic == "projects/p/topics/t"
        assert await topic.publish([]) == []


# -- pure helpers ----------------------------------------------------------------------------


def test_backoff_is_exponential_capped_and_fully_jittered() -> None:
    policy = RetryPolicy(initial=0.1, cap=1.0, total=60.0)
    top = backoff_delays(policy, rand=lambda: 1.0)
    assert [round(next(top), 6) for _ in range(7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert next(backoff_delays(policy, rand=lambda: 0.0)) == 0.0

    rng = random.Random(42)
    delays = backoff_delays(policy, rand=rng.random)
    drawn = [next(delays) for _ in range(200)]
    ceilings = [min(1.0, 0.1 * 2**n) for n in range(200)]
    assert all(0 <= d < c for d, c in zip(drawn, ceilings, strict=True))
    assert len(set(drawn)) == len(drawn)  # jittered, not a fixed ladder


def test_retry_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="invalid retry policy"):
        RetryPolicy(initial=0)
    with pytest.raises(ValueError, match="invalid retry policy"):
        RetryPolicy(initial=5, cap=1)


def _http_error(status: int, body: str = "") -> aiohttp.ClientResponseError:
    return aiohttp.ClientResponseError(None, (), status=status, message=f"Reason: {body}")


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (_http_error(500), True),
        (_http_error(503), True),
        (_http_error(429), True),
        (_http_error(408), True),
        (_http_error(400), False),
        (_http_error(401), False),
        (_http_error(403), False),
        (_http_error(404), False),
        (_http_error(409), False),
        (aiohttp.ServerDisconnectedError(), True),
        (aiohttp.ClientPayloadError("truncated"), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (aiohttp.InvalidURL("nope"), False),
        (ValueError("a bug"), False),
    ],
)
def test_failures_are_sorted(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_describe_error_is_one_line() -> None:
    body = '{"error":{"code":403,"message":"User not\\nauthorized","status":"PERMISSION_DENIED"}}'
    assert (
        describe_error(_http_error(403, body)) == "HTTP 403 PERMISSION_DENIED: User not authorized"
    )
    assert describe_error(_http_error(502, "<html>\n bad gateway</html>")) == (
        "HTTP 502 Reason: <html> bad gateway</html>"
    )
    assert describe_error(TimeoutError()) == "TimeoutError: no response in time"




async def test_retries_transient_failures_then_succeeds() -> None:
    fake = FakeTime()
    failures = [_http_error(503), aiohttp.ServerDisconnectedError(), TimeoutError()]

    async def attempt() -> str:
        if failures:
            raise failures.pop(0)
        return "ok"

    policy = RetryPolicy(initial=0.1, cap=10.0, total=120.0)
    result = await call_with_retries(
        "pull", attempt, policy, rand=lambda: 0.5, sleep=fake.sleep, clock=fake.clock
    )
    assert result == "ok"
    assert fake.sleeps == [0.05, 0.1, 0.2]


async def test_permanent_failure_raises_at_once() -> None:
    fake = FakeTime()

    async def attempt() -> None:
        raise _http_error(403, '{"error":{"code":403,"message":"no","status":"PERMISSION_DENIED"}}')

    with pytest.raises(PubSubError, match=r"^ack: HTTP 403 PERMISSION_DENIED: no$") as caught:
        await call_with_retries("ack", attempt, sleep=fake.sleep, clock=fake.clock)
    assert caught.value.status == 403
    assert fake.sleeps == []


async def test_retries_stop_within_the_total_budget() -> None:
    fake = FakeTime()
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        fake.now += 0.5  # each attempt takes time too
        raise _http_error(500)

    policy = RetryPolicy(initial=1.0, cap=4.0, total=20.0)
    with pytest.raises(PubSubError, match=r"gave up after \d+ attempts in .* HTTP 500") as caught:
        await call_with_retries(
            "pull", attempt, policy, rand=lambda: 1.0, sleep=fake.sleep, clock=fake.clock
        )
    assert caught.value.status == 500
    assert fake.now <= policy.total
    assert fake.sleeps == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert calls == len(fake.sleeps) + 1


async def test_bugs_are_not_retried() -> None:
    fake = FakeTime()

    async def attempt() -> None:
        raise KeyError("oops")

    with pytest.raises(KeyError):
        await call_with_retries("pull", attempt, sleep=fake.sleep, clock=fake.clock)
    assert fake.sleeps == []


def test_ack_ids_are_chunked_by_count_and_size_none_dropped() -> None:
    short = [f"a{i}" for i in range(6001)]
    chunks = list(chunk_ack_ids(short))
    assert [len(c) for c in chunks] == [MAX_ACK_IDS_PER_REQUEST, MAX_ACK_IDS_PER_REQUEST, 1001]
    assert [a for c in chunks for a in c] == short

    long = [f"{i:04d}" + "x" * 996 for i in range(1000)]  # 1000-byte ack ids
    chunks = list(chunk_ack_ids(long))
    assert all(sum(len(a) + 4 for a in c) <= MAX_ACK_REQUEST_BYTES for c in chunks)
    assert len(chunks) == 3
    assert [a for c in chunks for a in c] == long
    assert list(chunk_ack_ids([])) == []


def test_messages_are_chunked_by_count_and_size() -> None:
    small = [(b"x", {"k": "v"})] * 2500
    assert [len(c) for c in chunk_messages(small)] == [1000, 1000, 500]

    big = [(bytes(3_000_000), {})] * 5  # 4 MB each once base64-encoded
    chunks = list(chunk_messages(big))
    assert [len(c) for c in chunks] == [2, 2, 1]
    assert MAX_PUBLISH_REQUEST_BYTES < 10_000_000

    huge = [(bytes(20_000_000), {})]  # goes alone; the API will refuse it
    assert list(chunk_messages(huge)) == [huge]


async def test_each_retried_failure_is_reported() -> None:
    reported: list[tuple[str, float]] = []
    failures = iter([aiohttp.ClientConnectionError("reset"), aiohttp.ClientConnectionError("x")])

    async def attempt() -> str:
        error = next(failures, None)
        if error is not None:
            raise error
        return "ok"

    async def no_sleep(_: float) -> None:
        pass

    result = await call_with_retries(
        "pull", attempt, RetryPolicy(initial=0.1, cap=1, total=60), rand=lambda: 0.5,
        sleep=no_sleep, on_transient_error=lambda what, exc, delay: reported.append((what, delay)),
    )
    assert result == "ok"
    assert [what for what, _ in reported] == ["pull", "pull"]


async def test_retries_outlast_the_policy_until_the_outage_limit() -> None:
    """With an outage, the daemon's calls retry for as long as Pub/Sub may be down: the
    outage began with the first call's failure, so a later call has only what is left."""
    fake = FakeTime()
    outage = Outage("Pub/Sub", limit=100, setting="--source-outage-limit", clock=fake.clock)

    async def attempt() -> None:
        fake.now += 1  # each attempt takes time too
        raise aiohttp.ClientConnectionError("refused")

    async def one_call(what: str) -> None:
        await call_with_retries(what, attempt, OUTAGE_RETRY, rand=lambda: 1.0,
                                sleep=fake.sleep, clock=fake.clock, outage=outage)

    with pytest.raises(PubSubError) as caught:
        await one_call("pull from s")
    # The outage began as the first attempt failed (at 1 s); the last wait ends at its
    # limit (101 s), and one last attempt fails.
    assert str(caught.value) == (
        "pull from s: Pub/Sub unavailable for 101s (--source-outage-limit 100s):"
        " ClientConnectionError: refused"
    )
    assert fake.now == 102
    assert max(fake.sleeps) == OUTAGE_RETRY.cap
    # The outage goes on (nothing succeeded): a call now gets one attempt, no wait.
    waits = len(fake.sleeps)
    with pytest.raises(PubSubError, match="unavailable for 102s"):
        await one_call("acknowledge on s")
    assert len(fake.sleeps) == waits


async def test_a_success_ends_the_outage_and_its_budget_starts_anew() -> None:
    fake = FakeTime()
    outage = Outage("Pub/Sub", limit=5, clock=fake.clock)
    failures = [aiohttp.ClientConnectionError("refused")] * 3

    async def attempt() -> str:
        fake.now += 1
        if failures:
            raise failures.pop()
        return "ok"

    assert await call_with_retries("pull", attempt, OUTAGE_RETRY, rand=lambda: 0.5,
                                   sleep=fake.sleep, clock=fake.clock, outage=outage) == "ok"
    assert not outage.ongoing
    assert outage.remaining() == 5


async def test_a_permanent_failure_is_no_outage() -> None:
    fake = FakeTime()
    outage = Outage("Pub/Sub", clock=fake.clock)

    async def attempt() -> None:
        raise _http_error(403, '{"error":{"code":403,"message":"no","status":"PERMISSION_DENIED"}}')

    with pytest.raises(PubSubError, match="PERMISSION_DENIED"):
        await call_with_retries("pull", attempt, OUTAGE_RETRY, sleep=fake.sleep,
                                clock=fake.clock, outage=outage)
    assert not outage.ongoing


class AnswersOnceWithRetryAfter:
    """A Pub/Sub that asks to wait: the first request whose path ends with a given suffix
    gets ``(status, Retry-After value)`` instead of the emulator's answer."""

    def __init__(self, answers: dict[str, tuple[int, str]]) -> None:
        self.left = dict(answers)

    def __call__(
        self, method: str, path: str, body: bytes
    ) -> tuple[int, bytes, dict[str, str]] | None:
        for suffix in list(self.left):
            if path.endswith(suffix):
                status, after = self.left.pop(suffix)
                error = {"error": {"code": status, "message": "injected: wait",
                                   "status": "UNAVAILABLE"}}
                return status, json.dumps(error).encode(), {"Retry-After": after}
        return None


@pytest.mark.emulator
async def test_retry_after_is_honoured_by_pull_ack_modify_and_publish(
    pubsub_emulator: PubSubEmulator, pubsub_names: PubSubNames, backend_name: str
) -> None:
    """Each call waits at least what Pub/Sub's 429 or 503 asked (seconds or an HTTP date),
    up to the bound (60 s): seen through the source's sleep, so no test waits for real."""
    n = pubsub_names
    await setup_pubsub(project=n.project, topic=n.topic, subscription=n.subscription,
                       backend=backend_name, dead_letter_topic=n.dead_letter_topic)
    await publish(n, backend_name, [(b"{}", {})])
    in_30s = email.utils.formatdate(time.time() + 30, usegmt=True)
    refuse = AnswersOnceWithRetryAfter({
        ":pull": (429, "20"), ":modifyAckDeadline": (503, in_30s),
        ":publish": (503, "7"), ":acknowledge": (429, "3600"),
    })
    waits: list[float] = []

    async def recorded(seconds: float) -> None:
        waits.append(seconds)
        await anyio.lowlevel.checkpoint()

    with HoldingProxy(pubsub_emulator.host, refuse=refuse).running() as proxy:
        async with open_pubsub_source(
            project=n.project, subscription=n.subscription, backend=backend_name,
            dead_letter_topic=n.dead_letter_topic, emulator_host=proxy.address, sleep=recorded,
        ) as source:
            with anyio.fail_after(WAIT):
                (delivery,) = await source.pull(10)
                await source.modify_ack_deadline([delivery.ack_id], 30)
                await source.dead_letter(delivery, "test")
                await source.acknowledge([delivery.ack_id])
    assert refuse.left == {}
    assert proxy.refused == 4
    pulled, modified, published, acked = waits
    assert pulled == 20
    assert 28 < modified <= 30  # the date has whole seconds, and time went by
    assert published == 7
    assert acked == 60  # an hour asked: the bound
