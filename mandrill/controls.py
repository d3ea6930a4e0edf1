"""The safety controls in force, as one value (:class:`Controls`): what the status page
shows and what ``explain`` checks a host against. Built from the configuration in
:mod:`mandrill.parts`, from the same values as the daemon's decisions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mandrill.config import format_duration
from mandrill.ledger.sqlledger import INSTANCE_TIMEOUT
from mandrill.message import DEFAULT_DOMAIN
from mandrill.policy import Refusal, Rules
from mandrill.safety import SafetyControls, format_weekdays


@dataclass(frozen=True, slots=True)
class Controls:
    """Everything that decides whether a host may be restarted, as configured."""

    #: The interval rule, the fleet's rate limit, whether an unknown outcome counts.
    rules: Rules
    #: Host patterns and the time window (``None``: neither is set).
    safety: SafetyControls | None = None
    dry_run: bool = False
    #: Restarts under way at once in one daemon (a claim beyond it waits for a worker).
    max_concurrent_restarts: int | None = None
    max_attempts: int = 5
    instance_timeout: float = INSTANCE_TIMEOUT
    domain: str = DEFAULT_DOMAIN
    #: The restart-storm breaker's settings and state, once there is one: shown on the
    #: status page as given (``None``: no breaker configured).
    breaker: Mapping[str, Any] | None = None

    def window_refusal(self, now: datetime) -> Refusal | None:
        """Why ``now`` (aware) is outside the time window, or ``None``."""
        window = self.safety.window if self.safety is not None else None
        return window.skip_reason(now) if window is not None else None

    def to_json(self, now: datetime) -> dict[str, Any]:
        """The controls as JSON-ready data, with whether the window is open at ``now``."""
        safety = self.safety or SafetyControls()
        window = safety.window
        rate_limit = self.rules.rate_limit
        closed = self.window_refusal(now)
        return {
            "dry_run": self.dry_run,
            "min_restart_interval": format_duration(self.rules.min_interval),
            "min_restart_interval_seconds": self.rules.min_interval,
            "retry_unknown": self.rules.retry_unknown,
            "exclude": list(safety.exclude),
            "only": list(safety.only),
            "window": None if window is None else {
                "weekdays": None if window.weekdays is None else format_weekdays(window.weekdays),
                "hours": [str(hours) for hours in window.hours],
                "timezone": str(window.tz),
                "open": closed is None,
                "closed_because": None if closed is None else closed.detail,
            },
            "rate_limit": None if rate_limit is None else {
                "restarts": rate_limit.restarts,
                "window": format_duration(rate_limit.window),
                "window_seconds": rate_limit.window,
            },
            "max_concurrent_restarts": self.max_concurrent_restarts,
            "max_attempts": self.max_attempts,
            "breaker": None if self.breaker is None else dict(self.breaker),
        }


__all__ = ["Controls"]
