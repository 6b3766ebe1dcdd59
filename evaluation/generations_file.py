"""The generations file: one JSON line per example, written incrementally with resume, read back for scoring.

Format: one JSON object per line with ``completion`` (raw model text, prompt excluded) and the example id:
``idx`` (0-based line number in the test file) for gsm8k and MATH, ``task_id`` for human_eval
(``"HumanEval/0"``) and mbpp (``11``..``510``). A subset of the test set may be given; each id at most once.

* Writing: :func:`generate_to_jsonl` appends one line per finished example (the example's keys plus
  ``completion``, and ``settings``: how the generations are made, when the caller states it), flushed as soon
  as the example is handed over (per batch with Hugging Face, per chunk of ``vllm_chunk_size`` prompts with
  vLLM, so a kill loses at most the running batch or chunk) and, with ``resume=True``, skips examples whose id
  already has a line.
* Reading while writing: :func:`load_finished_generations` tolerates a truncated last line (a killed run) and
  reports where the valid part ends, so a resumed run can cut the file there; given ``settings``, it refuses
  lines made with other settings, so a resumed file never mixes generations made differently.
* Reading for scoring: :func:`read_generations` wants a complete file and lines it up with the test records.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evaluation import generation
from evaluation.data import read_jsonl
from evaluation.tasks import TaskSpec, get_task

logger = logging.getLogger(__name__)


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


# ---------------------------------------------------------------------------------------------------------------
# Writing with resume: one JSON line per finished example


def _jsonable(settings: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(settings), default=str))


def _check_settings(path: Any, number: int, record: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    recorded = record.get("settings")
    if recorded == settings:
        return
    if not isinstance(recorded, Mapping):
        differ = f"no settings recorded, these are {settings}"
    else:
        differ = ", ".join(f"{k}: {recorded.get(k)!r} there, {settings.get(k)!r} now"
                           for k in sorted(set(recorded) | set(settings)) if recorded.get(k) != settings.get(k))
    raise ValueError(f"{path}: line {number} was generated with other settings ({differ}); a resumed file must not "
                     "mix generations made differently: delete the file, or resume with the settings it was made with")


def load_finished_generations(
    path: str | os.PathLike, *, id_field: str = "id", settings: Mapping[str, Any] | None = None
) -> tuple[dict[Any, dict[str, Any]], int]:
    """Records of a generations JSONL file by ``record[id_field]``, and the byte length of its valid part.

    A last line without a newline or not valid JSON (a run killed mid-write) is ignored; its bytes are not
    counted, so the caller can truncate the file there. A broken line before the last one is an error.

    Args:
        settings: how the generations about to be added are made (what :func:`generate_to_jsonl` records under
            ``settings``); a line recorded with other settings, or with none, is a ValueError naming the
            difference. None: not checked (reading a file for scoring).
    """
    expected = _jsonable(settings) if settings is not None else None
    records: dict[Any, dict[str, Any]] = {}
    valid_bytes = 0
    if not os.path.exists(path):
        return records, 0
    with open(path, "rb") as handle:
        lines = handle.readlines()
    for number, raw in enumerate(lines, start=1):
        is_last = number == len(lines)
        try:
            record = json.loads(raw) if raw.endswith(b"\n") or not is_last else None
        except json.JSONDecodeError as error:
            if not is_last:
                raise ValueError(
                    f"{path}: line {number} is not valid JSON ({error}); delete the file to start over"
                ) from error
            record = None
        if record is None:
            logger.warning("%s: ignoring a truncated last line (%d bytes)", path, len(raw))
            break
        if not isinstance(record, dict) or id_field not in record:
            raise ValueError(f"{path}: line {number} must be a JSON object with {id_field!r}, got {raw[:80]!r}")
        if expected is not None:
            _check_settings(path, number, record, expected)
        records[record[id_field]] = record
        valid_bytes += len(raw)
    return records, valid_bytes


def _check_examples(examples: Sequence[Mapping[str, Any]], id_field: str) -> None:
    seen: set[Any] = set()
    for example in examples:
        if id_field not in example or "prompt" not in example:
            raise ValueError(f"each example needs {id_field!r} and 'prompt' keys, got keys {sorted(example)}")
        key = example[id_field]
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            raise ValueError(f"example {id_field} values must be str or int (JSON round-trips them), got {key!r}")
        if key in seen:
            raise ValueError(f"example {id_field} values must be unique, got {key!r} twice")
        seen.add(key)


def _check_resumed(
    path: str | os.PathLike, examples: Sequence[Mapping[str, Any]], done: Mapping[Any, Any], id_field: str
) -> None:
    for example in examples:
        record = done.get(example[id_field])
        if record is not None and record.get("prompt") != example["prompt"]:
            raise ValueError(
                f"{path}: {id_field} {example[id_field]!r} was generated from a different prompt; the file belongs "
                "to another configuration, delete it or write to a new file"
            )


def generate_to_jsonl(
    examples: Sequence[Mapping[str, Any]],
    generations_path: str | os.PathLike,
    *,
    resume: bool = True,
    id_field: str = "id",
    settings: Mapping[str, Any] | None = None,
    **generate_kwargs: Any,
) -> list[dict[str, Any]]:
    """Generate for ``examples`` and append one JSON line per finished example to ``generations_path``.

    Args:
        examples: dicts with a unique id (str or int) under ``id_field`` and a ``prompt``; all keys are copied
            into the line, which also gets ``completion``.
        generations_path: the JSONL file (created with its folder if missing).
        resume: keep lines already in the file and generate only the missing ids (a truncated last line is
            dropped); with ``False`` an existing file is replaced.
        id_field: key of the example id; ``evaluation.tasks`` uses ``idx`` (gsm8k, MATH) and ``task_id`` (code),
            which makes the file readable by :func:`read_generations`.
        settings: how the generations are made (backend, dtype, ...: whatever changes them), written into every
            line; with ``resume``, lines made with other settings are a ValueError (:func:`load_finished_generations`).
        **generate_kwargs: passed to ``evaluation.generation.generate`` (``model_path``, ``backend``,
            ``max_tokens``, ``stop``, ``vllm_chunk_size``, ...).
    Returns:
        One record per example, in the order of ``examples``.
    """
    _check_examples(examples, id_field)
    path = Path(generations_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done, valid_bytes = load_finished_generations(path, id_field=id_field, settings=settings) if resume else ({}, 0)
    _check_resumed(path, examples, done, id_field)
    todo = [example for example in examples if example[id_field] not in done]
    logger.info(
        "%s: %d of %d examples already generated, %d to go", path, len(examples) - len(todo), len(examples), len(todo)
    )
    with open(path, "r+b" if path.exists() else "wb") as handle:
        handle.truncate(valid_bytes)  # drops a truncated last line, or everything when not resuming

    made_with = {"settings": _jsonable(settings)} if settings is not None else {}
    with open(path, "a", encoding="utf-8") as handle:

        def write(index: int, text: str) -> None:
            record = {**todo[index], "completion": text, **made_with}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            done[record[id_field]] = record

        if todo:
            # looked up on the module at call time: a patched evaluation.generation.generate is used here too
            generation.generate([example["prompt"] for example in todo], on_result=write, **generate_kwargs)
    return [done[example[id_field]] for example in examples]
