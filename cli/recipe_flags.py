"""Every command line's merge and DARE flags, derived from the hyperparameter declarations, and the recipes they give.

A method's flags are its ``MergeMethod.hyperparameters``; DARE's are ``DARE_HYPERPARAMETERS``. Each flag takes its
name (``Hyperparameter.flag``: MergeLM's, e.g. ``--nums_fisher_examples``), type, choices and help from the
declaration, so a newly registered method is offered, with its own flags, by every script that builds its parser
here. Defaults are MergeLM's command-line defaults (``Hyperparameter.command_line_default``); a script departs from
them only through ``defaults``, with its reason, or asks for the library's (``library_defaults``: an unset flag
is ``None`` and the declared default applies). ``--use_weight_rescale`` stays MergeLM's ``store_true`` flag on
every command line: without it a random drop is DropOnly, not DARE.

``recipe_from_args`` reads one :class:`~model_merging_methods.recipe.Recipe` back from the parsed flags, and
``refuse_unused_flags`` rejects a flag given a value that the chosen recipes never read.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from model_merging_methods import (
    DARE_HYPERPARAMETERS,
    DARE_METHOD_NAME,
    MERGE_METHODS,
    Dare,
    Hyperparameter,
    Recipe,
    merge_method_names,
    merging_method_names,
)

__all__ = ["DARE_METHOD_NAME", "add_hyperparameter_flags", "add_homology_flags", "add_method_flags",
           "dare_from_args", "declared_flags", "merge_method_names", "merging_method_names", "recipe_from_args",
           "refuse_unused_flags", "unused_flags"]

METHOD_HELP = {
    "merging_method_name": f"merge method; {DARE_METHOD_NAME} = DARE on every delta, then --mask_apply_method",
    "mask_apply_method": f"method applied to the DARE'd deltas by {DARE_METHOD_NAME} (ties_merging = DARE-TIES)",
}
HOMOLOGY_HELP = {
    "skip_homology_check": "do not sample a few tensors before merging to check that every fine-tune is derived "
                           "from the base (see analyze_deltas.py)",
    "strict_homology_check": "a fine-tune the homology check flags (not derived from the base, or deltas far "
                             "outside the SFT range) is an error before any model is written, not a warning",
}
_SEVERAL_HELP = " (one or more, one run each)"


def add_method_flags(parser: argparse.ArgumentParser, *, several: bool = False, without_statistics: bool = False,
                     library_defaults: bool = False) -> None:
    """``--merging_method_name`` and ``--mask_apply_method`` (choices: the registry when the parser is built).

    Args:
        several: each flag takes one or more names (one run each).
        without_statistics: offer only methods that need no Fisher/Gram statistics (scripts without data).
        library_defaults: no default method; ``--merging_method_name`` is required.
    """
    nargs = {"nargs": "+"} if several else {}
    suffix = _SEVERAL_HELP if several else ""
    default = "average_merging"  # MergeLM's command-line default of both flags
    name_default = {"required": True} if library_defaults else {"default": [default] if several else default}
    parser.add_argument("--merging_method_name", help=METHOD_HELP["merging_method_name"] + suffix,
                        choices=list(merging_method_names(without_statistics=without_statistics)), **nargs,
                        **name_default)
    parser.add_argument("--mask_apply_method", help=METHOD_HELP["mask_apply_method"] + suffix,
                        choices=list(merge_method_names(without_statistics=without_statistics)), **nargs,
                        default=None if library_defaults else [default] if several else default)


def declared_flags(methods: Iterable[str] | None = None, *, dare: bool = True, statistics: bool = True
                   ) -> dict[str, tuple[Hyperparameter, tuple[str, ...]]]:
    """``{flag: (declaration, owners)}`` of the methods' hyperparameters (all registered methods when None) and
    DARE's, in declaration order; two owners declaring one flag differently is a ValueError."""
    owned: list[tuple[str, Hyperparameter]] = []
    for name in MERGE_METHODS if methods is None else methods:
        owned += [(name, spec) for spec in MERGE_METHODS[name].hyperparameters if statistics or not spec.statistics]
    if dare:
        owned += [("DARE", spec) for spec in DARE_HYPERPARAMETERS]
    flags: dict[str, tuple[Hyperparameter, tuple[str, ...]]] = {}
    for owner, spec in owned:
        if spec.flag in flags:
            first, owners = flags[spec.flag]
            if (first.name, first.kind, first.per_model, first.choices, first.store_true) != (
                    spec.name, spec.kind, spec.per_model, spec.choices, spec.store_true):
                raise ValueError(f"--{spec.flag} is declared differently by {owners[0]} and {owner}; give one of "
                                 "them another name")
            flags[spec.flag] = (first, (*owners, owner))
        else:
            flags[spec.flag] = (spec, (owner,))
    return flags


