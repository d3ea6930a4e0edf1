"""The one retry engine: what it retries, how long it waits, when it gives up."""

from __future__ import annotations

import pytest

from mandrill.retry import GaveUp, RetryPolicy, backoff_delays, retry
from tests.support.fakes import FakeTime


class Flaky(Exception):
    pass


def failing(times: int, error: type[Exception] = Flaky):
    calls = 0

    async def attempt() -> int:
        nonlocal calls
        calls += 1
        if calls <= times:
            raise error(f"failure {calls}")
        return calls

    return attempt


def is_flaky(exc: Exception) -> bool:
    return isinstance(exc, Flaky)


async def test_retries_until_success_with_growing_waits() -> None:
    fake = FakeTime()
    seen: list[float] = []
    result = await retry(
        failing(3), RetryPolicy(initial=1, cap=10), transient=is_flaky,
        on_retry=lambda _, delay: seen.append(delay),
        rand=lambda: 1.0, sleep=fake.sleep, clock=fake.clock,
    )
    assert result == 4
    assert fake.sleeps == seen == [1.0, 2.0, 4.0]


async def test_a_permanent_failure_propagates_unchanged_without_waiting() -> None:
    fake = FakeTime()
    with pytest.raises(KeyError):
        await retry(failing(1, KeyError), RetryPolicy(), transient=is_flaky,
                    sleep=fake.sleep, clock=fake.clock)
    assert fake.sleeps == []


async def test_gives_up_after_the_attempts() -> None:
    fake = FakeTime()
    with pytest.raises(GaveUp, match="gave up after 3 attempts") as caught:
        await retry(failing(5), RetryPolicy(attempts=3, jitter=False), transient=is_flaky,
                    sleep=fake.sleep, clock=fake.clock)
    assert isinstance(caught.value.error, Flaky)
    assert caught.value.attempts == 3
    assert fake.sleeps == [0.1, 0.2]


async def test_gives_up_before_a_wait_would_pass_the_total() -> None:
    fake = FakeTime()
    policy = RetryPolicy(initial=1, cap=4, total=10, jitter=False)
    with pytest.raises(GaveUp):
        await retry(failing(100), policy, transient=is_flaky, sleep=fake.sleep, clock=fake.clock)
    assert fake.sleeps == [1, 2, 4]  # a fourth wait of 4 would end at 11 > 10
    assert fake.now <= policy.total


async def test_a_budget_cuts_the_last_wait_and_then_gives_up() -> None:
    # The budget (an outage's remaining time) bounds the retries whatever the policy's total.
    fake = FakeTime()
    policy = RetryPolicy(initial=1, cap=4, total=float("inf"), jitter=False)
    with pytest.raises(GaveUp):
        await retry(failing(100), policy, transient=is_flaky, budget=lambda: 10 - fake.now,
                    sleep=fake.sleep, clock=fake.clock)
    assert fake.sleeps == [1, 2, 4, 3]  # the last wait ends at the budget, not past it
    assert fake.now == 10


async def test_a_wait_the_server_asked_for_is_honoured_up_to_a_bound() -> None:
    fake = FakeTime()
    asked = iter([20.0, None, 3600.0, 0.0])
    policy = RetryPolicy(initial=1, cap=4, total=float("inf"), jitter=False, max_server_wait=60)
    await retry(failing(4), policy, transient=is_flaky, server_wait=lambda _: next(asked),
                sleep=fake.sleep, clock=fake.clock)
    # 20 s asked (more than the backoff's 1 s); none; an hour, cut to 60 s; 0 s, less than
    # the backoff's 4 s, which stands.
    assert fake.sleeps == [20, 2, 60, 4]


async def test_a_wait_the_server_asked_for_stays_within_the_budget_and_the_total() -> None:
    fake = FakeTime()
    policy = RetryPolicy(initial=1, cap=4, total=float("inf"), jitter=False)
    with pytest.raises(GaveUp):
        await retry(failing(100), policy, transient=is_flaky, server_wait=lambda _: 30,
                    budget=lambda: 45 - fake.now, sleep=fake.sleep, clock=fake.clock)
    assert fake.sleeps == [30, 15]
    fake = FakeTime()
    with pytest.raises(GaveUp):  # a wait past the policy's total is not begun
        await retry(failing(100), RetryPolicy(total=25), transient=is_flaky,
                    server_wait=lambda _: 30, sleep=fake.sleep, clock=fake.clock)
    assert fake.sleeps == []


def test_waits_are_capped_and_fully_jittered() -> None:
    policy = RetryPolicy(initial=0.5, cap=2)
    assert [next(backoff_delays(policy, rand=lambda: 0.0)) for _ in range(2)] == [0.0, 0.0]
    top = backoff_delays(policy, rand=lambda: 1.0)
    assert [next(top) for _ in range(5)] == [0.5, 1.0, 2.0, 2.0, 2.0]


@pytest.mark.parametrize(
    "kwargs", [{"initial": 0}, {"initial": 2, "cap": 1}, {"total": -1}, {"attempts": 0},
               {"multiplier": 0.5}]
)
def test_nonsense_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="invalid retry policy"):
        RetryPolicy(**kwargs)
