"""Every command of the original MergeLM README is accepted by these scripts (flag names, values, choices), and
each flag's value reaches the configuration the script would run (nothing is trained, merged or generated)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import shlex
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from model_merging_methods import Recipe

ORIGINAL_README_COMMANDS = [
    "python train_plms_glue.py --language_model_name roberta-base --dataset_name cola --learning_rate 1e-5 "
    "--num_runs 5",
    "python train_plms_glue.py --language_model_name roberta-base --dataset_name cola --multitask_training "
    "--auxiliary_dataset_name rte --learning_rate 1e-5 --num_runs 5",
    "python inference_plms_glue.py --language_model_name roberta-base --weight_mask_rate 0.0",
    "python inference_plms_glue.py --language_model_name roberta-base --weight_mask_rate 0.9 --use_weight_rescale",
    "python inference_plms_glue.py --language_model_name roberta-base --weight_mask_rate 0.9",
    "python inference_plms_glue.py --language_model_name roberta-base --weight_mask_rate 0.9 "
    "--mask_strategy magnitude",
    "python inference_plms_glue.py --language_model_name roberta-base --weight_mask_rate 0.9 --use_weight_rescale "
    "--weight_format finetuned_weight",
    "python merge_plms_glue.py --merging_method_name average_merging --language_model_name roberta-base",
    "python merge_plms_glue.py --merging_method_name fisher_merging --normalize_fisher_weight "
    "--language_model_name roberta-base",
    "python merge_plms_glue.py --merging_method_name mask_merging --use_weight_rescale --language_model_name "
    "roberta-base --mask_apply_method average_merging",
    "python inference_llms_instruct_math_code.py --dataset_name gsm8k --finetuned_model_name WizardMath-7B-V1.0 "
    "--tensor_parallel_size 1 --weight_mask_rate 0.0",
    "python inference_llms_instruct_math_code.py --dataset_name gsm8k --finetuned_model_name WizardMath-7B-V1.0 "
    "--tensor_parallel_size 1 --weight_mask_rate 0.9 --use_weight_rescale",
    "python inference_llms_instruct_math_code.py --dataset_name gsm8k --finetuned_model_name WizardMath-7B-V1.0 "
    "--tensor_parallel_size 1 --weight_mask_rate 0.9",
    "python inference_llms_instruct_math_code.py --dataset_name gsm8k --finetuned_model_name WizardMath-7B-V1.0 "
    "--tensor_parallel_size 1 --weight_mask_rate 0.9 --mask_strategy magnitude",
    "python inference_llms_instruct_math_code.py --dataset_name gsm8k --finetuned_model_name WizardMath-7B-V1.0 "
    "--tensor_parallel_size 1 --weight_mask_rate 0.9 --use_weight_rescale --weight_format finetuned_weight",
    "python merge_llms_instruct_math_code.py --merge_instruct --merge_math --merging_method_name average_merging "
    "--tensor_parallel_size 1",
    "python merge_llms_instruct_math_code.py --merge_instruct --merge_math --merging_method_name task_arithmetic "
    "--scaling_coefficient 1.0 --tensor_parallel_size 1",
    "python merge_llms_instruct_math_code.py --merge_instruct --merge_math --merging_method_name mask_merging "
    "--use_weight_rescale --weight_mask_rate 0.2 --mask_apply_method average_merging --tensor_parallel_size 1",
    "python direct_inference_merged_llms_instruct_math_code.py --merge_instruct --merge_math --merging_method_name "
    "mask_merging --use_weight_rescale --weight_mask_rate 0.2 --mask_apply_method average_merging "
    "--tensor_parallel_size 1 --evaluate_task instruct",
    "python direct_inference_merged_llms_instruct_math_code.py --merge_instruct --merge_math --merging_method_name "
    "mask_merging --use_weight_rescale --weight_mask_rate 0.2 --mask_apply_method average_merging "
    "--tensor_parallel_size 1 --evaluate_task math",
]


class _Stop(Exception):
    """Raised by a stand-in once the script has built what it would run."""


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted field name: value}`` of nested dataclasses and string-keyed dicts."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    elif isinstance(obj, Mapping) and all(isinstance(k, str) for k in obj):
        items = dict(obj)
    elif isinstance(obj, (list, tuple)) and obj and all(dataclasses.is_dataclass(o) for o in obj):
        items = {str(i): o for i, o in enumerate(obj)}
    else:
        return {prefix.removesuffix("."): obj}
    return {k: v for name, value in items.items() for k, v in _flatten(value, f"{prefix}{name}.").items()}


def _raise_with(captured: list, value: Any) -> None:
    captured.append(value)
    raise _Stop


class _PoolStandIn:
    """merge_plms_glue's task pool: records the loading options when the first pair is asked for."""

    def __init__(self, captured: list, options: dict) -> None:
        self.captured, self.options = captured, options

    def pair(self, tasks: Any) -> None:
        _raise_with(self.captured, dict(self.options))