def _help(spec: Hyperparameter, owners: Sequence[str], several: bool, default: Any) -> str:
    text = spec.help
    if owners != ("DARE",) and len(owners) < len(MERGE_METHODS):
        text += f" [{', '.join(owners)}]"
    if spec.per_model and not several:
        text += "; one value, or one per fine-tuned model"
    if several:
        text += "; several values: " + ("one run each" if spec.run_per_value else "searched")
    if default is not None and not spec.store_true:
        text += f" (default: {default})"
    return text


def add_hyperparameter_flags(
    parser: argparse.ArgumentParser, *, methods: Iterable[str] | None = None, dare: bool = True,
    statistics: bool = True, library_defaults: bool = False, defaults: Mapping[str, Any] | None = None,
    several: Collection[str] = (), skip: Collection[str] = (), help_suffix: Mapping[str, str] | None = None,
) -> dict[str, Hyperparameter]:
    """One flag per declared hyperparameter of ``methods`` (every registered method when None) and of DARE.

    Args:
        dare: add DARE's flags.
        statistics: add the Fisher / Gram statistics settings (scripts that compute statistics themselves).
        library_defaults: an unset flag is ``None``: the declared default applies (``store_true`` flags stay
            MergeLM's: absent is False).
        defaults: ``{name: default}`` a script states instead of MergeLM's command-line default.
        several: names whose flag takes one or more values (a sweep, a grid, or one run per value).
        skip: names the script defines itself (e.g. ``seed``, which also seeds generation).
        help_suffix: ``{name: text}`` appended to a flag's help.

    Returns:
        ``{flag: declaration}`` of the flags added.
    """
    defaults, help_suffix = dict(defaults or {}), dict(help_suffix or {})
    added = {}
    for flag, (spec, owners) in declared_flags(methods, dare=dare, statistics=statistics).items():
        if spec.name in skip:
            continue
        many = spec.name in several
        kwargs: dict[str, Any] = {}
        if spec.store_true:
            kwargs.update(action="store_true")
            default = None
        else:
            default = None if library_defaults else defaults.get(spec.name, spec.command_line_default)
            if spec.kind == "bool":
                kwargs.update(action=argparse.BooleanOptionalAction)
            else:
                kwargs.update(type=spec.python_type())
                if spec.kind == "choice":
                    kwargs.update(choices=spec.choices)
                if many or spec.per_model:
                    kwargs.update(nargs="+")
                    default = [default] if default is not None and not isinstance(default, (list, tuple)) else (
                        list(default) if default is not None else None)
            kwargs.update(default=default)
        parser.add_argument(f"--{flag}", dest=spec.name,
                            help=_help(spec, owners, many, default) + help_suffix.get(spec.name, ""), **kwargs)
        added[flag] = spec
    return added


