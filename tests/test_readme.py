"""The Python examples of the README and docs/ run as written, and the README's set-up/test commands are what CI
runs."""

from __future__ import annotations

import importlib
import re
import shlex
import sys
from pathlib import Path

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



# Shell variables of the documented commands, replaced by values of the kind they stand for.
_SHELL_VALUES = {
    "$M": "--model_path Llama-2-13b-hf=/models/Llama-2-13b-hf", "$p": "lm+math/task_arithmetic", "$d": "gsm8k",
    "$m": "WizardLM-13B-V1.2", "$i": "0", "$C": "--language_model_name all-MiniLM-L6-v2 --output_dir results/x",
}


def _without_command_substitutions(text: str) -> str:
    """``text`` with every ``$( ... )`` (nested parentheses included) replaced by ``/path``."""
    while (start := text.find("$(")) >= 0:
        depth, end = 0, start + 1
        for end in range(start + 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        text = text[:start] + "/path" + text[end + 1:]
    return text


def _documented_commands() -> list[tuple[str, str, list[str]]]:
    """``(document, script, argv)`` of every ``python <script>.py ...`` line in a bash block of README.md, docs/
    and benchmarks/README.md (continuation lines joined, ``$(...)`` and the variables above substituted)."""
    commands = []
    for document in [*DOCUMENTS, "benchmarks/README.md"]:
        for block in _blocks("bash", document):
            block = _without_command_substitutions(block.replace("\\\n", " "))
            for line in block.splitlines():
                for script, rest in re.findall(r"python (\S+\.py)([^;#|&]*)", line):
                    for name, value in _SHELL_VALUES.items():
                        rest = rest.replace(name, value)
                    assert "$" not in rest, f"{document}: unknown shell variable in {line!r}; add it above"
                    commands.append((document, script, shlex.split(rest)))
    return commands


def test_documented_commands_parse():
    """Every documented script command is accepted by the script's own argument parser (flags, values, choices)."""
    commands = _documented_commands()
    assert len(commands) >= 30, commands
    for document, script, argv in commands:
        path = REPO_ROOT / script
        assert path.is_file(), f"{document}: no script {script}"
        sys.path.insert(0, str(path.parent))  # benchmarks/ scripts import their neighbours
        try:
            module = importlib.import_module(path.stem)
        finally:
            sys.path.remove(str(path.parent))
        assert Path(module.__file__).resolve() == path.resolve(), (script, module.__file__)
        parse = getattr(module, "parse_args", None)
        if parse is None:  # scripts that build their parser inside main(): --help is all that can be checked
            continue
        try:
            parse(argv)
        except SystemExit as exc:
            raise AssertionError(f"{document}: {script} rejects {argv}") from exc


def test_original_readme_commands_are_documented():
    """Every command of the original MergeLM README appears, as one command line, in README.md or docs/."""
    from test_readme_commands import ORIGINAL_README_COMMANDS

    documented = set()
    for document in DOCUMENTS:
        for block in _blocks("bash", document):
            documented |= {" ".join(line.split()) for line in block.replace("\\\n", " ").splitlines()}
    missing = [command for command in ORIGINAL_README_COMMANDS if command not in documented]
    assert not missing, missing
