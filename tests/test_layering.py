"""One dependency direction: a package imports only the layers below it, never a higher one or a sibling.

Layers, lowest first (a package may import the packages listed after the arrow):

* ``common`` -> nothing of this project;
* ``model_merging_methods`` -> ``common``;
* ``merge_engine`` -> ``model_merging_methods``, ``common``;
* ``delta_analysis`` -> ``merge_engine`` (its streamed readers), ``model_merging_methods``, ``common``;
* ``evaluation`` -> ``common``;
* ``cli`` -> ``model_merging_methods``, ``common``;
* ``glue``, ``llms`` -> every package above, not each other;
* top-level scripts, ``benchmarks/`` and ``tests/`` -> anything (nothing imports them).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

LOWER = ("common", "model_merging_methods", "merge_engine", "delta_analysis", "evaluation", "cli")
ALLOWED: dict[str, set[str]] = {
    "common": set(),
    "model_merging_methods": {"common"},
    "merge_engine": {"model_merging_methods", "common"},
    "delta_analysis": {"merge_engine", "model_merging_methods", "common"},
    "evaluation": {"common"},
    "cli": {"model_merging_methods", "common"},
    "glue": set(LOWER),
    "llms": set(LOWER),
}


def project_names() -> set[str]:
    """Every importable name of this project: the packages and the top-level scripts."""
    return set(ALLOWED) | {p.stem for p in REPO_ROOT.glob("*.py")}


def imported_names(path: Path) -> set[str]:
    """The first component of every absolute import in ``path`` (module level and inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_package_of_the_repository_has_a_layer():
    packages = {p.parent.name for p in REPO_ROOT.glob("*/__init__.py")}
    assert packages == set(ALLOWED), f"give {sorted(packages ^ set(ALLOWED))} a layer in ALLOWED"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_lower_layers(package):
    ours = project_names()
    wrong = {}
    for path in sorted((REPO_ROOT / package).rglob("*.py")):
        bad = (imported_names(path) & ours) - ALLOWED[package] - {package}
        if bad:
            wrong[str(path.relative_to(REPO_ROOT))] = sorted(bad)
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package]) or 'nothing of ours'}; got {wrong}"


def test_no_package_imports_a_script():
    scripts = {p.stem for p in REPO_ROOT.glob("*.py")}
    wrong = {str(p.relative_to(REPO_ROOT)): sorted(imported_names(p) & scripts)
             for package in ALLOWED for p in sorted((REPO_ROOT / package).rglob("*.py"))
             if imported_names(p) & scripts}
    assert not wrong, f"packages must not import top-level scripts (move shared code into a package), got {wrong}"


def test_the_check_sees_an_upward_import(tmp_path):
    module = tmp_path / "upward.py"
    module.write_text("def f():\n    from llms.llm_configs import MERGE_SCRIPT\n    import glue.glue_data\n")
    assert imported_names(module) == {"llms", "glue"}


def module_name(path: Path) -> str:
    """``glue/glue_data.py`` -> ``glue.glue_data``; a package's ``__init__.py`` -> the package."""
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """Every project module ``path`` imports: ``import a.b``, ``from a.b import c`` (``a.b.c`` when that is a
    module), and ``importlib.import_module("a.b")`` with a literal name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        for name in names:
            if name in modules:
                found.add(name)
                break
    return found


def import_cycles(paths: list[Path]) -> list[list[str]]:
    """Every cycle of the file-level import graph (one list of modules per strongly connected component)."""
    modules = {module_name(p): p for p in paths}
    graph = {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return cycles


def test_no_import_cycle_between_files():
    paths = [p for package in ALLOWED for p in sorted((REPO_ROOT / package).rglob("*.py"))]
    paths = [p for p in paths if p.name != "__init__.py"]  # a package's __init__ only re-exports its modules
    assert import_cycles(paths) == [], "break each cycle: move what both files need into a lower module"


def test_the_cycle_check_sees_a_cycle_and_a_dynamic_import(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO_ROOT", tmp_path)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("from pkg.b import x\n")
    (tmp_path / "pkg" / "b.py").write_text("import importlib\ndef f():\n    importlib.import_module('pkg.a')\n")
    (tmp_path / "pkg" / "c.py").write_text("import pkg.a\n")
    assert import_cycles(sorted((tmp_path / "pkg").glob("*.py"))) == [["pkg.a", "pkg.b"]]
