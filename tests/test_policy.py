import pytest
from hypothesis import given
from hypothesis import strategies as st

from mandrill.policy import (
    UNKNOWN_DETAIL,
    Decision,
    Outcome,
    Prior,
    RateLimit,
    Reason,
    Rules,
    Settlement,
    Verdict,
    decide_restart,
    defer_seconds,
    format_duration,
    leases_due,
    settlement_after,
    settlement_for,
)

DAY = 86400.0
WEEK = 7 * DAY
NOW = 1_000_000_000.0


def decide(prior: Prior, now: float = NOW, *, retry_unknown: bool = False):
    return decide_restart(prior, now, Rules(WEEK, retry_unknown=retry_unknown))


def test_a_fresh_host_is_restarted():
    assert decide(Prior()).verdict is Verdict.RESTART


def test_the_seven_day_rule():
    six_days_ago = Prior(host_last_restart=NOW - 6 * DAY)
    decision = decide(six_days_ago)
    assert decision.verdict is Verdict.SKIP
    assert (decision.reason, decision.detail) == (Reason.INTERVAL, "host restarted 6d ago")
    assert decide(Prior(host_last_restart=NOW - WEEK)).verdict is Verdict.RESTART


@given(st.floats(min_value=0, max_value=30 * DAY))
def test_interval_rule_holds_for_any_age(age):
    verdict = decide(Prior(host_last_restart=NOW - age)).verdict
    assert (verdict is Verdict.SKIP) == (age < WEEK)


def test_a_message_already_decided_is_a_duplicate():
    for outcome in (Outcome.RESTARTED, Outcome.SKIPPED, Outcome.DRY_RUN):
        decision = decide(Prior(message_decisions=[(outcome, NOW - 10)]))
        assert decision.verdict is Verdict.DUPLICATE


def test_a_live_claim_is_busy_however_old():
    for age in (10, 30 * DAY):
        live = Prior(message_decisions=[(Outcome.RESTARTING, NOW - age)])
        assert decide(live).verdict is Verdict.BUSY


def test_a_host_being_restarted_makes_other_messages_wait():
    decision = decide(Prior(host_busy_with="m1"))
    assert (decision.verdict, decision.reason, decision.detail) == (
        Verdict.BUSY, Reason.HOST_UNDER_WAY, "host is being restarted (message m1); waiting for it"
    )
    # Even when the host's last restart would make it a skip: the outcome decides.
    assert decide(Prior(host_last_restart=NOW - 1, host_busy_with="m1")).verdict is Verdict.BUSY


def test_an_unknown_outcome_counts_as_done_unless_retried():
    prior = Prior(message_decisions=[(Outcome.UNKNOWN, NOW - 10)])
    decision = decide(prior)
    assert (decision.verdict, decision.reason, decision.detail) == (
        Verdict.DUPLICATE, Reason.UNKNOWN_COUNTED, UNKNOWN_DETAIL
    )
    retried = decide(prior, retry_unknown=True)
    assert (retried.verdict, retried.failures) == (Verdict.RESTART, 1)


def test_failures_are_counted_and_do_not_block_a_retry():
    prior = Prior(message_decisions=[(Outcome.FAILED, NOW - 20), (Outcome.FAILED, NOW - 10)])
    decision = decide(prior)
    assert decision.verdict is Verdict.RESTART
    assert decision.failures == 2


def test_the_fleet_rate_limit():
    rules = Rules(WEEK, RateLimit(3, 3600))
    full = decide_restart(Prior(fleet_restarts=3), NOW, rules)
    assert (full.verdict, full.reason) == (Verdict.SKIP, Reason.RATE_LIMIT)
    assert full.detail == "fleet rate limit: 3 restarts in the last 1h (limit 3)"
    assert decide_restart(Prior(fleet_restarts=2), NOW, rules).verdict is Verdict.RESTART


