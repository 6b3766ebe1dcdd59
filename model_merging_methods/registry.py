"""The merge methods, one frozen record each: a pure per-parameter function plus what it needs.

Adding a method is one module and one line here. The module holds the pure function
``merge(base, deltas, **kwargs) -> merged`` and, where the defaults below do not fit, how its keyword arguments
are built (``merge_arguments``) and the whole-model state it needs (``global_state``); the line here is its
``MergeMethod`` record. ``MergePlan`` (the in-memory path) and ``merge_engine`` (the streaming path) read only
these records, never a method's name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Protocol

from torch import Tensor

from model_merging_methods.average import average_merging
from model_merging_methods.fisher import fisher_arguments, fisher_global_state, fisher_merging
from model_merging_methods.regmean import regmean_arguments, regmean_merging
from model_merging_methods.task_arithmetic import task_arithmetic
from model_merging_methods.ties import ties_arguments, ties_chunkable, ties_global_state, ties_merging


class GlobalState(Protocol):
    """A whole-model accumulator, filled before any tensor is merged (MergeLM's global TIES trim, Fisher norms).

    Both drivers (``merge_state_dicts`` and ``merge_engine``) run ``num_passes`` passes; in each they call
    ``update`` once for every merged tensor (or row chunk), in any order, then ``finish_pass``.
    """

    #: how many passes over the merged tensors the state needs.
    num_passes: int
    #: True: ``update`` gets each tensor's stacked float32 deltas ``(num_models, ...)`` (after DARE), so the
    #: models are read in every pass; False: it gets the tensor's per-model statistics and nothing is read.
    uses_model_tensors: bool

    def update(self, pass_index: int, values: Tensor | Sequence[Tensor]) -> None:
        """Add one tensor's deltas (``uses_model_tensors``) or statistics to pass ``pass_index``."""

    def finish_pass(self, pass_index: int) -> None:
        """Close pass ``pass_index`` (after the last pass the state holds what ``merge_arguments`` reads)."""


def hyperparameters_as_arguments(hyperparameters: Mapping[str, Any], *, name: str, num_models: int,
                                 statistics: Sequence[Tensor] | None, global_state: GlobalState | None) -> dict:
    """The default ``merge_arguments``: the method's hyperparameters, passed as they are."""
    return dict(hyperparameters)


def no_global_state(hyperparameters: Mapping[str, Any], num_models: int, total_numel: int) -> None:
    """The default ``global_state``: the method needs no whole-model quantity."""
    return None


def always(hyperparameters: Mapping[str, Any]) -> bool:
    return True


def never(hyperparameters: Mapping[str, Any]) -> bool:
    return False


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: ``merge(base, deltas, **merge_arguments(...)) -> merged`` over float32 tensors of one parameter.

    Attributes:
        name: MergeLM name, used on every command line.
        merge: the pure per-parameter function.
        hyperparameters: user-facing hyperparameters and their defaults (MergeLM's library defaults).
        statistics: extra per-model input the caller supplies: Fisher diagonals or Gram matrices.
        merge_arguments: ``(hyperparameters, *, name, num_models, statistics, global_state) -> kwargs`` of
            ``merge`` for one parameter; by default the hyperparameters themselves.
        global_state: ``(hyperparameters, num_models, total_numel) -> GlobalState | None``, the whole-model
            accumulator the method needs (None: none).
        chunkable: ``(hyperparameters) -> bool``; True when a tensor may be merged in row chunks (element-wise
            maths given the global state). Methods with ``statistics`` are never chunked.
        propagates_non_finite: True when a NaN/Inf in any input always leaves a NaN/Inf in the merged tensor
            (only adds and scales), so checking the output finds every non-finite input.
    """

    name: str
    merge: Callable[..., Tensor]
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    statistics: Literal["fisher", "gram"] | None = None
    merge_arguments: Callable[..., dict[str, Any]] = hyperparameters_as_arguments
    global_state: Callable[[Mapping[str, Any], int, int], GlobalState | None] = no_global_state
    chunkable: Callable[[Mapping[str, Any]], bool] = never
    propagates_non_finite: bool = False


MERGE_METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod("average_merging", average_merging, MappingProxyType({}), chunkable=always,
                    propagates_non_finite=True),
        MergeMethod("task_arithmetic", task_arithmetic, MappingProxyType({"scaling_coefficient": 1.0}),
                    chunkable=always, propagates_non_finite=True),
        MergeMethod(
            "ties_merging",
            ties_merging,
            MappingProxyType({"param_value_mask_rate": 0.8, "scaling_coefficient": 1.0, "ties_trim_scope": "global"}),
            merge_arguments=ties_arguments, global_state=ties_global_state, chunkable=ties_chunkable,
        ),
        MergeMethod(
            "fisher_merging",
            fisher_merging,
            MappingProxyType(
                {"fisher_scaling_coefficients": None, "normalize_fisher_weight": True, "minimal_fisher_weight": 1e-6}
            ),
            statistics="fisher", merge_arguments=fisher_arguments, global_state=fisher_global_state,
        ),
        MergeMethod(
            "regmean_merging",
            regmean_merging,
            MappingProxyType({"reduce_non_diagonal_ratio": 1.0}),
            statistics="gram", merge_arguments=regmean_arguments,
        ),
    )
}

#: DARE's pre-processing hyperparameters (``mask_merging``) and their defaults; ``weight_mask_rate`` is required.
DARE_HYPERPARAMETERS: Mapping[str, Any] = MappingProxyType(
    {"weight_mask_rate": None, "use_weight_rescale": True, "mask_strategy": "random", "weight_format": "delta_weight"}
)

#: Every ``merging_method_name`` accepted by the entry points (MergeLM's list).
MERGING_METHOD_NAMES: tuple[str, ...] = (*MERGE_METHODS, "mask_merging")


def unknown_name_error(kind: str, name: object, choices: list[str] | tuple[str, ...]) -> ValueError:
    """``ValueError("unknown <kind> 'x'. Did you mean: y? Available: a, b, c")``."""
    close = difflib.get_close_matches(str(name), choices, n=1)
    hint = f" Did you mean: {close[0]}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}.{hint} Available: {', '.join(sorted(choices))}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> Any:
    """``value`` when it is one of ``choices``; otherwise ``unknown_name_error``."""
    if value not in choices:
        raise unknown_name_error(name, value, tuple(choices))
    return value


def get_merge_method(name: str) -> MergeMethod:
    """The registered method called ``name``; an unknown name is a ValueError listing the choices."""
    if name not in MERGE_METHODS:
        raise unknown_name_error("merging method", name, list(MERGE_METHODS))
    return MERGE_METHODS[name]
