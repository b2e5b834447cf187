"""Imports run one way: no module of backupmx imports, directly or through others, a module that imports it
back. The graph is read with ast from the source (module-level, function-level and TYPE_CHECKING imports
alike: a lazy import hides a circle, it does not remove it) and checked with graphlib's topological sort.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

import backupmx

PACKAGE_ROOT = Path(backupmx.__file__).resolve().parent


def module_name(root: Path, path: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the modules of the package under `root` it imports (the most specific one named)."""
    paths = {module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package holding this module
                    anchor = name.split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from pkg import sub` imports the submodule; `from mod import name` imports mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names]
            for target in targets:
                # `import a.b.c` names a.b.c; fall back to the nearest enclosing module of ours
                while target and target not in paths:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        return list(e.args[1])
    return None


def test_backupmx_has_no_import_cycle() -> None:
    graph = import_graph(PACKAGE_ROOT)
    assert len(graph) > 50  # the walk found the package, not an empty folder
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("lazy", [False, True])
def test_a_circle_is_found_even_through_a_function_level_import(tmp_path: Path, lazy: bool) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from pkg.sub.b import thing\n")
    b = "def f():\n    from . import a\n" if lazy else "from pkg.sub import a\n"
    (pkg / "sub" / "b.py").write_text(b + "thing = 1\n")
    graph = import_graph(pkg)
    assert graph["pkg.sub.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.sub.a"}
    assert set(find_cycle(graph) or []) == {"pkg.sub.a", "pkg.sub.b"}
