"""``--metrics-addr``'s ``HOST:PORT``, parsed: pure, so that checking the flag imports
neither the HTTP server nor prometheus_client."""

from __future__ import annotations

import re

DEFAULT_ADDR = "127.0.0.1:9464"

_PORT = re.compile(r"^\d{1,5}$")


def parse_addr(text: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"``, ``"localhost:9464"``, ``"[::1]:9464"`` → ``(host, port)``.

    Raises ``ValueError`` with a one-line reason. A host is required: listening on every
    interface takes an explicit ``0.0.0.0:PORT`` or ``[::]:PORT``.
    """
    text = text.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":") or ":" not in host:
            raise ValueError(f"{text!r} is not [IPv6]:PORT (example: [::1]:9464)")
        port = rest[1:]
    else:
        host, colon, port = text.rpartition(":")
        if not colon:
            raise ValueError(f"{text!r} has no port (example: 127.0.0.1:9464)")
        if ":" in host:
            raise ValueError(f"{text!r}: put an IPv6 address in brackets, as in [::1]:9464")
    if not host:
        raise ValueError(f"{text!r} has no host (use 127.0.0.1:PORT, or 0.0.0.0:PORT for all)")
    if not _PORT.match(port) or int(port) > 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    if any(char.isspace() or char in "/?#@" for char in host):
        raise ValueError(f"{text!r}: {host!r} is not a host name or address")
    return host, int(port)
