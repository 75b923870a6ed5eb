"""The package's layout: no module imports another that (directly or not) imports it back."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "threadline"


def _graph() -> dict[str, set[str]]:
    modules: dict[str, Path] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        # every import counts: module level, inside functions, and under TYPE_CHECKING
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("threadline"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.append(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.extend(a.name for a in node.names if a.name.startswith("threadline"))
            # the package itself re-exports everything: an edge to it says nothing of the layout
            graph[name].update(t for t in targets if t in modules and t != "threadline")
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_module_imports_itself_back() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


# What each role package may import (besides itself): the context core knows nothing else; capture
# (ddl) knows no transport; propagation never reads the audit trail; reading it (explore) may write
# through the context bridge (revert); running the store (ops) may read it; the command line and
# the framework integrations sit on top.
ALLOWED = {
    "core": set(),
    "ddl": {"core"},
    "propagation": {"core", "ddl"},
    "explore": {"core", "ddl", "propagation"},
    "ops": {"core", "ddl", "explore", "propagation"},
    "cli": {"core", "ddl", "explore", "ops", "propagation", "demo"},
}


def _role(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _role_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if _role(module) in ALLOWED
        for target in targets
        if _role(target) != _role(module) and _role(target) not in ALLOWED[_role(module)]
    )


def test_role_packages_import_only_what_their_role_allows() -> None:
    assert _role_violations(_graph()) == []


def test_the_role_check_reports_a_forbidden_import() -> None:
    graph = {"threadline.propagation.web": {"threadline.explore.query", "threadline.core.context"}}
    assert _role_violations(graph) == ["threadline.propagation.web imports threadline.explore.query"]


def test_importing_the_package_loads_no_driver_or_framework() -> None:
    code = (
        "import sys, threadline\n"
        "heavy = ('psycopg', 'celery', 'kombu', 'django', 'sqlalchemy')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in heavy}))\n"
        "threadline.history\n"
        "print('psycopg' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "True"]


def test_every_public_name_resolves() -> None:
    import threadline

    missing = [name for name in threadline.__all__ if not hasattr(threadline, name)]
    assert missing == []
    assert "history" in dir(threadline)


MAX_MODULE_LINES = 400


def _long_modules(limit: int) -> list[str]:
    return sorted(
        f"{path.relative_to(PACKAGE.parent)}: {count} lines"
        for path in PACKAGE.rglob("*.py")
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > limit
    )


def test_every_module_stays_short() -> None:
    assert _long_modules(MAX_MODULE_LINES) == [], (
        f"split these by job (at most {MAX_MODULE_LINES} lines each)"
    )


def test_the_length_check_reports_a_long_module() -> None:
    assert any(line.startswith("threadline/") for line in _long_modules(100))
