"""A validated merge recipe and its per-tensor step, shared by the in-memory and the streaming paths.

``build_merge_plan(recipe, num_models)`` (or MergeLM's ``build_merge_plan(merging_method_name, num_models,
**hyperparameters)``) checks every name and value once, before any tensor is touched (``Recipe`` does, from the
declarations), and returns a ``MergePlan``. For each parameter the plan

1. turns each fine-tuned tensor into a float32 delta and applies DARE (``mask_merging`` only), keyed by
   ``(seed, model index, parameter name)`` so the result does not depend on visiting order or chunking;
2. calls the registered method's pure function on ``(base, deltas)``.

Whole-model quantities (MergeLM's global TIES trim and majority sign; Fisher normalisation norms) are
collected by a ``new_global_state`` object fed by ``global_update`` in ``num_passes`` passes over the
merged tensors, in any order; ``merge_state_dicts`` and ``merge_engine`` run the same passes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from model_merging_methods.dare import dare_delta, mask_tensor
from model_merging_methods.hyperparameters import DARE_SPECS, unknown_name_error
from model_merging_methods.recipe import Dare, Recipe
from model_merging_methods.registry import DARE_METHOD_NAME, MERGE_METHODS, GlobalState, MergeMethod, get_merge_method
from model_merging_methods.regmean import gram_module_name


@dataclass(frozen=True)
class MergePlan:
    """What to compute for every parameter; build it with ``build_merge_plan``."""

    recipe: Recipe
    num_models: int
    #: DARE's drop rate of each model, and the model index each model's mask is keyed by (``apply_dare`` and the
    #: GLUE pipeline key a model's mask by its task, not its position)
    dare_rates: tuple[float, ...] = ()
    model_indices: tuple[int, ...] = ()
    #: per model, True when its inputs are already float32 deltas (a LoRA adapter's ``ΔW``, read by
    #: ``merge_engine.lora_source``) rather than fine-tuned weights; empty: every model gives weights. A delta goes
    #: to DARE and the method as is, so it is not rounded by ``(base + ΔW) - base``
    delta_inputs: tuple[bool, ...] = ()

    @property
    def merging_method_name(self) -> str:
        return self.recipe.merging_method_name

    @property
    def method(self) -> MergeMethod:
        return self.recipe.spec

    @property
    def hyperparameters(self) -> Mapping[str, Any]:
        """The settings the method's ``merge`` reads (statistics settings are the caller's); a per-model setting
        given as one value is repeated for every model, and per-model values are lists."""
        values = {}
        for name, value in self.recipe.merge_hyperparameters().items():
            if self.method.specs[name].per_model and value is not None:
                value = list(value) if isinstance(value, tuple) else [value] * self.num_models
            values[name] = value
        return values

    @property
    def dare(self) -> Dare | None:
        return self.recipe.dare

    @property
    def seed(self) -> int:
        return self.recipe.dare.seed if self.recipe.dare is not None else 0

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
        """float32 deltas ``finetuned_i - base`` of one parameter (or chunk), after DARE when configured.

        A model flagged in ``delta_inputs`` gives its delta directly: it is DARE'd as given (the same masks, keyed
        by seed, model index, name and element offset, as the delta of a fine-tuned model), and under
        ``weight_format="finetuned_weight"`` the masked weight is ``base + delta`` in float32.
        """
        base32 = base.float()
        if self.dare is None:
            # a given delta is copied: the methods may work on their deltas in place, the caller's stay as given
            return [ft.to(torch.float32, copy=True) if self.is_delta_input(i) else _subtract(ft, base32)
                    for i, ft in enumerate(finetuned)]
        out = []
        for i, ft in enumerate(finetuned):
            masked_weight = self.dare.weight_format == "finetuned_weight"
            given_delta = self.is_delta_input(i)
            if not masked_weight and not given_delta and self.dare.mask_strategy == "random":
                out.append(dare_delta(
                    ft, base32, drop_rate=self.dare_rates[i],
                    use_weight_rescale=self.dare.use_weight_rescale, rescale_factor=self.dare.rescale_factor,
                    seed=self.seed,
                    model_index=self.model_indices[i], name=name, element_offset=element_offset,
                ))
                continue
            if given_delta:
                tensor = base32 + ft if masked_weight else ft.to(torch.float32, copy=True)
            else:
                tensor = ft.to(torch.float32, copy=True) if masked_weight else _subtract(ft, base32)
            tensor = mask_tensor(
                tensor,
                drop_rate=self.dare_rates[i],
                use_weight_rescale=self.dare.use_weight_rescale,
                rescale_factor=self.dare.rescale_factor,
                mask_strategy=self.dare.mask_strategy,
                seed=self.seed,
                model_index=self.model_indices[i],
                name=name,
                element_offset=element_offset,
            )
            out.append(tensor - base32 if masked_weight else tensor)
        return out

    def is_delta_input(self, model: int) -> bool:
        """True when fine-tuned model ``model`` (0-based) gives deltas, not weights (``delta_inputs``)."""
        return bool(self.delta_inputs) and self.delta_inputs[model]

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
        """Feed one parameter (or chunk) to the global accumulator for pass ``pass_index``.

        The one rule of both whole-model passes (``merge_state_dicts`` and ``merge_engine``): a state that reads
        model tensors is fed every parameter; one that reads statistics only the parameters that have them (a
        Gram matrix exists for Linear weights only; Fisher's coverage of every parameter is checked up front by
        ``check_statistics``).
        """
        if state.uses_model_tensors:
            state.update(pass_index, torch.stack(self.deltas(name, base, finetuned, element_offset=element_offset)))
        elif statistics is not None:
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


def accepted_hyperparameters(merging_method_name: str, mask_apply_method: str | None = None) -> dict[str, Any]:
    """MergeLM's flat names a method accepts, with their defaults (``seed`` for all; DARE's with ``mask_merging``)."""
    if merging_method_name != DARE_METHOD_NAME and merging_method_name not in MERGE_METHODS:
        raise unknown_name_error("merging_method_name", merging_method_name, [*MERGE_METHODS, DARE_METHOD_NAME])
    if merging_method_name == DARE_METHOD_NAME:
        method = get_merge_method(mask_apply_method or "average_merging")
        dare = {name: spec.default for name, spec in DARE_SPECS.items()}
        return {"mask_apply_method": "average_merging", **dare, **method.defaults}
    return {"seed": 0, **get_merge_method(merging_method_name).defaults}


def build_merge_plan(recipe: Recipe | str, num_models: int, **hyperparameters: Any) -> MergePlan:
    """The ``MergePlan`` of a recipe for ``num_models`` fine-tuned models.

    Args:
        recipe: a ``Recipe``, or MergeLM's ``merging_method_name`` with its flat ``hyperparameters``
            (``Recipe.from_mergelm``): unknown names, out-of-range values and per-model lists of the wrong
            length are a ValueError naming the method.
        num_models: number of fine-tuned models.
    """
    if isinstance(num_models, bool) or not isinstance(num_models, int) or num_models < 1:
        raise ValueError(f"merging needs at least one fine-tuned model, got {num_models!r}")
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_mergelm(recipe, **hyperparameters)
    elif hyperparameters:
        raise ValueError(f"a Recipe carries its hyperparameters, got extra {sorted(hyperparameters)}; use "
                         "recipe.replace(...)")
    for name, value in recipe.merge_hyperparameters().items():  # per-model lists now that the count is known
        recipe.spec.specs[name].check(value, num_models=num_models, where=f"{recipe.method}'s ")
    rates = recipe.dare.rates(num_models) if recipe.dare is not None else ()
    return MergePlan(recipe, num_models, rates, tuple(range(num_models)) if rates else ())
