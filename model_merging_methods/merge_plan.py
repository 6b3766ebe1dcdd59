"""A validated merge recipe and its per-tensor step, shared by the in-memory and the streaming paths.

``build_merge_plan(merging_method_name, num_models, **hyperparameters)`` checks every name and value once,
before any tensor is touched, and returns a ``MergePlan``. For each parameter the plan

1. turns each fine-tuned tensor into a float32 delta and applies DARE (``mask_merging`` only), keyed by
   ``(seed, model index, parameter name)`` so the result does not depend on visiting order or chunking;
2. calls the registered method's pure function on ``(base, deltas)``.

Whole-model quantities (MergeLM's global TIES trim and majority sign; Fisher normalisation norms) are
collected by a ``new_global_state`` object fed by ``global_update`` in ``num_passes`` passes over the
merged tensors, in any order; ``merge_state_dicts`` and ``merge_engine`` run the same passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from model_merging_methods.dare import dare_delta, mask_tensor
from model_merging_methods.registry import (
    DARE_HYPERPARAMETERS,
    MERGE_METHODS,
    GlobalState,
    MergeMethod,
    check_choice,
    unknown_name_error,
)
from model_merging_methods.regmean import gram_module_name

_CHOICES = {
    "mask_strategy": ("random", "magnitude"),
    "weight_format": ("delta_weight", "finetuned_weight"),
    "ties_trim_scope": ("global", "per_tensor"),
}


@dataclass(frozen=True)
class DarePreprocessing:
    """DARE pre-processing of every model's deltas (MergeLM ``mask_merging`` flags)."""

    weight_mask_rates: tuple[float, ...]
    use_weight_rescale: bool = True
    mask_strategy: str = "random"
    weight_format: str = "delta_weight"
    model_indices: tuple[int, ...] = ()


