"""The merge methods, one frozen record each: a pure per-parameter function plus what it needs.

Adding a method is one module and one line here. The module holds the pure function
``merge(base, deltas, **kwargs) -> merged`` and, where the defaults below do not fit, how its keyword arguments
are built (``merge_arguments``) and the whole-model state it needs (``global_state``); the line here is its
``MergeMethod`` record. ``MergePlan`` (the in-memory path) and ``merge_engine`` (the streaming path) read only
these records, never a method's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, Protocol

from torch import Tensor

from model_merging_methods.average import average_merging
from model_merging_methods.fisher import (
    FISHER_ESTIMATORS,
    compute_fisher_weights,
    fisher_arguments,
    fisher_global_state,
    fisher_merging,
)
from model_merging_methods.hyperparameters import (
    DARE_HYPERPARAMETERS,
    DARE_SPECS,
    Hyperparameter,
    by_name,
    check_choice,
    unknown_name_error,
)
from model_merging_methods.regmean import compute_gram_matrices, regmean_arguments, regmean_merging
from model_merging_methods.task_arithmetic import task_arithmetic
from model_merging_methods.ties import ties_arguments, ties_chunkable, ties_global_state, ties_merging

__all__ = ["DARE_HYPERPARAMETERS", "DARE_SPECS", "MERGE_METHODS", "MERGING_METHOD_NAMES", "GlobalState",
           "Hyperparameter", "MergeMethod", "check_choice", "get_merge_method", "unknown_name_error"]


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
    """The default ``merge_arguments``: the method's (non-statistics) hyperparameters, passed as they are."""
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
        hyperparameters: the declaration of every setting (``Hyperparameter``): default, range, help, grids.
            Settings with ``statistics`` set configure the caller's Fisher / Gram computation and are not
            passed to ``merge``.
        statistics: extra per-model input the caller supplies: Fisher diagonals or Gram matrices.
        merge_arguments: ``(hyperparameters, *, name, num_models, statistics, global_state) -> kwargs`` of
            ``merge`` for one parameter; by default the (non-statistics) hyperparameters themselves.
        global_state: ``(hyperparameters, num_models, total_numel) -> GlobalState | None``, the whole-model
            accumulator the method needs (None: none).
        chunkable: ``(hyperparameters) -> bool``; True when a tensor may be merged in row chunks (element-wise
            maths given the global state). Methods with ``statistics`` are never chunked.
        propagates_non_finite: True when a NaN/Inf in any input always leaves a NaN/Inf in the merged tensor
            (only adds and scales), so checking the output finds every non-finite input.
        label: the name tables show (default: ``name``).
    """

    name: str
    merge: Callable[..., Tensor]
    hyperparameters: tuple[Hyperparameter, ...] = ()
    statistics: Literal["fisher", "gram"] | None = None
    merge_arguments: Callable[..., dict[str, Any]] = hyperparameters_as_arguments
    global_state: Callable[[Mapping[str, Any], int, int], GlobalState | None] = no_global_state
    chunkable: Callable[[Mapping[str, Any]], bool] = never
    propagates_non_finite: bool = False
    label: str = ""

    def __post_init__(self) -> None:
        specs = by_name(self.hyperparameters)
        clash = sorted(set(specs) & set(DARE_SPECS))
        if clash:
            raise ValueError(f"{self.name} declares {clash}, which are DARE's settings; choose other names")
        if self.statistics is None and any(spec.statistics for spec in self.hyperparameters):
            raise ValueError(f"{self.name} declares statistics settings but needs no statistics")

    @property
    def specs(self) -> Mapping[str, Hyperparameter]:
        """``{name: Hyperparameter}`` in declaration order (the grids' nesting order)."""
        return MappingProxyType(by_name(self.hyperparameters))

    @property
    def defaults(self) -> dict[str, Any]:
        """``{name: default}`` of every setting (required ones excluded)."""
        return {spec.name: spec.default for spec in self.hyperparameters if not spec.required}

    @property
    def display_name(self) -> str:
        return self.label or self.name


_SCALING_HELP = "lambda, the scale of the summed deltas"
_PAPER_LAMBDAS = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)  # MergeLM's merge_plms_glue.py grid
_TABLE1_LAMBDAS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # the paper's [0.5, 1.0]; the step (0.1) is not stated
_STATISTICS_COUNTS = (256, 512, 1024, 2048)  # MergeLM's merge_plms_glue.py grid

