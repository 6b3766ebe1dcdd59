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
