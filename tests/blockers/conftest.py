"""The real Prometheus the alerts blocker is tested against (session-scoped: it starts once)."""

from tests.fixtures.prometheus import prometheus

__all__ = ["prometheus"]
