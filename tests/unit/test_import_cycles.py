"""Imports run one way: no module of backupmx imports, directly or through others, a module that imports it
back. The graph is read with ast from the source, module-level and function-level imports alike (a lazy
import hides a circle, it does not remove it), and checked with graphlib's topological sort. Imports under
`if TYPE_CHECKING:` are left out: they never run, and naming a type of a higher module in an annotation is
what they are for.
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


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: at module level, in functions and classes, under any `if` but
    the body of `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the modules of the package under `root` it imports (the most specific one named)."""
    paths = {module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        for node in runtime_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
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


def _two_modules(tmp_path: Path, b_imports_a: str) -> dict[str, set[str]]:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from pkg.sub.b import thing\n")
    (pkg / "sub" / "b.py").write_text(b_imports_a + "thing = 1\n")
    return import_graph(pkg)


@pytest.mark.parametrize("b_imports_a", [
    "from pkg.sub import a\n",  # module level, the submodule named through its package
    "def f():\n    from . import a\n",  # inside a function, relative
    "import typing\nif typing.TYPE_CHECKING:\n    pass\nelse:\n    import pkg.sub.a\n",  # the branch that runs
])
def test_a_circle_is_found_even_through_a_lazy_import(tmp_path: Path, b_imports_a: str) -> None:
    graph = _two_modules(tmp_path, b_imports_a)
    assert graph["pkg.sub.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.sub.a"}
    assert set(find_cycle(graph) or []) == {"pkg.sub.a", "pkg.sub.b"}


def test_an_annotation_only_import_is_no_circle(tmp_path: Path) -> None:
    graph = _two_modules(tmp_path, "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.a import X\n")
    assert graph["pkg.sub.b"] == set()
    assert find_cycle(graph) is None
