"""The package's shape: no module imports one that imports it back, even lazily."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "mandrill"


def imports() -> dict[str, set[str]]:
    """``module -> the mandrill modules it imports``, at its top level or inside a function
    (a deferred import hides a circle, it does not remove it). Imports under
    ``if TYPE_CHECKING:`` do not count: they are for the type checker alone."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in _nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {module for module in found if module in modules and module != name}
    return graph


def _nodes(tree: ast.AST) -> list[ast.AST]:
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            found += _nodes(ast.Module(body=node.orelse, type_ignores=[]))
            continue
        found.append(node)
        found += _nodes(node)
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import paths that lead from a module back to itself (one per circle's start)."""
    found = []
    for start in sorted(graph):
        stack = [(start, [start])]
        seen = set()
        while stack:
            module, path = stack.pop()
            for imported in sorted(graph[module]):
                if imported == start:
                    found.append([*path, start])
                elif imported not in seen:
                    seen.add(imported)
                    stack.append((imported, [*path, imported]))
    return found


def test_circles_are_found():
    assert circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b", "a"], ["b", "a", "b"]]


def test_no_import_circle():
    assert circles(imports()) == []


#: What a light module must not load: the Google and HTTP clients, the metrics library and
#: the backend that the command may not even run on.
HEAVY = ("aiohttp", "gcloud", "prometheus_client", "trio", "httpx")


@pytest.mark.parametrize(
    "code",
    [
        "import mandrill.config",
        "import mandrill.restarters.base",
        "import mandrill.restarters",
        "import mandrill.cli",
        # Validating --metrics-addr parses the address only.
        "import mandrill.config as c; c.load('run', {'metrics_addr': '127.0.0.1:9464'}, {})",
    ],
)
def test_light_imports(code):
    probe = (
        f"{code}\nimport sys\n"
        f"print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.split() == []
