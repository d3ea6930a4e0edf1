"""Restarters: what restarting a host means (simulated, a command, a Compute Engine reset).

The implementations are imported on first use (PEP 562): the gce restarter brings aiohttp
and Google's auth library, which a daemon with another restarter (or ``restarters.base``
alone) should not load.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from mandrill.restarters.base import Restarter

if TYPE_CHECKING:
    from mandrill.restarters.command import CommandRestarter
    from mandrill.restarters.gce import GceRestarter
    from mandrill.restarters.simulated import SimulatedRestarter

#: The names ``--restarter`` accepts.
RESTARTERS = ("simulated", "command", "gce")

_LAZY = {
    "CommandRestarter": "mandrill.restarters.command",
    "GceRestarter": "mandrill.restarters.gce",
    "SimulatedRestarter": "mandrill.restarters.simulated",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["RESTARTERS", "CommandRestarter", "GceRestarter", "Restarter", "SimulatedRestarter"]
