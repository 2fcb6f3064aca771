"""The code's shape, held by tests: the layers as import contracts, no import circles, and no
import inside a function but a deferred heavy one with its reason (docs/architecture.md)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "fltui")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` (import-linter) on the tree at ``cwd``, with its pyproject.toml."""
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [str(exe), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_layers_hold() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        # core reaching up into the site
        ("engine/events.py", "import engine.site.paths", "core imports none of the parts"),
        # the server importing the client
        (
            "engine/server/admin.py",
            "import engine.client.communicator",
            "the layers of docs/architecture.md",
        ),
        # the engine importing the console's UI
        ("engine/site/paths.py", "import rich", "the engine never imports the console"),
    ],
)
def test_a_deliberately_broken_import_breaks_its_contract(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    for folder in ("engine", "fltui", "protos"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # deliberately broken\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    broken = [row for row in result.stdout.splitlines() if row.endswith("BROKEN")]
    assert any(contract in row for row in broken), result.stdout


def _cycles(package: str) -> list[list[str]]:
    """The import circles among ``package``'s modules (strongly connected components, Tarjan),
    counting imports inside functions too."""
    graph = grimp.build_graph(package, include_external_packages=False)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(start: str) -> None:
        # iterative, so a deep import chain cannot reach the recursion limit
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append(
                        (child, iter(sorted(graph.find_modules_directly_imported_by(child))))
                    )
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circles(package: str) -> None:
    assert _cycles(package) == []


def test_the_circle_finder_finds_a_circle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "circle_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from circle_pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from circle_pkg import a  # inside a function too\n")
    (pkg / "c.py").write_text("from circle_pkg import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _cycles("circle_pkg") == [["circle_pkg.a", "circle_pkg.b"]]


def _deferred_without_reason(path: Path) -> list[str]:
    """Imports inside functions whose line carries no ``# deferred: <why>`` comment."""
    source = path.read_text()
    lines = source.splitlines()
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, (ast.Import, ast.ImportFrom)):
                text = lines[sub.lineno - 1]
                reason = text.partition("# deferred:")[2].strip()
                if not reason:
                    out.append(f"{path.relative_to(ROOT)}:{sub.lineno}: {text.strip()}")
    return sorted(set(out))


def test_imports_inside_functions_only_defer_with_a_reason() -> None:
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    bare = [line for path in files for line in _deferred_without_reason(path)]
    assert bare == [], "\n".join(bare)