@dataclass(frozen=True)
class MergePlan:
    """What to compute for every parameter; build it with ``build_merge_plan``."""

    merging_method_name: str
    method: MergeMethod
    num_models: int
    hyperparameters: Mapping[str, Any]
    dare: DarePreprocessing | None = None
    seed: int = 0

    @property
    def statistics(self) -> str | None:
        """``"fisher"`` / ``"gram"`` when the method needs per-model statistics, else None."""
        return self.method.statistics

    @property
    def chunkable(self) -> bool:
        """True when a tensor may be processed in row chunks (element-wise maths given the global state).

        Magnitude pruning ranks a whole tensor, and per-model statistics belong to whole tensors.
        """
        if self.dare is not None and self.dare.mask_strategy == "magnitude":
            return False
        return self.method.statistics is None and self.method.chunkable(self.hyperparameters)

    @property
    def propagates_non_finite(self) -> bool:
        """True when a NaN/Inf in any input always leaves a NaN/Inf in the merged tensor.

        Set by the method (``MergeMethod.propagates_non_finite``): average merging and task arithmetic only add
        and scale, and every DARE variant multiplies by its mask (``NaN * 0`` and ``Inf * 0`` are NaN), so
        checking the merged tensor finds every non-finite input; TIES, Fisher and RegMean select or weight
        values and can hide one.
        """
        return self.method.propagates_non_finite

    def deltas(self, name: str, base: Tensor, finetuned: Sequence[Tensor], *, element_offset: int = 0) -> list:
        """float32 deltas ``finetuned_i - base`` of one parameter (or chunk), after DARE when configured."""
        base32 = base.float()
        if self.dare is None:
            return [_subtract(ft, base32) for ft in finetuned]
        out = []
        for i, ft in enumerate(finetuned):
            masked_weight = self.dare.weight_format == "finetuned_weight"
            if not masked_weight and self.dare.mask_strategy == "random":
                out.append(dare_delta(
                    ft, base32, drop_rate=self.dare.weight_mask_rates[i],
                    use_weight_rescale=self.dare.use_weight_rescale, seed=self.seed,
                    model_index=self.dare.model_indices[i], name=name, element_offset=element_offset,
                ))
                continue
            tensor = ft.to(torch.float32, copy=True) if masked_weight else _subtract(ft, base32)
            tensor = mask_tensor(
                tensor,
                drop_rate=self.dare.weight_mask_rates[i],
                use_weight_rescale=self.dare.use_weight_rescale,
                mask_strategy=self.dare.mask_strategy,
                seed=self.seed,
                model_index=self.dare.model_indices[i],
                name=name,
                element_offset=element_offset,
            )
            out.append(tensor - base32 if masked_weight else tensor)
        return out

    def statistics_key(self, name: str) -> str | None:
        """The statistics entry of parameter ``name``: itself (Fisher) or its Linear module (Gram), else None."""
        return name if self.statistics == "fisher" else gram_module_name(name)

    def statistics_for(self, name: str, statistics: Sequence[Mapping[str, Tensor]] | None) -> list | None:
        """This parameter's entry of each model's statistics dict (Gram: the Linear module's matrix)."""
        if self.statistics is None or statistics is None:
            return None
        key = self.statistics_key(name)
        if key is None or key not in statistics[0]:
            return None
        return [stats[key] for stats in statistics]

    def check_statistics(
        self, statistics: Sequence[Mapping[str, Any]], shapes: Mapping[str, Sequence[int]], labels: Sequence[str],
        shape_of: Callable[[Mapping[str, Any], str], Sequence[int]] = lambda stats, key: stats[key].shape,
    ) -> None:
        """Every merged parameter has a Fisher entry of its shape; Gram entries are ``(in, in)`` and every model
        has the same Linear modules. Used by ``merge_state_dicts`` (dicts) and ``merge_engine`` (files).

        Args:
            statistics: one ``{entry: tensor}`` mapping per fine-tuned model.
            shapes: the merged parameters' shapes.
            labels: how each model's statistics are named in errors (``fisher_weights[1]``, a file path).
            shape_of: an entry's shape (a file's reader can answer without reading the tensor).
        Raises:
            ValueError: naming the model's statistics, the entry and the shapes.
        """
        for label, stats in zip(labels, statistics, strict=True):
            if self.statistics == "fisher":
                missing = [name for name in shapes if name not in stats]
                if missing:
                    raise ValueError(f"{label} must cover every merged parameter, missing {missing[:5]}")
            elif set(stats) != set(statistics[0]):
                raise ValueError(f"{label} must have the same Linear modules as {labels[0]}, "
                                 f"differs in {sorted(set(stats) ^ set(statistics[0]))[:5]}")
            for name, shape in shapes.items():
                key = self.statistics_key(name)
                if key is None or key not in stats:
                    continue
                expected = tuple(shape) if self.statistics == "fisher" else (shape[-1], shape[-1])
                if tuple(shape_of(stats, key)) != expected:
                    raise ValueError(f"{label} entry {key!r} (for {name!r}) has shape {tuple(shape_of(stats, key))}, "
                                     f"expected {expected}")

    def new_global_state(self, total_numel: int) -> GlobalState | None:
        """The whole-model accumulator this plan needs (``MergeMethod.global_state``), or None."""
        return self.method.global_state(self.hyperparameters, self.num_models, total_numel)

    def global_update(
        self,
        state: GlobalState,
        pass_index: int,
        name: str,
        base: Tensor | None,
        finetuned: Sequence[Tensor] | None,
        *,
        statistics: Sequence[Tensor] | None = None,
        element_offset: int = 0,
    ) -> None:
        """Feed one parameter (or chunk) to the global accumulator for pass ``pass_index``."""
        if state.uses_model_tensors:
            state.update(pass_index, torch.stack(self.deltas(name, base, finetuned, element_offset=element_offset)))
            return
        if statistics is None:
            raise ValueError(f"{self.method.name} needs a {self.method.statistics} statistic for {name!r} in every "
                             "model, got none")
        state.update(pass_index, statistics)

    def merge_deltas(
        self, name: str, base: Tensor, deltas: Sequence[Tensor], *, statistics: Sequence[Tensor] | None = None,
        global_state: GlobalState | None = None,
    ) -> Tensor:
        """Run the method on one parameter's float32 base and deltas."""
        arguments = self.method.merge_arguments(self.hyperparameters, name=name, num_models=self.num_models,
                                                statistics=statistics, global_state=global_state)
        return self.method.merge(base.float(), deltas, **arguments)

    def process_tensor(
        self, name: str, base: Tensor, finetuned: Sequence[Tensor], *, statistics: Sequence[Tensor] | None = None,
        global_state: GlobalState | None = None, element_offset: int = 0, out_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """DARE (if any) then the method, for one parameter or row chunk; float32 (or ``out_dtype``) result."""
        base32 = base.float()  # once: the steps below would each upcast a low-precision base again
        deltas = self.deltas(name, base32, finetuned, element_offset=element_offset)
        merged = self.merge_deltas(name, base32, deltas, statistics=statistics, global_state=global_state)
        return merged if out_dtype is None else merged.to(out_dtype)


def _subtract(finetuned: Tensor, base32: Tensor) -> Tensor:
    # one pass: a bf16/fp16 operand is promoted to float32 inside the subtraction (exact, no temporary copy)
    return torch.sub(finetuned, base32) if finetuned.is_floating_point() else finetuned.float() - base32


def _check_rate(name: str, value: Any, *, upper_inclusive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value > 1 if upper_inclusive else value >= 1):
        interval = "[0, 1]" if upper_inclusive else "[0, 1)"
        fix = "; 1.0 would drop every value (and divide by zero with rescaling)" if not upper_inclusive else ""
        raise ValueError(f"{name} must be in {interval}, got {value!r}{fix}")
    return float(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _per_model_list(name: str, value: Any, num_models: int) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * num_models
    if len(values) != num_models:
        raise ValueError(f"{name} needs one value per fine-tuned model ({num_models}), got {len(values)}: {value!r}")
    return values


def accepted_hyperparameters(merging_method_name: str, mask_apply_method: str | None = None) -> dict[str, Any]:
    """The hyperparameter names (with defaults) a method accepts; ``seed`` is accepted by all."""
    if merging_method_name != "mask_merging" and merging_method_name not in MERGE_METHODS:
        raise unknown_name_error("merging_method_name", merging_method_name, [*MERGE_METHODS, "mask_merging"])
    accepted: dict[str, Any] = {"seed": 0}
    if merging_method_name == "mask_merging":
        apply_name = mask_apply_method or "average_merging"
        if apply_name not in MERGE_METHODS:
            raise unknown_name_error("mask_apply_method", apply_name, list(MERGE_METHODS))
        accepted.update(DARE_HYPERPARAMETERS, mask_apply_method="average_merging")
        accepted.update(MERGE_METHODS[apply_name].hyperparameters)
    else:
        accepted.update(MERGE_METHODS[merging_method_name].hyperparameters)
    return accepted


def _validate_method_hyperparameters(hp: dict[str, Any], num_models: int) -> dict[str, Any]:
    if "scaling_coefficient" in hp:
        hp["scaling_coefficient"] = _check_number("scaling_coefficient", hp["scaling_coefficient"])
    if "param_value_mask_rate" in hp:
        hp["param_value_mask_rate"] = _check_rate("param_value_mask_rate", hp["param_value_mask_rate"])
    if "ties_trim_scope" in hp:
        check_choice("ties_trim_scope", hp["ties_trim_scope"], _CHOICES["ties_trim_scope"])
    if "reduce_non_diagonal_ratio" in hp:
        hp["reduce_non_diagonal_ratio"] = _check_rate(
            "reduce_non_diagonal_ratio", hp["reduce_non_diagonal_ratio"], upper_inclusive=True
        )
    if "normalize_fisher_weight" in hp:
        _check_bool("normalize_fisher_weight", hp["normalize_fisher_weight"])
    if "minimal_fisher_weight" in hp:
        epsilon = _check_number("minimal_fisher_weight", hp["minimal_fisher_weight"])
        if epsilon < 0:
            raise ValueError(f"minimal_fisher_weight must be >= 0, got {epsilon}")
    if hp.get("fisher_scaling_coefficients") is not None:
        name = "fisher_scaling_coefficients"
        hp[name] = [_check_number(name, c) for c in _per_model_list(name, hp[name], num_models)]
    return hp


def _build_dare(hp: dict[str, Any], num_models: int) -> DarePreprocessing:
    if hp["weight_mask_rate"] is None:
        raise ValueError("mask_merging needs weight_mask_rate (the DARE drop rate p in [0, 1)), got none")
    rates = _per_model_list("weight_mask_rate", hp["weight_mask_rate"], num_models)
    return DarePreprocessing(
        weight_mask_rates=tuple(_check_rate("weight_mask_rate", rate) for rate in rates),
        use_weight_rescale=_check_bool("use_weight_rescale", hp["use_weight_rescale"]),
        mask_strategy=check_choice("mask_strategy", hp["mask_strategy"], _CHOICES["mask_strategy"]),
        weight_format=check_choice("weight_format", hp["weight_format"], _CHOICES["weight_format"]),
        model_indices=tuple(range(num_models)),
    )


def build_merge_plan(merging_method_name: str, num_models: int, **hyperparameters: Any) -> MergePlan:
    """Validate a merge recipe (MergeLM names) and return its ``MergePlan``.

    Args:
        merging_method_name: one of ``MERGING_METHOD_NAMES``; ``mask_merging`` is DARE followed by
            ``mask_apply_method``.
        num_models: number of fine-tuned models.
        **hyperparameters: the method's hyperparameters (see ``accepted_hyperparameters``); unknown names,
            out-of-range rates and per-model lists of the wrong length are a ValueError.
    """
    if isinstance(num_models, bool) or not isinstance(num_models, int) or num_models < 1:
        raise ValueError(f"merging needs at least one fine-tuned model, got {num_models!r}")
    accepted = accepted_hyperparameters(merging_method_name, hyperparameters.get("mask_apply_method"))
    unknown = sorted(set(hyperparameters) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {', '.join(unknown)} for {merging_method_name}"
            f"{' + ' + accepted['mask_apply_method'] if merging_method_name == 'mask_merging' else ''}; "
            f"accepted: {', '.join(sorted(accepted))}"
        )
    hp = {**accepted, **hyperparameters}
    seed = hp.pop("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    dare = None
    if merging_method_name == "mask_merging":
        method = MERGE_METHODS[hp.pop("mask_apply_method") or "average_merging"]
        dare = _build_dare({k: hp.pop(k) for k in DARE_HYPERPARAMETERS}, num_models)
    else:
        method = MERGE_METHODS[merging_method_name]
    hp = _validate_method_hyperparameters(hp, num_models)
    return MergePlan(merging_method_name, method, num_models, hp, dare, seed)
