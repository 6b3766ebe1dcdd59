"""Every script's DARE/merge flags come from cli/merge_flags.py: one help text, choices from the registry (a newly
registered method is offered everywhere), MergeLM's defaults unless a script states its own."""

from __future__ import annotations

import argparse
import importlib

import pytest

from cli import merge_flags
from model_merging_methods import FISHER_ESTIMATORS, MERGE_METHODS, MERGING_METHOD_NAMES, MergeMethod
from model_merging_methods.average import average_merging

CLIS = [
    "merge_checkpoints",
    "merge_plms_glue",
    "inference_plms_glue",
    "inference_llms_instruct_math_code",
    "merge_llms_instruct_math_code",
    "direct_inference_merged_llms_instruct_math_code",
    "grid_search_llms_instruct_math_code",
]
# scripts without data for Fisher/Gram statistics offer only the methods that need none
WITHOUT_STATISTICS = {"merge_llms_instruct_math_code", "direct_inference_merged_llms_instruct_math_code"}
CHOICES = {
    "mask_strategy": merge_flags.MASK_STRATEGIES,
    "weight_format": merge_flags.WEIGHT_FORMATS,
    "ties_trim_scope": merge_flags.TIES_TRIM_SCOPES,
    "fisher_estimator": FISHER_ESTIMATORS,
}


def actions_of(module_name: str) -> dict[str, argparse.Action]:
    parser = importlib.import_module(module_name).build_parser()
    return {action.dest: action for action in parser._actions}


def shared_actions(module_name: str) -> dict[str, argparse.Action]:
    return {dest: a for dest, a in actions_of(module_name).items() if dest in merge_flags.HELP}


def test_the_shared_choices_are_the_merging_core_s():
    assert merge_flags.MASK_STRATEGIES == ("random", "magnitude")
    assert merge_flags.WEIGHT_FORMATS == ("delta_weight", "finetuned_weight")
    assert merge_flags.TIES_TRIM_SCOPES == ("global", "per_tensor")
    assert merge_flags.merging_method_names() == list(MERGING_METHOD_NAMES)
    assert merge_flags.merge_method_names(without_statistics=True) == ["average_merging", "task_arithmetic",
                                                                       "ties_merging"]


@pytest.mark.parametrize("module_name", CLIS)
def test_every_dare_and_merge_flag_is_the_shared_definition(module_name):
    actions = shared_actions(module_name)
    assert actions, module_name
    for dest, action in actions.items():
        assert action.help.startswith(merge_flags.HELP[dest]), (module_name, dest)
        if dest in CHOICES:
            assert tuple(action.choices) == CHOICES[dest], (module_name, dest)
    without = module_name in WITHOUT_STATISTICS
    if "merging_method_name" in actions:
        assert actions["merging_method_name"].choices == merge_flags.merging_method_names(without_statistics=without)
        assert actions["mask_apply_method"].choices == merge_flags.merge_method_names(without_statistics=without)


@pytest.mark.parametrize("statistics", [None, "fisher"])
def test_a_newly_registered_method_is_offered_by_every_script(statistics, monkeypatch):
    monkeypatch.setitem(MERGE_METHODS, "new_merging", MergeMethod("new_merging", average_merging,
                                                                  statistics=statistics))
    offered = {}
    for module_name in CLIS:
        actions = shared_actions(module_name)
        if "merging_method_name" in actions:
            offered[module_name] = ("new_merging" in actions["merging_method_name"].choices
                                    and "new_merging" in actions["mask_apply_method"].choices)
    expected_off = WITHOUT_STATISTICS if statistics else set()
    assert offered == {name: name not in expected_off for name in offered}
    assert set(offered) == {"merge_checkpoints", "merge_plms_glue", *WITHOUT_STATISTICS}


def test_mergelm_defaults_unless_a_script_states_its_own():
    glue = actions_of("merge_plms_glue")
    llm = actions_of("merge_llms_instruct_math_code")
    checkpoints = actions_of("merge_checkpoints")
    assert glue["normalize_fisher_weight"].default is False  # MergeLM's merge_plms_glue.py
    assert checkpoints["normalize_fisher_weight"].default is None  # the library's: on
    assert MERGE_METHODS["fisher_merging"].hyperparameters["normalize_fisher_weight"] is True
    assert llm["ties_trim_scope"].default == "per_tensor"
    assert checkpoints["ties_trim_scope"].default is None  # the registry's: global
    for dest in ("weight_mask_rate", "mask_strategy", "weight_format", "scaling_coefficient", "mask_apply_method"):
        assert checkpoints[dest].default is None, dest
    assert checkpoints["merging_method_name"].required
    assert (llm["weight_mask_rate"].default, glue["weight_mask_rate"].default) == (0.1, [0.1])
    assert actions_of("inference_plms_glue")["weight_mask_rate"].default == [0.1]
    assert (llm["mask_strategy"].default, llm["weight_format"].default) == ("random", "delta_weight")
    assert (llm["merging_method_name"].default, glue["merging_method_name"].default) == (
        "average_merging", ["average_merging"])
    assert (llm["param_value_mask_rate"].default, glue["param_value_mask_rate"].default) == (0.8, 0.8)
    assert glue["fisher_estimator"].default == ["mergelm"]


def test_normalize_fisher_weight_flag_keeps_its_meaning_in_the_glue_script():
    merge_plms_glue = importlib.import_module("merge_plms_glue")
    assert merge_plms_glue.parse_args([]).normalize_fisher_weight is False
    assert merge_plms_glue.parse_args(["--normalize_fisher_weight"]).normalize_fisher_weight is True
