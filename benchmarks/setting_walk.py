"""Which project files a setting passes through, from the command line to the tensors, measured by running it.

Runs ``<module>.main(argv)`` in this process under ``sys.settrace`` and records every project file (the current
folder's, not installed packages) with a function called with the sentinel value in its arguments, directly or
inside a container, dataclass, mapping or ``argparse.Namespace`` (searched 6 levels deep). Give the setting a
value that appears nowhere else (``0.61803``), so that each recorded file handled this setting.

``--name scaling_coefficient`` also lists the project files whose code names the setting (an identifier, keyword or
string other than a docstring): the files a change of the setting, or a new method's setting, has to touch.

Example (a GLUE merge setting; any tree, run from its root):
    python benchmarks/setting_walk.py --value 0.61803 --name scaling_coefficient -- merge_plms_glue --grid none \
        --merging_method_name task_arithmetic --scaling_coefficient 0.61803 ...
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import json
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path.cwd().resolve()
_SKIP_TYPES = ("Tensor", "Module", "ndarray", "DataLoader", "Dataset", "PreTrainedTokenizerBase")


def _contains(value: Any, sentinel: float, depth: int, seen: set[int], opaque: tuple[str, ...] = ()) -> bool:
    if isinstance(value, float):
        return value == sentinel
    if depth == 0 or id(value) in seen or isinstance(value, (str, bytes, int, bool, type(None))):
        return False
    if any(base.__name__ in (*_SKIP_TYPES, *opaque) for base in type(value).__mro__):
        return False
    seen.add(id(value))
    try:
        children = _children(value)
    except Exception:  # an object under construction (its __init__ is being traced) has nothing to look at yet
        return False
    return any(_contains(child, sentinel, depth - 1, seen, opaque) for child in children[:64])


def _children(value: Any) -> list:
    if isinstance(value, Mapping):
        children = list(value.values())
    elif isinstance(value, (list, tuple, set, frozenset)):
        children = list(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        children = [getattr(value, f.name, None) for f in dataclasses.fields(value)]
    elif isinstance(value, argparse.Namespace):
        children = list(vars(value).values())
    else:
        children = []
    return children


def walk(module_name: str, argv: list[str], sentinel: float, opaque: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """``{project file: [functions called with the sentinel]}``; objects of the ``opaque`` class names are not
    looked into (a function passing a whole recipe on does not handle the setting itself)."""
    files: dict[str, set[str]] = {}
    venv = str(ROOT / ".venv")

    def tracer(frame, event, arg):
        if event != "call":
            return None
        filename = frame.f_code.co_filename
        if not filename.startswith(str(ROOT)) or filename.startswith(venv):
            return None
        arguments = frame.f_code.co_varnames[:frame.f_code.co_argcount + frame.f_code.co_kwonlyargcount]
        local = frame.f_locals
        if any(_contains(local.get(name), sentinel, 6, set(), opaque) for name in arguments) or any(
                _contains(v, sentinel, 6, set(), opaque) for k, v in local.items() if k in ("args", "kwargs")):
            files.setdefault(os.path.relpath(filename, ROOT), set()).add(frame.f_code.co_name)
        return None

    module = importlib.import_module(module_name)
    sys.settrace(tracer)
    threading.settrace(tracer)  # the streaming merger's worker threads
    try:
        module.main(argv)
    finally:
        sys.settrace(None)
        threading.settrace(None)
    return {name: sorted(functions) for name, functions in sorted(files.items())}


def _names(path: Path, name: str) -> bool:
    """True when ``path``'s code (docstrings aside) names ``name``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value == name and id(node) not in docstrings:
            return True
        if getattr(node, "attr", None) == name or getattr(node, "id", None) == name:
            return True
        if isinstance(node, (ast.keyword, ast.arg)) and node.arg == name:
            return True
    return False


def naming_files(name: str) -> list[str]:
    """Project files (top-level scripts and packages; tests, benchmarks and scripts/ aside) naming ``name``."""
    paths = [p for p in ROOT.rglob("*.py") if not ({".venv", "tests", "benchmarks", "scripts"} & set(
        p.relative_to(ROOT).parts))]
    return sorted(str(p.relative_to(ROOT)) for p in paths if _names(p, name))


def main(argv: list[str] | None = None) -> dict[str, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--value", type=float, required=True, help="the setting's sentinel value")
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--opaque", nargs="*", default=[], help="class names not looked into (e.g. Recipe)")
    parser.add_argument("--name", help="also list the project files whose code names this setting")
    parser.add_argument("module", help="a top-level script with main(argv), e.g. merge_plms_glue")
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="its arguments")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    files = walk(args.module, args.argv, args.value, tuple(args.opaque))
    for name, functions in files.items():
        print(f"{name}: {', '.join(functions)}")
    print(f"{len(files)} files")
    if args.name:
        named = naming_files(args.name)
        print(f"{len(named)} files name {args.name}: {', '.join(named)}")
        walked = [name for name in files if name in named]
        print(f"{len(walked)} of the {len(files)} walked files name it: {', '.join(walked)}")
    if args.json:
        Path(args.json).write_text(json.dumps(files, indent=1) + "\n", encoding="utf-8")
    return files


if __name__ == "__main__":
    main()
