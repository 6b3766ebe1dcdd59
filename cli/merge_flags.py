"""The DARE and merge flags of every command line, each defined once: name, type, choices, default and help.

Choices come from the merging core when the parser is built: method names from ``MERGE_METHODS`` (so a newly
registered method is offered by every script), DARE's mask strategies and weight formats from
``model_merging_methods.dare``, TIES trim scopes from ``model_merging_methods.ties``, Fisher estimators from
``model_merging_methods.fisher``.

Defaults are MergeLM's command-line defaults. A script departs from them only through a keyword argument that it
passes with its reason:

* ``library_defaults=True`` (``merge_checkpoints.py``): every unset flag is ``None``, so the method's own default
  in ``MergeMethod.hyperparameters`` applies and the recorded command lists only what was given;
* ``normalize_fisher_weight`` and ``ties_trim_scope`` have no shared default: each script states its own;
* ``several`` / ``rates``: whether a flag takes a list, and what a list means.
"""

from __future__ import annotations

import argparse
from typing import Any, Literal, get_args

from model_merging_methods import FISHER_ESTIMATORS, MERGE_METHODS
from model_merging_methods.dare import MaskStrategy, WeightFormat
from model_merging_methods.ties import TrimScope

#: MergeLM's ``merging_method_name`` for DARE followed by ``--mask_apply_method`` (not a registered method).
DARE_METHOD_NAME = "mask_merging"
MASK_STRATEGIES: tuple[str, ...] = get_args(MaskStrategy)
WEIGHT_FORMATS: tuple[str, ...] = get_args(WeightFormat)
TIES_TRIM_SCOPES: tuple[str, ...] = get_args(TrimScope)

RateValues = Literal["one", "per_model", "sweep", "grid"]

HELP = {
    "merging_method_name": f"merge method; {DARE_METHOD_NAME} = DARE on every delta, then --mask_apply_method",
    "mask_apply_method": f"method applied to the DARE'd deltas by {DARE_METHOD_NAME} (ties_merging = DARE-TIES)",
    "scaling_coefficient": "lambda, the scale of the summed deltas (task_arithmetic, ties_merging)",
    "param_value_mask_rate": "TIES trim rate: fraction of each delta's smallest |values| reset to 0 (MergeLM: 0.8)",
    "ties_trim_scope": "TIES trim over the whole model (global: MergeLM's, one extra pass over every model) or per "
                       "tensor (per_tensor: mergekit's, one streaming pass)",
    "weight_mask_rate": "DARE drop rate p in [0, 1)",
    "use_weight_rescale": "rescale the kept values by 1/(1-p) (DARE); without it, DropOnly (MergeLM's CLI default)",
    "mask_strategy": "random: DARE's Bernoulli drop; magnitude: drop each tensor's smallest |values|",
    "weight_format": "drop deltas (delta_weight, DARE) or the fine-tuned weights themselves (finetuned_weight)",
    "normalize_fisher_weight": "divide each model's Fisher by its global L2 norm before merging",
    "minimal_fisher_weight": "epsilon added to every Fisher value (MergeLM: 1e-6)",
    "fisher_scaling_coefficients": "per-model Fisher coefficients (default 1/M each; equal values cancel out)",
    "reduce_non_diagonal_ratio": "RegMean alpha: scale of the Gram matrices' off-diagonal entries (MergeLM: 1.0)",
    "nums_fisher_examples": "examples per model for the Fisher statistics (the first is used under --grid none)",
    "nums_regmean_examples": "examples per model for the Gram matrices (the first is used under --grid none)",
    "fisher_estimator": "Fisher estimator(s): MergeLM's batch objective, or the exact diagonal Fisher (one run "
                        "folder each)",
    "skip_homology_check": "do not sample a few tensors before merging to check that every fine-tune is derived "
                           "from the base (see analyze_deltas.py)",
    "strict_homology_check": "a fine-tune the homology check flags (not derived from the base, or deltas far "
                             "outside the SFT range) is an error before any model is written, not a warning",
}
_SEVERAL_HELP = " (one or more, one run each)"
_RATE_HELP = {
    "one": "",
    "per_model": "; one, or one per fine-tuned model",
    "sweep": "; several = a drop-rate sweep (one run each)",
    "grid": "; several = the DARE grid under --grid none (ignored otherwise)",
}
# MergeLM's command-line defaults (its library defaults differ, see MergeMethod.hyperparameters)
_MERGELM_DEFAULTS: dict[str, Any] = {
    "merging_method_name": "average_merging", "mask_apply_method": "average_merging", "scaling_coefficient": 1.0,
    "param_value_mask_rate": 0.8, "weight_mask_rate": 0.1, "mask_strategy": "random",
    "weight_format": "delta_weight", "minimal_fisher_weight": 1e-6, "reduce_non_diagonal_ratio": 1.0,
    "fisher_scaling_coefficients": [1.0], "nums_fisher_examples": [256], "nums_regmean_examples": [256],
    "fisher_estimator": ["mergelm"],
}


def merge_method_names(*, without_statistics: bool = False) -> list[str]:
    """The registered methods, in registry order; ``without_statistics``: only those needing no Fisher/Gram data."""
    return [name for name, method in MERGE_METHODS.items() if not (without_statistics and method.statistics)]


