"""mergekit YAML: schema errors before any tensor, value forms, precedence and the tensor plan (mergekit 0.1.5's
``config.py``, ``parameter_resolver.py`` and ``plan.py``), checked by hand on small configurations."""

from __future__ import annotations

import textwrap

import pytest

from merge_engine.mergekit_config import (
    MERGEKIT_METHODS,
    MergekitParameter,
    evaluate_setting,
    load_config,
    plan_tensors,
    resolve_tensor_parameters,
)

FLOAT = MergekitParameter("x", float, "shared", 0.0)


def config(text: str):
    return load_config(textwrap.dedent(text))


def names(layers: int) -> list[str]:
    per_layer = ["mlp.down_proj.weight", "self_attn.q_proj.weight", "input_layernorm.weight"]
    return (["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
            + [f"model.layers.{i}.{rest}" for i in range(layers) for rest in per_layer])


# ---------------------------------------------------------------------------------------------------------------
# Values


def test_a_gradient_is_interpolated_at_t():
    # [0, 1, 0.5] at t = 0.25: scaled = 0.5 -> halfway between 0 and 1; at t = 0.75: halfway between 1 and 0.5
    assert evaluate_setting("w", [0, 1, 0.5], 0.25, FLOAT) == 0.5
    assert evaluate_setting("w", [0, 1, 0.5], 0.75, FLOAT) == 0.75
    assert evaluate_setting("w", [0, 1, 0.5], 1.0, FLOAT) == 0.5
    assert evaluate_setting("w", 0.3, 0.9, FLOAT) == 0.3
    # booleans are picked, not interpolated: values[int(t * (n - 1))]
    flag = MergekitParameter("normalize", bool, "shared", True)
    assert evaluate_setting("w", [True, False], 0.99, flag) is True
    assert evaluate_setting("w", [True, False], 1.0, flag) is False


def test_the_first_matching_filter_wins_and_no_match_falls_through():
    setting = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.7}, {"value": 0.2}]
    assert evaluate_setting("model.layers.3.self_attn.q_proj.weight", setting, 0.5, FLOAT) == 0.5
    assert evaluate_setting("model.layers.3.mlp.up_proj.weight", setting, 0.5, FLOAT) == 0.7
    assert evaluate_setting("model.norm.weight", setting, 0.5, FLOAT) == 0.2
    assert evaluate_setting("model.norm.weight", [{"filter": "mlp", "value": 1}], 0.0, FLOAT) is None
    assert evaluate_setting("anything", [{"filter": "*", "value": 3}], 0.0, FLOAT) == 3.0


def test_precedence_model_then_slice_then_top_level_then_default():
    cfg = config("""
        merge_method: ties
        base_model: base
        slices:
          - sources:
              - {model: a, layer_range: [0, 2], parameters: {weight: 0.9}}
              - {model: b, layer_range: [0, 2]}
              - {model: base, layer_range: [0, 2]}
            parameters: {weight: 0.4, density: [0.2, 0.6]}
        parameters: {density: 0.5, weight: 0.1, lambda: 2}
        """)
    plans, layers = plan_tensors(cfg, {m: names(2) for m in ("a", "b", "base")}, {"a": 2, "b": 2, "base": 2})
    plan = next(p for p in plans if p.name == "model.layers.1.mlp.down_proj.weight")
    assert layers == 2 and plan.t == 1.0
    shared, per_input = resolve_tensor_parameters(cfg, plan)
    assert shared["lambda"] == 2.0 and shared["normalize"] is True and shared["rescale"] is False  # ties defaults
    assert per_input[0] == {"weight": 0.9, "density": 0.6}  # own weight; the slice's density gradient at t = 1
    assert per_input[1] == {"weight": 0.4, "density": 0.6}
    assert per_input[2] == {}  # the base takes no non-base parameter


def test_a_missing_required_parameter_names_the_model_and_tensor():
    cfg = config("""
        merge_method: task_arithmetic
        base_model: base
        models:
          - model: a
            parameters: {weight: [{filter: mlp, value: 1.0}]}
        """)
    plans, _ = plan_tensors(cfg, {m: names(1) for m in ("a", "base")}, {"a": 1, "base": 1})
    plan = next(p for p in plans if "self_attn" in p.name)
    with pytest.raises(ValueError, match=r"missing required parameter 'weight' for a: model\.layers\.0\.self_attn"):
        resolve_tensor_parameters(cfg, plan)


# ---------------------------------------------------------------------------------------------------------------
# The plan


def test_models_form_appends_the_base_and_gives_layers_their_t():
    cfg = config("""
        merge_method: dare_ties
        base_model: base
        models:
          - {model: a, parameters: {weight: 1, density: 0.5}}
          - {model: b, parameters: {weight: 1, density: 0.5}}
        """)
    assert [s.model for s in cfg.slices[0].sources] == ["a", "b", "base"]
    plans, layers = plan_tensors(cfg, {m: names(3) for m in ("a", "b", "base")}, {"a": 3, "b": 3, "base": 3})
    assert layers == 3 and len(plans) == 3 + 3 * 3
    assert plans[0].name == "model.embed_tokens.weight" and plans[0].t == 0.0
    ts = {p.name.split(".")[2]: p.t for p in plans if ".layers." in p.name}
    assert ts == {"0": 0.0, "1": 0.5, "2": 1.0}
    assert {p.name for p in plans[-2:]} == {"model.norm.weight", "lm_head.weight"} and plans[-1].t == 0.0


