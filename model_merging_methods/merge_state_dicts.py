"""In-memory driver: state dicts (or ``nn.Module``s) in, merged state dict out.

Every tensor goes through ``MergePlan.process_tensor``, the same per-tensor step the streaming engine
(``merge_engine``) calls, so both paths give identical float32 results.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from model_merging_methods.merge_plan import MergePlan, build_merge_plan
from model_merging_methods.recipe import Dare, Recipe
from model_merging_methods.task_vector import get_param_names_to_merge, is_mergeable

logger = logging.getLogger(__name__)

StateDict = Mapping[str, Tensor]


def validate_state_dicts(pretrained: StateDict, finetuned: Sequence[StateDict]) -> None:
    """Same names and shapes in every model; the error names the tensor, the model and both shapes."""
    if not finetuned:
        raise ValueError("merging needs at least one fine-tuned state dict, got an empty list")
    expected = set(pretrained)
    for index, state_dict in enumerate(finetuned):
        missing, extra = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if missing or extra:
            raise ValueError(
                f"fine-tuned model {index} must have the pretrained model's tensor names; missing {missing[:5]}, "
                f"unexpected {extra[:5]}; load homologous checkpoints or exclude the names with "
                f"exclude_param_names_regex"
            )
        for name, tensor in pretrained.items():
            if state_dict[name].shape != tensor.shape:
                raise ValueError(
                    f"fine-tuned model {index}: tensor {name!r} has shape {tuple(state_dict[name].shape)}, "
                    f"pretrained model has {tuple(tensor.shape)}"
                )


def _validate_statistics(plan: MergePlan, names: Sequence[str], pretrained: StateDict, statistics: Any) -> None:
    label = "fisher_weights" if plan.statistics == "fisher" else "gram_matrices"
    if statistics is None or len(statistics) != plan.num_models:
        got = "none" if statistics is None else f"{len(statistics)} dicts"
        raise ValueError(f"{plan.method.name} needs {label}: one dict per fine-tuned model ({plan.num_models}), "
                         f"got {got}; compute them with compute_{label}")
    plan.check_statistics(statistics, {name: pretrained[name].shape for name in names},
                          [f"{label}[{index}]" for index in range(len(statistics))])


def _merge_names(pretrained: StateDict, exclude_param_names_regex: Sequence[str]) -> tuple[list[str], dict]:
    """Names to merge (floating, not excluded) and aliases of tied tensors (alias -> first name)."""
    names, aliases, seen = [], {}, {}
    for name in get_param_names_to_merge(pretrained, exclude_param_names_regex):
        tensor = pretrained[name]
        if not is_mergeable(tensor):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        names.append(name)
    return names, aliases


def run_global_passes(plan: MergePlan, names, pretrained, finetuned, statistics) -> Any:
    """Feed every merged tensor to the plan's whole-model accumulator (TIES global / Fisher norms)."""
    state = plan.new_global_state(sum(pretrained[n].numel() for n in names))
    if state is None:
        return None
    for pass_index in range(state.num_passes):
        for name in names:
            plan.global_update(state, pass_index, name, pretrained[name], [sd[name] for sd in finetuned],
                               statistics=plan.statistics_for(name, statistics))
        state.finish_pass(pass_index)
    return state


def _merge_with_plan(plan, pretrained, finetuned, exclude_param_names_regex, statistics, copy_from=None):
    validate_state_dicts(pretrained, finetuned)
    names, aliases = _merge_names(pretrained, exclude_param_names_regex)
    if plan.statistics is not None:
        _validate_statistics(plan, names, pretrained, statistics)
    state = run_global_passes(plan, names, pretrained, finetuned, statistics)
    source = pretrained if copy_from is None else copy_from
    merged = {name: tensor.clone() for name, tensor in source.items()}
    for name in names:
        out = plan.process_tensor(name, pretrained[name], [sd[name] for sd in finetuned],
                                  statistics=plan.statistics_for(name, statistics), global_state=state)
        merged[name] = out.to(pretrained[name].dtype)
    for alias, name in aliases.items():
        merged[alias] = merged[name]
    return merged


