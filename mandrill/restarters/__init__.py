"""Restarters: what restarting a host means (simulated, a command, a Compute Engine reset)."""

from mandrill.restarters.base import Restarter
from mandrill.restarters.command import CommandRestarter
from mandrill.restarters.gce import GceRestarter
from mandrill.restarters.simulated import SimulatedRestarter

#: The names ``--restarter`` accepts.
RESTARTERS = ("simulated", "command", "gce")

__all__ = ["RESTARTERS", "CommandRestarter", "GceRestarter", "Restarter", "SimulatedRestarter"]