def test_passthrough_slices_stack_layers_and_renumber_them():
    cfg = config("""
        merge_method: passthrough
        slices:
          - sources: [{model: a, layer_range: [0, 2]}]
          - sources: [{model: b, layer_range: [1, 3]}]
        dtype: bfloat16
        """)
    plans, layers = plan_tensors(cfg, {"a": names(3), "b": names(3)}, {"a": 3, "b": 3})
    assert layers == 4
    by_name = {p.name: p for p in plans}
    assert by_name["model.layers.3.mlp.down_proj.weight"].sources[0].name == "model.layers.2.mlp.down_proj.weight"
    assert by_name["model.layers.3.mlp.down_proj.weight"].sources[0].model == "b"
    assert by_name["model.layers.1.mlp.down_proj.weight"].sources[0].model == "a"
    assert by_name["model.embed_tokens.weight"].sources[0].model == "a"  # pre-weights: the first slice's inputs
    assert by_name["lm_head.weight"].sources[0].model == "b"  # post-weights: the last slice's inputs
    # t runs over each slice: 0 then 1 in both
    assert [by_name[f"model.layers.{i}.mlp.down_proj.weight"].t for i in range(4)] == [0.0, 1.0, 0.0, 1.0]


def test_layer_range_out_of_bounds_and_layer_counts_that_differ():
    cfg = config("""
        merge_method: passthrough
        slices:
          - sources: [{model: a, layer_range: [0, 5]}]
        """)
    with pytest.raises(ValueError, match=r"layer_range \[0, 5\] of a is out of bounds: the model has 3 layers"):
        plan_tensors(cfg, {"a": names(3)}, {"a": 3})
    cfg = config("""
        merge_method: linear
        models:
          - {model: a, parameters: {weight: 1}}
          - {model: b, parameters: {weight: 1}}
        """)
    with pytest.raises(ValueError, match="same number of layers.*a 3, b 4"):
        plan_tensors(cfg, {"a": names(3), "b": names(4)}, {"a": 3, "b": 4})


# ---------------------------------------------------------------------------------------------------------------
# Errors before any tensor is read


@pytest.mark.parametrize("text, message", [
    ("merge_method: ties\nmodel: [a]\n", r"unknown key 'model' \(did you mean: models\?\)"),
    ("merge_method: dare_tie\nmodels: [a]\n", r"merge_method must be one of .* \(did you mean: dare_ties\?\)"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {densty: 0.5, weight: 1}}]\n",
     r"unknown parameter 'densty' for merge_method ties \(did you mean: density\?\)"),
    ("merge_method: ties\nbase_model: b\n", "exactly one of 'models' or 'slices'"),
    ("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]\n", "needs a base_model"),
    ("merge_method: slerp\nbase_model: a\nmodels: [a, b, c]\nparameters: {t: 0.5}\n",
     r"slerp takes exactly 2 inputs, got 3"),
    ("merge_method: nuslerp\nmodels: [{model: a, parameters: {weight: 1}}]\n",
     "nuslerp takes exactly 2 non-base inputs, got 1"),
    ("merge_method: della\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, density: 0.9, "
     "epsilon: 0.2}}]\n", r"della needs 0 < density - epsilon and density \+ epsilon < 1, got density 0.9 and "
                          r"epsilon 0.2"),
    ("merge_method: della\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, density: [0.5, 0.1]}}]\n",
     "got density 0.1 and epsilon 0.15"),
    ("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [2, 1]}]}]\n",
     r"0 <= start < end, got \[2, 1\]"),
    ("merge_method: linear\nslices: [{sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 3]}]}]\n",
     "same number of layers"),
    ("merge_method: linear\nmodels: [a]\ntokenizer_source: union\n", "'union' .* is not supported"),
    ("merge_method: linear\nmodels: [a]\ndtype: bf32\n", "dtype must be one of"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: {filter: mlp, value: 1}}}]\n",
     "a filtered value must be a list"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: yes please}}]\n",
     "parameter 'weight' must be a float"),
    ("merge_method: passthrough\nmodels: [a, b]\n", "passthrough takes exactly 1 input, got 2"),
])
def test_bad_configs_fail_naming_the_key(text, message):
    with pytest.raises(ValueError, match=message):
        load_config(text)


def test_every_method_of_the_issue_is_declared():
    assert set(MERGEKIT_METHODS) == {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                                     "breadcrumbs_ties", "della", "della_linear", "slerp", "nuslerp", "model_stock",
                                     "passthrough"}