def merge_state_dicts(
    merging_method_name: str | Recipe,
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    *,
    exclude_param_names_regex: Sequence[str] = (),
    fisher_weights: Sequence[StateDict] | None = None,
    gram_matrices: Sequence[StateDict] | None = None,
    **hyperparameters: Any,
) -> dict[str, Tensor]:
    """Merge fine-tuned state dicts into the pretrained one (MergeLM names; arXiv:2311.03099 for DARE).

    Args:
        merging_method_name: a ``Recipe``, or MergeLM's name: ``average_merging``, ``task_arithmetic``,
            ``ties_merging``, ``fisher_merging``, ``regmean_merging`` or ``mask_merging`` (DARE, then
            ``mask_apply_method``) with its ``hyperparameters``.
        pretrained: the base model's state dict.
        finetuned: the fine-tuned models' state dicts (same names and shapes).
        exclude_param_names_regex: names matched (``re.match``) are not merged but copied from ``pretrained``.
        fisher_weights: for Fisher merging, one ``{name: Fisher diagonal}`` per model (``compute_fisher_weights``).
        gram_matrices: for RegMean, one ``{linear module: Gram}`` per model (``compute_gram_matrices``).
        **hyperparameters: e.g. ``scaling_coefficient``, ``param_value_mask_rate``, ``ties_trim_scope``,
            ``weight_mask_rate`` (float or one per model), ``use_weight_rescale``, ``mask_strategy``,
            ``weight_format``, ``seed`` (``Recipe.from_mergelm``).

    Returns:
        A new full state dict: merged tensors computed in float32 and cast to the pretrained dtype; excluded
        and non-floating tensors copied from ``pretrained``. Inputs are never modified.
    """
    plan = build_merge_plan(merging_method_name, len(finetuned), **hyperparameters)
    statistics = fisher_weights if plan.statistics == "fisher" else gram_matrices
    return _merge_with_plan(plan, pretrained, finetuned, exclude_param_names_regex, statistics)


def apply_dare(
    pretrained: StateDict,
    finetuned: StateDict,
    *,
    weight_mask_rate: float,
    use_weight_rescale: bool = True,
    mask_strategy: str = "random",
    weight_format: str = "delta_weight",
    seed: int = 0,
    model_index: int = 0,
    exclude_param_names_regex: Sequence[str] = (),
    rescale_factor: float | None = None,
) -> dict[str, Tensor]:
    """DARE on one fine-tuned model (MergeLM ``mask_model_weights``): ``pretrained + DARE(finetuned - pretrained)``.

    The mask is keyed by ``(seed, model_index, name)``, so ``apply_dare(..., model_index=i)`` equals model i's
    pre-processing inside ``mask_merging``. Excluded names (e.g. a classifier head) keep the fine-tuned values.
    """
    dare = Dare(weight_mask_rate, use_weight_rescale, mask_strategy, weight_format, seed, rescale_factor)
    plan = replace(build_merge_plan(Recipe("average_merging", dare=dare), 1), model_indices=(model_index,))
    return _merge_with_plan(plan, pretrained, [finetuned], exclude_param_names_regex, None, copy_from=finetuned)


def module_parameters(model: nn.Module) -> dict[str, Tensor]:
    """``{name: parameter}`` from ``named_parameters()`` (tied parameters appear once; buffers are not merged)."""
    return {name: param.detach() for name, param in model.named_parameters()}


def merge_models(
    merging_method_name: str,
    pretrained_model: nn.Module,
    finetuned_models: Sequence[nn.Module],
    **kwargs: Any,
) -> nn.Module:
    """``merge_state_dicts`` over ``nn.Module`` parameters; returns a merged copy of ``pretrained_model``.

    Parameters only are merged (as MergeLM); buffers keep the pretrained model's values.
    """
    merged = merge_state_dicts(
        merging_method_name, module_parameters(pretrained_model), [module_parameters(m) for m in finetuned_models],
        **kwargs,
    )
    result = copy.deepcopy(pretrained_model)
    with torch.no_grad():
        for name, param in result.named_parameters():
            param.copy_(merged[name])
    return result
