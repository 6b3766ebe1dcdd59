"""The Python examples of the README and docs/ run as written, and the README's set-up/test commands are what CI
runs."""

from __future__ import annotations

import re

import pytest
from conftest import REPO_ROOT

DOCUMENTS = ["README.md", *sorted(f"docs/{p.name}" for p in (REPO_ROOT / "docs").glob("*.md"))]


def _blocks(language: str, document: str = "README.md") -> list[str]:
    text = (REPO_ROOT / document).read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_readme_has_python_examples():
    assert len(_blocks("python")) >= 2
    assert len(_blocks("python", "docs/merging_library.md")) >= 2


@pytest.mark.parametrize("document", DOCUMENTS)
def test_python_examples_run(document):
    for block in _blocks("python", document):
        if "# not run in tests" in block:
            continue
        exec(compile(block, document, "exec"), {})


def _section_commands(heading: str) -> list[str]:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_setup_and_test_commands():
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = _section_commands("Set-up") + _section_commands("Tests")
    assert len(commands) >= 5, commands
    for command in commands:
        assert command in ci, f"README command not run by .ci/run: {command}"

