"""The runtime dependencies of an installed distribution, all of them, with their versions.

``python -m tests.support.constraints > deploy/constraints.txt`` writes the image's
constraints file from this environment (the project installed, on the image's Python):
every distribution that ``pip install mayhem-mandrill`` brings, pinned to the version
installed here. tests/test_deploy.py checks that the file names exactly these.
"""

from __future__ import annotations

import importlib.metadata
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from mandrill.version import DISTRIBUTION

HEADER = """\
# The image's constraints (deploy/Containerfile: pip install --constraint): every runtime
# dependency of mayhem-mandrill, direct or not, pinned, so that two builds install the
# same versions. Written by `python -m tests.support.constraints > deploy/constraints.txt`
# in a venv with the project installed (on Python 3.11, the image's); tests/test_deploy.py
# checks that it names exactly those and that each pin satisfies pyproject.toml.
"""


def runtime_dependencies(name: str = DISTRIBUTION) -> dict[str, str]:
    """``{canonical name: installed version}`` of everything ``name`` needs at run time
    (extras it asks of its dependencies included, markers evaluated here), itself excluded.
    """
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    stack: list[tuple[str, frozenset[str]]] = [(name, frozenset())]
    while stack:
        wanted, extras = stack.pop()
        key = canonicalize_name(wanted)
        if (key, extras) in seen:
            continue
        seen.add((key, extras))
        dist = importlib.metadata.distribution(wanted)
        if key != canonicalize_name(name):
            found[key] = dist.version
        environments = [{"extra": extra} for extra in sorted(extras)] or [{"extra": ""}]
        for raw in dist.requires or []:
            requirement = Requirement(raw)
            marker = requirement.marker
            if marker is None or any(marker.evaluate(env) for env in environments):
                stack.append((requirement.name, frozenset(requirement.extras)))
    return found


def render(pins: dict[str, str]) -> str:
    return HEADER + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins))


if __name__ == "__main__":
    sys.stdout.write(render(runtime_dependencies()))