def _what_the_script_would_run(module: ModuleType, argv: list[str], monkeypatch) -> list[Any]:
    """The configuration objects ``main(argv)`` builds, caught before any model is touched."""
    args, captured = module.parse_args(argv), []
    name = module.__name__
    if hasattr(module, "build_config"):
        return [module.build_config(args)]
    if name == "merge_llms_instruct_math_code":
        return [module.merge_config_from_args(args, module.settings_from_args(args))]
    if name == "train_plms_glue":
        monkeypatch.setattr(module, "run_one", lambda config, *a, **k: captured.append(config) or {})
    elif name == "inference_plms_glue":
        real = module.InferenceConfig
        monkeypatch.setattr(module, "InferenceConfig", lambda *a, **k: _raise_with(captured, real(*a, **k)))
    elif name == "merge_plms_glue":
        monkeypatch.setattr(module, "load_tokenizer", lambda *a, **k: None)
        monkeypatch.setattr(module, "resolve_checkpoints", lambda a, pair: {t: Path("/absent", t) for t in pair})
        monkeypatch.setattr(module, "load_task_pool", lambda *a, **k: _PoolStandIn(captured, k))
        captured.append({"runs": module.searches(args)})
    else:
        raise AssertionError(f"no way to see what {name} would run; add one here")
    try:
        module.main(argv)
    except _Stop:
        pass
    return captured


def _same(config_value: Any, parsed: Any) -> bool:
    if isinstance(parsed, list) and isinstance(config_value, (list, tuple)):
        return tuple(config_value) == tuple(parsed)
    if isinstance(parsed, list) and len(parsed) == 1:
        return config_value == parsed[0]
    return config_value == parsed


def _recipes(obj: Any) -> list[Recipe]:
    """Every ``Recipe`` inside ``obj`` (dataclass fields, mappings, lists)."""
    if isinstance(obj, Recipe):
        return [obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [r for f in dataclasses.fields(obj) for r in _recipes(getattr(obj, f.name))]
    if isinstance(obj, Mapping):
        return [r for value in obj.values() for r in _recipes(value)]
    if isinstance(obj, (list, tuple)):
        return [r for value in obj for r in _recipes(value)]
    return []


def _check_derived_flag(flag: str, args: argparse.Namespace, configs: list[Any], fields: dict[str, list]) -> None:
    """Flags that are no configuration field of their own name."""
    if flag == "num_runs":  # one training configuration per run, seeds seed, seed + 1, ...
        assert [c.seed for c in configs] == [args.seed + i for i in range(args.num_runs)]
    elif flag.startswith("merge_"):  # --merge_instruct / --merge_math select the models to merge
        assert any(flag.removeprefix("merge_") in tasks for tasks in fields["merge_tasks"]), flag
    elif flag in ("merging_method_name", "mask_apply_method"):  # the recipes: one per run (method, applied)
        runs = {(r.merging_method_name, r.method) for r in _recipes(configs)}
        names = lambda value: set(value) if isinstance(value, list) else {value}  # noqa: E731
        if flag == "merging_method_name":
            assert {name for name, _ in runs} == names(args.merging_method_name)
        else:
            assert {method for name, method in runs if name == "mask_merging"} == names(args.mask_apply_method)
    elif flag == "weight_mask_rate" and args.weight_mask_rate == 0.0:  # MergeLM's "just inference": no DARE
        assert fields.get("dare") == [None], fields.get("dare")
    else:
        raise AssertionError(f"--{flag} reaches no field of the configuration the script would run")


@pytest.mark.parametrize("command", ORIGINAL_README_COMMANDS)
def test_original_readme_command_reaches_the_configuration(command, monkeypatch):
    words = shlex.split(command)
    assert words[0] == "python"
    module = importlib.import_module(words[1].removesuffix(".py"))
    args = module.parse_args(words[2:])  # argparse exits (SystemExit) on an unknown flag or a bad choice
    configs = _what_the_script_would_run(module, words[2:], monkeypatch)
    assert configs, command
    fields: dict[str, list] = {}
    for config in configs:
        for dotted, value in _flatten(config).items():
            fields.setdefault(dotted.split(".")[-1], []).append(value)
    for flag in (w[2:] for w in words[2:] if w.startswith("--")):
        parsed = getattr(args, flag)
        found = fields.get(flag, fields.get(f"{flag}s"))  # --weight_mask_rate -> weight_mask_rates (a sweep)
        if found is None:
            _check_derived_flag(flag, args, configs, fields)
            continue
        assert all(_same(value, parsed) for value in found), (flag, parsed, found)
