"""Read a generations JSONL file and line it up with the test records.

Format: one JSON object per line with ``completion`` (raw model text, prompt excluded) and the example id:
``idx`` (0-based line number in the test file) for gsm8k and MATH, ``task_id`` for human_eval
(``"HumanEval/0"``) and mbpp (``11``..``510``). A subset of the test set may be given; each id at most once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from evaluation.data import read_jsonl
from evaluation.tasks import TaskSpec, get_task


def _record_key(task: TaskSpec, record: Mapping[str, Any], position: int) -> Any:
    if task.id_field == "idx":
        return position
    return int(record["task_id"]) if task.name == "mbpp" else str(record["task_id"])


def _generation_key(task: TaskSpec, row: Mapping[str, Any], path: Any, line: int) -> Any:
    if task.id_field not in row or "completion" not in row:
        raise ValueError(
            f"{path} line {line}: each {task.name} generation must have '{task.id_field}' and 'completion', "
            f"got keys {sorted(row)}"
        )
    value = row[task.id_field]
    if task.id_field == "idx" or task.name == "mbpp":
        try:
            return int(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path} line {line}: {task.id_field} must be an integer, got {value!r}") from error
    return str(value)


def align_generations(
    task: TaskSpec | str, records: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], source: Any = ""
) -> tuple[list[Any], list[Mapping[str, Any]], list[str]]:
    """Match generation rows to test records by id.

    Args:
        task: spec or name.
        records: the full test set (``evaluation.data.load_records``).
        rows: parsed generation objects.
        source: file name used in error messages.

    Returns:
        ``(ids, records, completions)`` for the generated examples, in test-set order.
    """
    task = get_task(task) if isinstance(task, str) else task
    by_key = {_record_key(task, r, i): r for i, r in enumerate(records)}
    completions: dict[Any, str] = {}
    for line, row in enumerate(rows, start=1):
        key = _generation_key(task, row, source, line)
        if key not in by_key:
            raise ValueError(f"{source} line {line}: {task.id_field} {key!r} is not in the {task.name} test set "
                             f"({len(records)} examples); ids must match the test file")
        if key in completions:
            raise ValueError(f"{source} line {line}: {task.id_field} {key!r} appears twice; keep one generation")
        completions[key] = str(row["completion"])
    ids = [k for k in by_key if k in completions]
    return ids, [by_key[k] for k in ids], [completions[k] for k in ids]


def read_generations(
    task: TaskSpec | str, path: str | os.PathLike, records: Sequence[Mapping[str, Any]]
) -> tuple[list[Any], list[Mapping[str, Any]], list[str]]:
    """:func:`align_generations` on the rows of a JSONL file."""
    rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{path} must contain at least one generation, got an empty file")
    return align_generations(task, records, rows, source=path)