def add_homology_flags(parser: argparse.ArgumentParser, *, strict_flag: bool = True) -> None:
    """``--skip_homology_check`` and ``--strict_homology_check`` (the preflight of ``delta_analysis.check_homology``).

    Args:
        strict_flag: add ``--strict_homology_check``; ``False`` for a script whose own ``--strict`` covers it.
    """
    parser.add_argument("--skip_homology_check", action="store_true", help=HOMOLOGY_HELP["skip_homology_check"])
    if strict_flag:
        parser.add_argument("--strict_homology_check", action="store_true",
                            help=HOMOLOGY_HELP["strict_homology_check"])


def _one(spec: Hyperparameter, value: Any) -> Any:
    """A flag's value as the recipe takes it: a one-element list of a per-model flag is one value for all."""
    if isinstance(value, list):
        if len(value) == 1:
            return value[0]
        if not spec.per_model:
            raise ValueError(f"--{spec.flag} takes one value here, got {value}")
        return tuple(value)
    return value


def _given(args: argparse.Namespace, specs: Iterable[Hyperparameter], values: Mapping[str, Any]) -> dict[str, Any]:
    """``{name: value}`` of the declared settings set by ``values`` or by a flag (None / absent: not given)."""
    out = {}
    for spec in specs:
        value = values[spec.name] if spec.name in values else getattr(args, spec.name, None)
        if value is not None:
            out[spec.name] = _one(spec, value)
    return out


def dare_from_args(args: argparse.Namespace, *, values: Mapping[str, Any] | None = None) -> Dare:
    """DARE's settings from the parsed flags; ``values`` (``{name: value}``) overrides flags (e.g. a swept rate)."""
    settings = _given(args, DARE_HYPERPARAMETERS, dict(values or {}))
    if "weight_mask_rate" not in settings:
        raise ValueError(f"{DARE_METHOD_NAME} needs --weight_mask_rate (the DARE drop rate p in [0, 1)), got none")
    return Dare(**settings)


def recipe_from_args(args: argparse.Namespace, merging_method_name: str, mask_apply_method: str | None = None, *,
                     values: Mapping[str, Any] | None = None) -> Recipe:
    """The recipe of the parsed flags for one method (``mask_merging``: DARE, then ``mask_apply_method``).

    Every declared setting of the method (and DARE's, with ``mask_merging``) is read from its flag; a flag that is
    ``None`` or absent from the parser leaves the declared default. ``values`` (``{name: value}``) overrides
    flags, e.g. one point of a grid.
    """
    values = dict(values or {})
    dare = merging_method_name == DARE_METHOD_NAME
    method = (mask_apply_method or "average_merging") if dare else merging_method_name
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merging method {method!r}; available: {', '.join(merging_method_names())}")
    return Recipe(method, _given(args, MERGE_METHODS[method].hyperparameters, values),
                  dare_from_args(args, values=values) if dare else None)


def unused_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, recipes: Iterable[Recipe], *,
                 also_used: Collection[str] = ()) -> list[str]:
    """``--flag (owners)`` of every declared flag given a non-default value that none of ``recipes`` reads.

    ``also_used``: names the script reads itself (e.g. ``seed``, which also seeds generation).
    """
    used = set(also_used) | {name for r in recipes for name in r.declarations()}
    wrong = []
    for flag, (spec, owners) in declared_flags().items():
        value = getattr(args, spec.name, None)
        if spec.name not in used and value is not None and value != parser.get_default(spec.name):
            wrong.append(f"--{flag} ({', '.join(owners)})")
    return wrong


def refuse_unused_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, recipes: Iterable[Recipe], *,
                        also_used: Collection[str] = ()) -> None:
    """A ValueError naming every declared flag given a value that none of ``recipes`` reads (``unused_flags``)."""
    recipes = list(recipes)
    wrong = unused_flags(parser, args, recipes, also_used=also_used)
    if wrong:
        methods = ", ".join(sorted({r.describe().split(":")[0] for r in recipes})) or "no method"
        raise ValueError(f"{', '.join(wrong)} given, but {methods} does not use it; drop the flag or choose a method "
                         "that has it")