@given(st.sampled_from(list(Outcome)), st.integers(0, 100), st.integers(1, 100))
def test_every_skip_and_wait_carries_a_reason_code(outcome, age, failures):
    prior = Prior(message_decisions=[(outcome, NOW - age)], host_last_restart=NOW - age)
    decision = decide(prior)
    assert (decision.reason is None) == (decision.verdict is Verdict.RESTART)


def test_settlement_of_a_decision_without_a_restart():
    assert settlement_for(Decision(Verdict.SKIP, Reason.INTERVAL)) is Settlement.ACK
    assert settlement_for(Decision(Verdict.DUPLICATE, Reason.ALREADY_DECIDED)) is Settlement.ACK
    assert settlement_for(Decision(Verdict.BUSY, Reason.HOST_UNDER_WAY)) is Settlement.DEFER


def test_settlement_after_a_restart():
    assert settlement_after(Outcome.RESTARTED, 0, 5) is Settlement.ACK
    assert settlement_after(Outcome.DRY_RUN, 0, 5) is Settlement.ACK
    assert settlement_after(Outcome.FAILED, 3, 5) is Settlement.NACK
    assert settlement_after(Outcome.FAILED, 4, 5) is Settlement.DEAD_LETTER
    # Interrupted after it began: counted (acked) unless unknown outcomes are retried.
    assert settlement_after(Outcome.UNKNOWN, 0, 5) is Settlement.ACK
    assert settlement_after(Outcome.UNKNOWN, 0, 5, retry_unknown=True) is Settlement.NACK
    # Never began: redelivered.
    assert settlement_after(Outcome.CANCELLED, 0, 5) is Settlement.NACK
    # Held back by a blocker: comes back after a pause, not at once.
    assert settlement_after(Outcome.CANCELLED, 4, 5, reason=Reason.BLOCKED) is Settlement.DEFER


@given(st.sampled_from(list(Outcome)), st.integers(0, 100), st.integers(1, 100), st.booleans(),
       st.sampled_from([None, *Reason]))
def test_only_a_failure_may_dead_letter_and_a_cancelled_restart_never_acks(
    outcome, failures, max_attempts, retry_unknown, reason
):
    settlement = settlement_after(outcome, failures, max_attempts, retry_unknown=retry_unknown,
                                  reason=reason)
    if settlement is Settlement.DEAD_LETTER:
        assert outcome is Outcome.FAILED
    if outcome is Outcome.CANCELLED:
        assert settlement is (Settlement.DEFER if reason is Reason.BLOCKED else Settlement.NACK)


def test_leases_due():
    leases = [
        ("far", NOW + 100, NOW - 1),
        ("soon", NOW + 2, NOW - 1),
        ("expired-by-now", NOW - 1, NOW - 5),
        ("too-long", NOW + 1, NOW - 7200),
    ]
    extend, give_up = leases_due(leases, NOW, margin=5, max_lease=3600)
    assert extend == ["soon", "expired-by-now"]
    assert give_up == ["too-long"]


def test_format_duration():
    assert format_duration(0) == "0s"
    assert format_duration(90061) == "1d 1h 1m 1s"
    assert format_duration(6 * DAY) == "6d"


@pytest.mark.parametrize(
    ("attempt", "seconds"),
    [(None, 10), (0, 10), (1, 10), (4, 10), (5, 20), (6, 40), (9, 320), (10, 600),
     (10**6, 600)],
)
def test_a_deferred_delivery_stays_away_longer_each_time(attempt, seconds):
    assert defer_seconds(attempt) == seconds


def test_deferrals_outlast_a_long_restart_before_a_dead_letter_policy_takes_them():
    # Pub/Sub's policy (mandrill setup's default: 10 deliveries) must not take a message
    # that waits for a restart of several minutes (--restart-timeout, a GCE reset).
    assert sum(defer_seconds(attempt) for attempt in range(1, 10)) >= 10 * 60
