"""The layout holds: every package on its floor, imports only downward, no circle of modules.

Read from the source files themselves, as a new maintainer would. A failure names the file, the line
and the rule, so a change that breaks the layout says where and why.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lowest first: a package imports its own modules and those of the floors below it, never above.
FLOORS = ("core", "eventlog", "validation", "ingestion", "feature_repo", "training", "privacy", "bentos", "persona")
FLOOR = {name: n for n, name in enumerate(FLOORS)}
# The CLI is the top floor, which nothing imports: its heavy imports stay lazy so `persona --help` is quick.
LAZY_ALLOWED = ("persona/cli/",)
FEAST_ADAPTER = "feature_repo/pipeline/feast_adapter.py"
# Named private accessors, any private attribute of Feast's ``utils``, and private names imported from feast.
FEAST_PRIVATE = re.compile(r"\b_get_provider\b|\b_redis_key\b|\b_get_client\b|\b_get_conn\b|\bstore\.__dict__"
                           r"|\bfeast_utils\._|\bfeast\.utils\._|^\s*from feast[\w.]* import .*\b_[a-z]")


def _sources() -> dict[str, Path]:
    """Module name -> file, for every module of the project's packages."""
    out = {}
    for package in FLOORS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


SOURCES = _sources()


def _rehydrated(node: ast.AST) -> bool:
    """An on-demand view's function: Feast rebuilds it from its source text alone, so what it uses it
    must import inside (``feature_repo/features.py``'s request-time windows)."""
    return isinstance(node, ast.FunctionDef) and any(
        "on_demand_feature_view" in ast.unparse(d) for d in node.decorator_list)


def _imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, imported project module, inside a function?) for every import of a project module."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str, bool]] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name, local) for a in child.names if a.name.split(".")[0] in FLOOR)
            elif (isinstance(child, ast.ImportFrom) and child.module and not child.level
                  and child.module.split(".")[0] in FLOOR):
                for a in child.names:  # `from pkg import module` imports that module
                    sub = f"{child.module}.{a.name}"
                    found.append((child.lineno, sub if sub in SOURCES else child.module, local))
            visit(child, False if _rehydrated(child) else inner)

    visit(tree, False)
    return found


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_every_import_runs_downward():
    wrong = []
    for module, path in SOURCES.items():
        floor = FLOOR[module.split(".")[0]]
        for line, target, _ in _imports(path):
            if FLOOR[target.split(".")[0]] > floor:
                wrong.append(f"{_relative(path)}:{line} imports {target} (floor {target.split('.')[0]} is above "
                             f"{module.split('.')[0]})")
    assert not wrong, "imports that run upward:\n" + "\n".join(wrong)


def test_no_function_local_import_of_project_modules():
    """A local import of our own module hides a floor (or dodges a circle): only the CLI may have them."""
    wrong = [f"{_relative(path)}:{line} imports {target} inside a function"
             for module, path in SOURCES.items() if not _relative(path).startswith(LAZY_ALLOWED)
             for line, target, local in _imports(path) if local]
    assert not wrong, "\n".join(wrong)


def test_no_circle_of_modules():
    graph = {m: {t for _, t, _ in _imports(p) if t in SOURCES and t != m} for m, p in SOURCES.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    assert not circles, "modules that import each other in a circle: " + "; ".join(" <-> ".join(c) for c in circles)


def test_feast_internals_only_in_the_adapter():
    wrong = [f"{_relative(p)}:{n}: {line.strip()}" for p in SOURCES.values() if _relative(p) != FEAST_ADAPTER
             for n, line in enumerate(p.read_text().splitlines(), 1) if FEAST_PRIVATE.search(line)]
    assert not wrong, "private Feast internals outside feature_repo/pipeline/feast_adapter.py:\n" + "\n".join(wrong)


@pytest.mark.parametrize(("pattern", "home", "what"), [
    (r"^def _plain\b|^def plain\b", "core/plain.py", "a converter to plain JSON values"),
    (r"^EVENT_TYPES\s*[:=]", "core/contract.py", "the list of event types"),
    (r"[\"']persona-profile[\"']", "core/config.py", "the model's name"),
])
def test_one_definition(pattern, home, what):
    """Things that drifted apart when each module kept its own copy now have one home."""
    rx = re.compile(pattern, re.M)
    homes = sorted(_relative(p) for p in SOURCES.values() if rx.search(p.read_text()))
    assert homes == [home], f"{what} is defined in {homes}, expected only {home}"


def test_the_bento_ships_serving_not_the_cli():
    bentofile = (ROOT / "bentos" / "bentofile.yaml").read_text()
    included = re.findall(r'^\s*-\s*"([^"]+)"', bentofile.split("python:")[0], re.M)
    packages = {p.split("/")[0] for p in included}
    assert "persona" not in packages, "the bento ships the CLI"
    serving = {"core", "eventlog", "validation", "ingestion", "feature_repo", "training", "privacy", "bentos"}
    assert serving <= packages, f"the bento lacks {sorted(serving - packages)}"