def merging_method_names(*, without_statistics: bool = False) -> list[str]:
    """``--merging_method_name`` choices: the registered methods plus DARE (``mask_merging``)."""
    return [*merge_method_names(without_statistics=without_statistics), DARE_METHOD_NAME]


def _default(name: str, library_defaults: bool, several: bool = False) -> Any:
    if library_defaults:
        return None
    value = _MERGELM_DEFAULTS[name]
    return [value] if several and not isinstance(value, list) else value


def _add(parser: argparse.ArgumentParser, name: str, *, several: bool = False, help_suffix: str = "",
         **kwargs: Any) -> None:
    if several:
        kwargs["nargs"] = "+"
    parser.add_argument(f"--{name}", help=HELP[name] + help_suffix, **kwargs)


def add_method_flags(parser: argparse.ArgumentParser, *, several: bool = False, without_statistics: bool = False,
                     library_defaults: bool = False) -> None:
    """``--merging_method_name`` and ``--mask_apply_method``.

    Args:
        several: each flag takes one or more names (one run each).
        without_statistics: offer only methods that need no Fisher/Gram statistics (scripts without data).
        library_defaults: no default method; ``--merging_method_name`` is required.
    """
    suffix = _SEVERAL_HELP if several else ""
    name_default = {"required": True} if library_defaults else {
        "default": _default("merging_method_name", False, several)}
    _add(parser, "merging_method_name", several=several, help_suffix=suffix,
         choices=merging_method_names(without_statistics=without_statistics), **name_default)
    _add(parser, "mask_apply_method", several=several, help_suffix=suffix,
         choices=merge_method_names(without_statistics=without_statistics),
         default=_default("mask_apply_method", library_defaults, several))


def add_ties_flags(parser: argparse.ArgumentParser, *, library_defaults: bool = False) -> None:
    """``--scaling_coefficient`` (task arithmetic and TIES) and ``--param_value_mask_rate`` (TIES)."""
    for name in ("scaling_coefficient", "param_value_mask_rate"):
        _add(parser, name, type=float, default=_default(name, library_defaults))


def add_ties_trim_scope_flag(parser: argparse.ArgumentParser, *, default: str | None) -> None:
    """``--ties_trim_scope``; ``default=None`` leaves the registry's (``global``, MergeLM's)."""
    _add(parser, "ties_trim_scope", choices=TIES_TRIM_SCOPES, default=default)


def add_dare_flags(parser: argparse.ArgumentParser, *, rates: RateValues = "one",
                   library_defaults: bool = False) -> None:
    """``--weight_mask_rate``, ``--use_weight_rescale``, ``--mask_strategy`` and ``--weight_format``.

    Args:
        rates: ``one`` rate, or a list of rates meaning one ``per_model``, a ``sweep`` or the ``grid`` values.
        library_defaults: unset flags are ``None`` (the library's defaults apply).
    """
    several = rates != "one"
    _add(parser, "weight_mask_rate", several=several, help_suffix=_RATE_HELP[rates], type=float,
         default=_default("weight_mask_rate", library_defaults, several))
    _add(parser, "use_weight_rescale", action="store_true")
    _add(parser, "mask_strategy", choices=MASK_STRATEGIES, default=_default("mask_strategy", library_defaults))
    _add(parser, "weight_format", choices=WEIGHT_FORMATS, default=_default("weight_format", library_defaults))


def add_fisher_flags(parser: argparse.ArgumentParser, *, normalize_fisher_weight: bool | None,
                     library_defaults: bool = False) -> None:
    """``--normalize_fisher_weight`` (``--no-normalize_fisher_weight``), ``--minimal_fisher_weight`` and
    ``--fisher_scaling_coefficients``.

    Args:
        normalize_fisher_weight: the default; MergeLM's library has it on, its GLUE script off. ``None`` leaves
            the library's.
        library_defaults: unset flags are ``None`` (the library's defaults apply).
    """
    _add(parser, "normalize_fisher_weight", action=argparse.BooleanOptionalAction, default=normalize_fisher_weight)
    _add(parser, "minimal_fisher_weight", type=float, default=_default("minimal_fisher_weight", library_defaults))
    _add(parser, "fisher_scaling_coefficients", several=True, type=float,
         default=_default("fisher_scaling_coefficients", library_defaults))


def add_regmean_flags(parser: argparse.ArgumentParser, *, library_defaults: bool = False) -> None:
    """``--reduce_non_diagonal_ratio``."""
    _add(parser, "reduce_non_diagonal_ratio", type=float, default=_default("reduce_non_diagonal_ratio",
                                                                            library_defaults))


def add_statistics_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of scripts that compute Fisher/Gram statistics themselves: example counts and the Fisher estimator."""
    for name in ("nums_fisher_examples", "nums_regmean_examples"):
        _add(parser, name, several=True, type=int, default=_default(name, False))
    _add(parser, "fisher_estimator", several=True, choices=FISHER_ESTIMATORS, default=_default("fisher_estimator",
                                                                                                  False))


def add_homology_flags(parser: argparse.ArgumentParser, *, strict_flag: bool = True) -> None:
    """``--skip_homology_check`` and ``--strict_homology_check`` (the preflight of ``delta_analysis.check_homology``).

    Args:
        strict_flag: add ``--strict_homology_check``; ``False`` for a script whose own ``--strict`` covers it.
    """
    _add(parser, "skip_homology_check", action="store_true")
    if strict_flag:
        _add(parser, "strict_homology_check", action="store_true")
