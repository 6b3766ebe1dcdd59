"""Every script's merge and DARE flags come from the declarations (``cli/recipe_flags.py``): one help text and one
set of choices per setting, the registry's methods (a newly registered method and its settings are offered
everywhere), and one default per setting: MergeLM's command-line default unless a script states its own."""

from __future__ import annotations

import argparse
import importlib

import pytest

from cli.recipe_flags import declared_flags
from llms.llm_cli import LLM_CLI_DEFAULTS
from model_merging_methods import (
    DARE_SPECS,
    MERGE_METHODS,
    Dare,
    Hyperparameter,
    MergeMethod,
    Recipe,
    merge_method_names,
    merging_method_names,
)
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
# scripts without training data for Fisher/Gram statistics offer only the methods that need none
WITHOUT_STATISTICS = {"merge_llms_instruct_math_code", "direct_inference_merged_llms_instruct_math_code"}
# the defaults a script states itself, with its reason in the script: the library's (merge_checkpoints.py leaves an
# unset flag to the method's declared default), or the LLM scripts' per-tensor TIES trim
LIBRARY_DEFAULTS = {"merge_checkpoints"}
STATED = {name: LLM_CLI_DEFAULTS for name in ("merge_llms_instruct_math_code",
                                              "direct_inference_merged_llms_instruct_math_code",
                                              "grid_search_llms_instruct_math_code")}


def actions_of(module_name: str) -> dict[str, argparse.Action]:
    parser = importlib.import_module(module_name).build_parser()
    return {action.dest: action for action in parser._actions}


def declared_actions(module_name: str) -> dict[str, tuple[argparse.Action, Hyperparameter]]:
    specs = {spec.name: spec for spec, _ in declared_flags().values()}
    return {dest: (action, specs[dest]) for dest, action in actions_of(module_name).items() if dest in specs}


def test_method_names_come_from_the_registry():
    assert merging_method_names() == (*MERGE_METHODS, "mask_merging")
    assert merge_method_names(without_statistics=True) == ("average_merging", "task_arithmetic", "ties_merging")


@pytest.mark.parametrize("module_name", CLIS)
def test_every_merge_and_dare_flag_is_its_declaration(module_name):
    actions = declared_actions(module_name)
    assert actions, module_name
    for dest, (action, spec) in actions.items():
        assert f"--{spec.flag}" in action.option_strings, (module_name, dest)
        assert action.help.startswith(spec.help), (module_name, dest)
        if spec.kind == "choice":
            assert tuple(action.choices) == spec.choices, (module_name, dest)
        if spec.store_true:
            assert isinstance(action, argparse._StoreTrueAction) and action.default is False, (module_name, dest)
    without = module_name in WITHOUT_STATISTICS
    all_actions = actions_of(module_name)
    if "merging_method_name" in all_actions:
        assert tuple(all_actions["merging_method_name"].choices) == merging_method_names(without_statistics=without)
        assert tuple(all_actions["mask_apply_method"].choices) == merge_method_names(without_statistics=without)


@pytest.mark.parametrize("module_name", CLIS)
def test_one_default_per_setting(module_name):
    """MergeLM's command-line default everywhere, unless the script states another one (listed above)."""
    for dest, (action, spec) in declared_actions(module_name).items():
        if spec.store_true:
            continue
        if module_name in LIBRARY_DEFAULTS:
            expected = None
        else:
            expected = STATED.get(module_name, {}).get(dest, spec.command_line_default)
        default = action.default
        if isinstance(default, list) and not isinstance(expected, (list, tuple)):
            expected = [expected]
        assert default == expected, (module_name, dest, default, expected)


def test_the_python_api_has_the_declared_defaults():
    recipe = Recipe("ties_merging", dare=Dare(0.5))
    ties = MERGE_METHODS["ties_merging"].specs
    assert dict(recipe.hyperparameters) == {name: spec.default for name, spec in ties.items()}
    # an unset optional setting (rescale_factor: the paper's 1/(1-p)) is left out of the settings and names
    assert recipe.dare.settings() == {"weight_mask_rate": 0.5, **{n: s.default for n, s in DARE_SPECS.items()
                                                                   if not s.required and s.default is not None}}
    assert recipe.dare.rescale_factor is None
    assert Dare(0.5).use_weight_rescale is True  # DARE rescales; the command lines keep MergeLM's store_true flag
    for method in MERGE_METHODS.values():
        for spec in method.hyperparameters:
            assert spec.why, f"{method.name}'s {spec.name} states no reason for its default"


@pytest.mark.parametrize("statistics", [None, "fisher"])
def test_a_newly_registered_method_and_its_setting_are_offered_by_every_script(statistics, monkeypatch):
    setting = Hyperparameter("new_alpha", "number", 1.0, help="the new method's scale", why="test",
                             grids={"glue_quick": (1.0,), "llm_table1": (0.5, 1.0)})
    monkeypatch.setitem(MERGE_METHODS, "new_merging", MergeMethod("new_merging", average_merging, (setting,),
                                                                  statistics=statistics))
    offered, flags = {}, {}
    for module_name in CLIS:
        actions = actions_of(module_name)
        if "merging_method_name" in actions:
            offered[module_name] = ("new_merging" in actions["merging_method_name"].choices
                                    and "new_merging" in actions["mask_apply_method"].choices)
            flags[module_name] = "new_alpha" in actions
    expected_off = WITHOUT_STATISTICS if statistics else set()
    assert offered == {name: name not in expected_off for name in offered}
    assert flags == offered
    assert set(offered) == {"merge_checkpoints", "merge_plms_glue", *WITHOUT_STATISTICS}
    grid = actions_of("grid_search_llms_instruct_math_code")
    assert ("new_merging" in grid["merging_methods"].choices) == (statistics is None)
    assert ("new_alphas" in grid) == (statistics is None)


def test_normalize_fisher_weight_flag_keeps_its_meaning_in_the_glue_script():
    merge_plms_glue = importlib.import_module("merge_plms_glue")
    assert merge_plms_glue.parse_args([]).normalize_fisher_weight is False
    assert merge_plms_glue.parse_args(["--normalize_fisher_weight"]).normalize_fisher_weight is True


def test_a_flag_the_method_does_not_read_is_refused_by_merge_checkpoints(tmp_path):
    import merge_checkpoints

    args = ["--pretrained_model", str(tmp_path / "a"), "--finetuned_models", str(tmp_path / "b"), "--output_dir",
            str(tmp_path / "out"), "--merging_method_name", "average_merging", "--scaling_coefficient", "0.5"]
    with pytest.raises(ValueError, match="--scaling_coefficient .* given, but Average Merging does not use it"):
        merge_checkpoints.main(args)
