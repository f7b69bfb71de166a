"""The house: one folder per layer, each importing only downward, and no import circle.

Every import of a service module by another is read from the source (module level,
inside functions and under ``TYPE_CHECKING`` alike: an import that only type-checks still
ties the two modules together), and checked against the order of the folders:

    config, errors  <  observe  <  memcache  <  readpath  <  flask  <  http | admin | gunicorn
    <  app (and the one-line modules that keep documented paths)

A folder may import its own modules and any folder below it, never one above, and the
three top folders never import each other.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[2] / "service"
RANK = {"": 0, "observe": 1, "memcache": 2, "readpath": 3, "flask": 4, "http": 5, "admin": 5,
        "gunicorn": 5}
TOP = {"app", "backend", "worker", "accesslog", "__init__"}  # the composition root, paths


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVICE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SERVICE.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The service modules ``name`` imports (``from . import x`` names module x)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in known else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != name}


def layer(name: str) -> tuple[str, int]:
    parts = name.split(".")
    if len(parts) == 2 and parts[1] in TOP or name == "service":
        return "top", 6
    folder = parts[1] if len(parts) > 2 or parts[1] in RANK else ""
    return folder, RANK[folder]


GRAPH = {name: imports(name, path, set(modules())) for name, path in modules().items()}


def test_the_layout_is_the_one_this_test_knows() -> None:
    folders = {p.parent.name for p in SERVICE.rglob("*.py") if p.parent != SERVICE}
    assert folders == set(RANK) - {""}
    loose = {p.stem for p in SERVICE.glob("*.py")}
    assert loose == {"config", "errors"} | TOP


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_a_module_imports_only_its_own_layer_and_those_below(name: str) -> None:
    folder, rank = layer(name)
    for target in GRAPH[name]:
        other, other_rank = layer(target)
        assert other_rank <= rank, f"{name} imports {target}, a layer above it"
        if other_rank == rank == 5:
            assert other == folder, f"{name} imports {target}: http, admin and gunicorn " \
                                    "stand side by side and never import each other"


def test_no_import_circle() -> None:
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> None:
        if name in path:
            circle = path[path.index(name):] + [name]
            raise AssertionError("import circle: " + " -> ".join(circle))
        if name in done:
            return
        path.append(name)
        for target in sorted(GRAPH[name]):
            # A package's __init__ re-exporting its own modules is not a circle.
            if not target.startswith(name + "."):
                visit(target)
        path.pop()
        done.add(name)

    for name in sorted(GRAPH):
        visit(name)


@pytest.mark.parametrize("path, attribute", [
    ("service.backend", "MemcachedCache"),                  # CACHE_TYPE users write
    ("service.worker", "post_worker_init"),                 # the gunicorn hooks
    ("service.worker", "worker_exit"),
    ("service.worker", "post_request"),
    ("service.accesslog", "BufferedAccessLogger"),          # logger_class
    ("service.admin", "bp"),                                # register_blueprint
    ("service.gunicorn.conf", "post_worker_init"),          # -c python:service.gunicorn.conf
    ("service.flask.health", "bp"),                         # SWR(app, endpoints=True)
])
def test_every_documented_import_path_still_works(path: str, attribute: str) -> None:
    assert getattr(importlib.import_module(path), attribute) is not None
