"""Write benchmark records under MergeLM's ``math_code_data/`` file names (used by prepare_math_code_data.py).

Files: ``gsm8k_test.jsonl`` (``question``, ``answer``), ``MATH_test.jsonl`` in MergeLM/WizardMath format
(``idx`` = ``hendrycks_math_<n>``, ``instruction``, ``output``, ``input``, ``type``, plus ``level``),
``mbpp.test.jsonl`` (MBPP records as in the hub's ``full`` config) and ``alpaca_eval.json`` (a JSON list).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.run_dir import atomic_write_text
from evaluation.tasks import get_task

PREPARABLE_DATASETS = ("gsm8k", "MATH", "mbpp", "alpaca_eval")


def to_mergelm_math_record(record: Mapping[str, Any], position: int) -> dict[str, Any]:
    """Hendrycks ``problem``/``solution`` record -> MergeLM ``instruction``/``output`` record (1-based idx)."""
    return {
        "idx": record.get("idx", f"hendrycks_math_{position + 1}"), "instruction": record["problem"],
        "output": record["solution"], "input": "", "type": record.get("type", ""), "level": record.get("level", ""),
    }


def write_math_code_file(name: str, records: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike) -> Path:
    """Write one benchmark's records atomically under its MergeLM file name.

    Args:
        name: ``gsm8k``, ``MATH``, ``mbpp`` or ``alpaca_eval``.
        records: records as returned by ``evaluation.data.load_records`` / ``load_records_from_hub``.
        output_dir: target folder (MergeLM: ``math_code_data/``).

    Returns:
        The written path.
    """
    if name not in PREPARABLE_DATASETS:
        raise ValueError(f"dataset name must be one of {PREPARABLE_DATASETS}, got {name!r}")
    path = Path(output_dir) / get_task(name).data_file
    if name == "alpaca_eval":
        atomic_write_text(path, json.dumps(list(records), indent=2, ensure_ascii=False) + "\n")
        return path
    if name == "MATH":
        records = [to_mergelm_math_record(r, i) for i, r in enumerate(records)]
    atomic_write_text(path, "".join(json.dumps(dict(r)) + "\n" for r in records))
    return path
