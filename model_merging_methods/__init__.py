"""DARE and model merging: the paper's maths as pure per-tensor functions behind one entry point.

    from model_merging_methods import merge_state_dicts
    merged = merge_state_dicts("mask_merging", base_sd, [sd_a, sd_b], mask_apply_method="task_arithmetic",
                               weight_mask_rate=0.9, use_weight_rescale=True, scaling_coefficient=1.0)
"""

from model_merging_methods.fisher import FISHER_ESTIMATORS, compute_fisher_weights
from model_merging_methods.hyperparameters import DARE_HYPERPARAMETERS, DARE_SPECS, PROTOCOLS, Hyperparameter
from model_merging_methods.merge_plan import MergePlan, accepted_hyperparameters, build_merge_plan
from model_merging_methods.merge_state_dicts import apply_dare, merge_models, merge_state_dicts
from model_merging_methods.recipe import Dare, Recipe, expand_grid, grid_recipes, searched_values
from model_merging_methods.registry import (
    DARE_METHOD_NAME,
    MERGE_METHODS,
    MERGING_METHOD_NAMES,
    MergeMethod,
    compute_statistics,
    get_merge_method,
    merge_method_names,
    merging_method_names,
)
from model_merging_methods.regmean import compute_gram_matrices

__all__ = [
    "DARE_HYPERPARAMETERS",
    "DARE_METHOD_NAME",
    "DARE_SPECS",
    "Dare",
    "Hyperparameter",
    "PROTOCOLS",
    "Recipe",
    "expand_grid",
    "grid_recipes",
    "compute_statistics",
    "merge_method_names",
    "merging_method_names",
    "searched_values",
    "MERGE_METHODS",
    "MERGING_METHOD_NAMES",
    "MergeMethod",
    "MergePlan",
    "accepted_hyperparameters",
    "apply_dare",
    "build_merge_plan",
    "FISHER_ESTIMATORS",
    "compute_fisher_weights",
    "compute_gram_matrices",
    "get_merge_method",
    "merge_models",
    "merge_state_dicts",
]