MERGE_METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod("average_merging", average_merging, chunkable=always, propagates_non_finite=True,
                    label="Average Merging"),
        MergeMethod(
            "task_arithmetic", task_arithmetic,
            (Hyperparameter("scaling_coefficient", "number", 1.0, help=_SCALING_HELP,
                            why="lambda = 1 adds every task vector whole (MergeLM's default)",
                            grids={"glue_paper": _PAPER_LAMBDAS, "glue_reduced": (0.3, 0.5, 0.7, 1.0),
                                   "glue_quick": (0.5, 1.0), "llm_table1": _TABLE1_LAMBDAS}),),
            chunkable=always, propagates_non_finite=True, label="Task Arithmetic",
        ),
        MergeMethod(
            "ties_merging", ties_merging,
            (Hyperparameter("scaling_coefficient", "number", 1.0, help=_SCALING_HELP,
                            why="lambda = 1 adds the disjoint mean whole (MergeLM's default)",
                            grids={"glue_paper": _PAPER_LAMBDAS, "glue_reduced": (0.5, 1.0), "glue_quick": (0.5, 1.0),
                                   "llm_table1": _TABLE1_LAMBDAS}),
             Hyperparameter("param_value_mask_rate", "rate", 0.8,
                            help="TIES trim rate: fraction of each delta's smallest |values| reset to 0 (1 - the "
                                 "retain ratio)",
                            why="keep the top 20 %, the TIES paper's k (MergeLM's default)",
                            grids={"glue_paper": (0.7, 0.8, 0.9), "glue_reduced": (0.7, 0.9), "glue_quick": (0.8,),
                                   "llm_table1": (0.5, 0.3, 0.1)}),
             Hyperparameter("ties_trim_scope", "choice", "global", choices=("global", "per_tensor"),
                            help="TIES trim over the whole model (global: MergeLM's, one extra pass over every "
                                 "model) or per tensor (per_tensor: mergekit's, one streaming pass)",
                            why="MergeLM trims over the whole model")),
            merge_arguments=ties_arguments, global_state=ties_global_state, chunkable=ties_chunkable, label="TIES",
        ),
        MergeMethod(
            "fisher_merging", fisher_merging,
            (Hyperparameter("fisher_scaling_coefficients", "number", None, optional=True, per_model=True,
                            help="per-model Fisher coefficients (default 1/M each; equal values cancel out)",
                            why="equal weights; MergeLM's default",
                            grids={"glue_paper": _PAPER_LAMBDAS, "glue_reduced": (1.0,), "glue_quick": (1.0,)}),
             Hyperparameter("normalize_fisher_weight", "bool", True, cli_default=False,
                            help="divide each model's Fisher by its global L2 norm before merging",
                            why="MergeLM's library normalises; its merge_plms_glue.py flag is off unless given"),
             Hyperparameter("minimal_fisher_weight", "number", 1e-6, minimum=0.0,
                            help="epsilon added to every Fisher value", why="MergeLM's default; avoids 0/0"),
             Hyperparameter("num_fisher_examples", "count", 256, statistics="num_examples",
                            cli_flag="nums_fisher_examples",
                            help="training examples per model for the Fisher statistics",
                            why="MergeLM's command-line default",
                            grids={"glue_paper": _STATISTICS_COUNTS, "glue_reduced": (256,), "glue_quick": (64,)}),
             Hyperparameter("fisher_estimator", "choice", "mergelm", choices=FISHER_ESTIMATORS,
                            statistics="estimator",
                            run_per_value=True,
                            help="Fisher estimator: MergeLM's batch objective, or the exact diagonal Fisher",
                            why="MergeLM's estimator, for parity")),
            statistics="fisher", merge_arguments=fisher_arguments, global_state=fisher_global_state,
            label="Fisher Merging",
        ),
        MergeMethod(
            "regmean_merging", regmean_merging,
            (Hyperparameter("num_regmean_examples", "count", 256, statistics="num_examples",
                            cli_flag="nums_regmean_examples",
                            help="training examples per model for the Gram matrices",
                            why="MergeLM's command-line default",
                            grids={"glue_paper": _STATISTICS_COUNTS, "glue_reduced": (256,), "glue_quick": (64,)}),
             Hyperparameter("reduce_non_diagonal_ratio", "rate_inclusive", 1.0,
                            help="RegMean alpha: scale of the Gram matrices' off-diagonal entries",
                            why="MergeLM's default (no reduction)",
                            grids={"glue_paper": (0.7, 0.8, 0.9, 1.0), "glue_reduced": (0.7, 0.9),
                                   "glue_quick": (0.9,)})),
            statistics="gram", merge_arguments=regmean_arguments, label="RegMean",
        ),
    )
}

#: MergeLM's ``merging_method_name`` for DARE followed by ``mask_apply_method`` (not a registered method).
DARE_METHOD_NAME = "mask_merging"


def merge_method_names(*, without_statistics: bool = False) -> tuple[str, ...]:
    """The registered methods, in registry order; ``without_statistics``: only those needing no Fisher/Gram data."""
    return tuple(name for name, method in MERGE_METHODS.items() if not (without_statistics and method.statistics))


def merging_method_names(*, without_statistics: bool = False) -> tuple[str, ...]:
    """Every ``merging_method_name`` the entry points accept: the registered methods and ``mask_merging``."""
    return (*merge_method_names(without_statistics=without_statistics), DARE_METHOD_NAME)


#: MergeLM's list at import time (``merging_method_names()`` sees methods registered later).
MERGING_METHOD_NAMES: tuple[str, ...] = merging_method_names()


def get_merge_method(name: str) -> MergeMethod:
    """The registered method called ``name``; an unknown name is a ValueError listing the choices."""
    if name not in MERGE_METHODS:
        raise unknown_name_error("merging method", name, list(MERGE_METHODS))
    return MERGE_METHODS[name]


#: the function computing each kind of statistics from a model and training batches
STATISTICS_FUNCTIONS: dict[str, Callable[..., dict[str, Tensor]]] = {
    "fisher": compute_fisher_weights, "gram": compute_gram_matrices,
}


def compute_statistics(method: MergeMethod, settings: Mapping[str, Any], model: Any, batches: Any, *,
                       device: str = "cpu") -> dict[str, Tensor]:
    """``method``'s statistics (Fisher diagonals or Gram matrices) of ``model`` over ``batches``.

    ``settings`` are the recipe's statistics settings (``Recipe.statistics_settings()``); each is passed as the
    keyword its declaration names (``num_fisher_examples`` -> ``num_examples``).
    """
    if method.statistics is None:
        raise ValueError(f"{method.name} needs no statistics, got a request to compute them")
    keywords = {method.specs[name].statistics: value for name, value in settings.items()}
    return STATISTICS_FUNCTIONS[method.statistics](model, batches, device=device, **keywords)

