"""Paper-shaped table of the LLM scripts' runs, for ``summarize_results.py``.

One row per evaluated model: a fine-tuned LLM with or without DARE (``inference_llms_instruct_math_code.py``,
one run folder per dataset) or a merge (``merge_llms_instruct_math_code.py`` and
``direct_inference_merged_llms_instruct_math_code.py``); one column per benchmark (AlpacaEval, GSM8K, MATH,
HumanEval, MBPP). Runs of the same model on different datasets are combined into one row. Cells: GSM8K / MATH
``accuracy`` and HumanEval / MBPP ``pass@1``, x100, the AlpacaEval ``win_rate`` (percent) once ingested
(``evaluate_generations.py --dataset_name alpaca_eval``); ``files`` where the run only wrote the generations for
the external evaluator (AlpacaEval until its score is ingested, code without ``--allow_code_execution``); empty
where not run. Runs on
part of a test set (``--start_index`` / ``--end_index``) or with ``--max_new_tokens`` get their own rows.
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from model_merging_methods import MERGE_METHODS

logger = logging.getLogger(__name__)

INFERENCE_SCRIPT = "inference_llms_instruct_math_code"
MERGE_SCRIPT = "merge_llms_instruct_math_code"
DIRECT_SCRIPT = "direct_inference_merged_llms_instruct_math_code"
# config.json fields each script's record must have for its row (older or hand-written records go to "Other runs")
LLM_REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    INFERENCE_SCRIPT: ("finetuned_model_name", "weight_mask_rate"),
    MERGE_SCRIPT: ("merge_tasks", "merging_method_name", "mask_apply_method"),
    DIRECT_SCRIPT: ("merged_model_path",),
}
LLM_COLUMNS: dict[str, str] = {"alpaca_eval": "AlpacaEval", "gsm8k": "GSM8K", "MATH": "MATH",
                               "human_eval": "HumanEval", "mbpp": "MBPP"}
HEADLINE_METRICS = ("accuracy", "pass@1")
WIN_RATE = "win_rate"  # AlpacaEval, percent (evaluate_generations.py --dataset_name alpaca_eval)
NOT_SCORED = "files"
MERGE_TASK_ORDER = ("instruct", "math", "code")
LLM_METHOD_ORDER = ("average_merging", "task_arithmetic", "ties_merging")
Table = tuple[list[str], list[list[Any]]]
SortKey = tuple[int, str, int, int, float, str]


def is_llm_run(config: Mapping[str, Any]) -> bool:
    """True for a ``config.json`` record of one of the three LLM scripts that has the fields its row needs."""
    required = LLM_REQUIRED_FIELDS.get(config.get("script", ""))
    if required is None or any(name not in config for name in required):
        return False
    merge = config.get("merge")
    return config["script"] != DIRECT_SCRIPT or merge is None or is_llm_run(merge)


def _cell(result: Mapping[str, Any]) -> float | str:
    for key in HEADLINE_METRICS:
        value = result.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) * 100
    value = result.get(WIN_RATE)  # ingested AlpacaEval win rate: already percent
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return NOT_SCORED


def _slice_suffix(evaluation: Mapping[str, Any] | None) -> str:
    """`` [end_index=20]`` etc. for settings that make a run incomparable with a full one (``naming()``)."""
    evaluation = evaluation or {}
    parts = []
    if evaluation.get("start_index"):
        parts.append(f"start_index={evaluation['start_index']}")
    if evaluation.get("end_index") is not None and evaluation["end_index"] < sys.maxsize:
        parts.append(f"end_index={evaluation['end_index']}")
    if evaluation.get("max_new_tokens") is not None:
        parts.append(f"max_new_tokens={evaluation['max_new_tokens']}")
    return f" [{', '.join(parts)}]" if parts else ""


def _dare_setting(config: Mapping[str, Any]) -> str:
    """``+ DARE p=0.9``, ``+ DropOnly-magnitude p=0.5``, ``+ DARE-finetuned_weight p=0.1 seed=1``."""
    name = "DARE" if config.get("use_weight_rescale") else "DropOnly"
    if config.get("mask_strategy") == "magnitude":
        name += "-magnitude"
    if config.get("weight_format") == "finetuned_weight":
        name += "-finetuned_weight"
    setting = f"+ {name} p={config['weight_mask_rate']}"
    return setting + (f" seed={config['seed']}" if config.get("seed") else "")


def _inference_row(config: Mapping[str, Any]) -> tuple[SortKey, str, str]:
    """``(sort key, model, setting)``: ``fine-tuned`` first, then DARE, DropOnly, their magnitude and
    finetuned_weight variants, each by rate."""
    model, rate = config["finetuned_model_name"], float(config["weight_mask_rate"])
    if rate == 0.0:
        return (0, model, 0, 0, 0.0, ""), model, "fine-tuned"
    setting = _dare_setting(config)
    if config.get("wizardcoder_use_llama2_as_backbone"):
        setting += f" ({config.get('backbone_name')} backbone)"
    variant = (int(not config.get("use_weight_rescale")) + 2 * int(config.get("mask_strategy") == "magnitude")
               + 4 * int(config.get("weight_format") == "finetuned_weight"))
    return (0, model, 1, variant, rate, setting), model, setting


#: short names of the paper's settings in a merge's row (the others keep their own names)
SHORT_NAMES = {"scaling_coefficient": "lambda", "param_value_mask_rate": "trim"}


def _merge_method(merge: Mapping[str, Any]) -> str:
    """The applied method and each of its settings: ``task_arithmetic lambda=1.0``, ``toy_method toy_alpha=0.5``.

    The settings are the ones the record's ``recipe`` holds (older records: the method's declared settings found
    among the flat keys).
    """
    dare = merge["merging_method_name"] == "mask_merging"
    method = merge["mask_apply_method"] if dare else merge["merging_method_name"]
    recipe = merge.get("recipe")
    if recipe:
        settings = dict(recipe["hyperparameters"])
    else:
        declared = MERGE_METHODS[method].specs if method in MERGE_METHODS else {}
        settings = {name: merge[name] for name in declared if name in merge}
    return " ".join([method, *(f"{SHORT_NAMES.get(name, name)}={value}" for name, value in settings.items())])


def _merge_row(merge: Mapping[str, Any]) -> tuple[SortKey, str, str]:
    """``(sort key, tasks, setting)``: pairs before triples, then method, plain before DARE, then rate."""
    tasks = [t for t in MERGE_TASK_ORDER if t in merge["merge_tasks"]]
    dare = merge["merging_method_name"] == "mask_merging"
    method = _merge_method(merge)
    setting = f"{method} {_dare_setting(merge)}" if dare else method
    base = method.split(" ")[0]
    method_index = LLM_METHOD_ORDER.index(base) if base in LLM_METHOD_ORDER else len(LLM_METHOD_ORDER)
    tasks_order = f"{len(tasks)}" + "".join(str(MERGE_TASK_ORDER.index(t)) for t in tasks)
    rate = float(merge["weight_mask_rate"]) if dare else 0.0
    return (1, tasks_order, method_index, int(dare), rate, setting), "+".join(tasks), setting


def llm_row(config: Mapping[str, Any]) -> tuple[SortKey, str, str]:
    """``(sort key, model, setting)`` of an LLM run; the setting ends with the test-slice suffix, if any."""
    script = config["script"]
    if script == INFERENCE_SCRIPT:
        key, model, setting = _inference_row(config)
    elif script == MERGE_SCRIPT or config.get("merge"):
        key, model, setting = _merge_row(config if script == MERGE_SCRIPT else config["merge"])
    else:  # direct inference of --merged_model_path without merge flags
        folder = Path(str(config["merged_model_path"])).name
        key, model, setting = (2, folder, 0, 0, 0.0, ""), "merged_model_path", folder
    suffix = _slice_suffix(config.get("evaluation"))
    return (*key[:-1], key[-1] + suffix), model, setting + suffix


def _put(row: dict[str, Any], dataset: str, value: float | str, run_dir: Path) -> None:
    """Fill one cell; a score beats ``files``, and two different scores keep the later run's with a warning."""
    old = row.get(dataset)
    if old is not None and value == NOT_SCORED:
        return
    if old not in (None, NOT_SCORED, value):
        logger.warning("%s: %s already has %s from another run, replaced by %s", run_dir, dataset, old, value)
    row[dataset] = value


def llm_table(runs: Sequence[dict]) -> Table:
    """Rows ``model, setting``; columns AlpacaEval, GSM8K, MATH, HumanEval, MBPP (see the module docstring)."""
    cells: dict[tuple[str, str], dict[str, Any]] = defaultdict(dict)
    order: dict[tuple[str, str], SortKey] = {}
    for run in runs:
        key, model, setting = llm_row(run["config"])
        order[(model, setting)] = key
        for dataset, result in run["metrics"].items():
            if dataset in LLM_COLUMNS and isinstance(result, Mapping):
                _put(cells[(model, setting)], dataset, _cell(result), run["dir"])
    rows = [[*row, *[cells[row].get(d) for d in LLM_COLUMNS]] for row in sorted(cells, key=order.__getitem__)]
    return ["model", "setting", *LLM_COLUMNS.values()], rows
