"""The merge methods, one frozen record each: a pure per-parameter function plus what it needs."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from model_merging_methods.average import average_merging
from model_merging_methods.fisher import fisher_merging
from model_merging_methods.regmean import regmean_merging
from model_merging_methods.task_arithmetic import task_arithmetic
from model_merging_methods.ties import ties_merging


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: ``merge(base, deltas, **kwargs) -> merged`` over float32 tensors of one parameter.

    Attributes:
        name: MergeLM name, used on every command line.
        merge: the pure per-parameter function.
        hyperparameters: user-facing hyperparameters and their defaults (MergeLM's library defaults).
        statistics: extra per-model input the caller supplies: Fisher diagonals or Gram matrices.
        reference: arXiv id of the method's paper.
    """

    name: str
    merge: Callable[..., Any]
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    statistics: Literal["fisher", "gram"] | None = None
    reference: str = ""


MERGE_METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod("average_merging", average_merging, MappingProxyType({}), reference="2203.05482"),
        MergeMethod(
            "task_arithmetic", task_arithmetic, MappingProxyType({"scaling_coefficient": 1.0}), reference="2212.04089"
        ),
        MergeMethod(
            "ties_merging",
            ties_merging,
            MappingProxyType({"param_value_mask_rate": 0.8, "scaling_coefficient": 1.0, "ties_trim_scope": "global"}),
            reference="2306.01708",
        ),
        MergeMethod(
            "fisher_merging",
            fisher_merging,
            MappingProxyType(
                {"fisher_scaling_coefficients": None, "normalize_fisher_weight": True, "minimal_fisher_weight": 1e-6}
            ),
            statistics="fisher",
            reference="2111.09832",
        ),
        MergeMethod(
            "regmean_merging",
            regmean_merging,
            MappingProxyType({"reduce_non_diagonal_ratio": 1.0}),
            statistics="gram",
            reference="2212.09849",
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


def get_merge_method(name: str) -> MergeMethod:
    """The registered method called ``name``; an unknown name is a ValueError listing the choices."""
    if name not in MERGE_METHODS:
        raise unknown_name_error("merging method", name, list(MERGE_METHODS))
    return MERGE_METHODS[name]
