"""Grid points of the paper's LLM hyperparameter search: each point is a :class:`Recipe`; the searchable methods,
the values they search, how a point is shown, and sharding.

The searchable methods (:func:`grid_methods`) are every registered method that needs no Fisher/Gram statistics
and ``mask_merging+<method>`` (DARE first) for each, read from the registry, so a newly registered method is
offered. A method searches the settings declared with an ``llm_table1`` grid (``Hyperparameter.grids``), and DARE
its drop rate; the declared values are the paper's ranges (Yu et al. 2023, arXiv 2311.03099, as stated by the
first author in MergeLM issues 21, 39 and 44): scaling coefficient lambda in [0.5, 1.0] (in steps of 0.1, the step
is not stated), DARE drop rate p in {0.1, ..., 0.9}, TIES retain ratio in {0.5, 0.7, 0.9}
(``param_value_mask_rate`` = 1 - retain ratio). DARE in the grid is ``Dare(p)``: random drop of the deltas with
rescaling, as in Table 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llms.llm_configs import llm_merge_methods
from model_merging_methods import (
    DARE_METHOD_NAME,
    DARE_SPECS,
    MERGE_METHODS,
    Dare,
    Hyperparameter,
    Recipe,
    grid_recipes,
    searched_values,
)
from model_merging_methods.hyperparameters import unknown_name_error

PROTOCOL = "llm_table1"
#: the paper's names of its searched settings, in the order its tables show them (others keep their own names)
PAPER_LABELS = {"scaling_coefficient": "λ", "weight_mask_rate": "p", "param_value_mask_rate": "retain"}


def grid_methods() -> tuple[str, ...]:
    """Every method key a grid can search: the LLM methods (no statistics) and ``mask_merging+<method>``."""
    methods = llm_merge_methods()
    return (*methods, *(f"{DARE_METHOD_NAME}+{method}" for method in methods))


def split_method_key(method_key: str) -> tuple[str, bool]:
    """``"mask_merging+ties_merging"`` -> ``("ties_merging", True)``; an unknown key is a ValueError."""
    if method_key not in grid_methods():
        raise unknown_name_error("grid method", method_key, grid_methods())
    prefix, _, method = method_key.rpartition("+")
    return method, bool(prefix)


def searched_hyperparameters(method_keys: Sequence[str]) -> dict[str, Hyperparameter]:
    """``{name: declaration}`` of every setting one of ``method_keys`` searches (declared with an ``llm_table1``
    grid; DARE's drop rate for a ``mask_merging+`` key), in declaration order, each name once."""
    found: dict[str, Hyperparameter] = {}
    for method_key in method_keys:
        method, dare = split_method_key(method_key)
        declarations = [*MERGE_METHODS[method].hyperparameters, *(DARE_SPECS.values() if dare else ())]
        for spec in declarations:
            if PROTOCOL in spec.grids:
                found.setdefault(spec.name, spec)
    return found


def with_settings(recipe: Recipe, settings: Mapping[str, Any]) -> Recipe:
    """``recipe`` with those of ``settings`` (flat names) it has; the others are left out (e.g. ``ties_trim_scope``
    for Task Arithmetic, DARE's ``seed`` without DARE)."""
    own = {name: value for name, value in settings.items() if name in recipe.declarations()}
    return recipe.replace(**own) if own else recipe


def method_points(method_key: str, values: Mapping[str, Sequence[Any]] | None = None,
                  settings: Mapping[str, Any] | None = None) -> list[Recipe]:
    """Every point of one method: the product of the values of each setting it searches.

    Args:
        method_key: a :func:`grid_methods` key.
        values: ``{name: values}`` replacing the declared ``llm_table1`` grid of a setting (the plural flags).
        settings: ``{name: value}`` of settings not searched, applied where the method has them
            (:func:`with_settings`).
    """
    method, dare = split_method_key(method_key)
    placeholder = Dare(0.0) if dare else None  # the drop rate is searched: every point replaces it
    base = with_settings(Recipe(method, dare=placeholder), settings or {})
    values = values or {}
    grid = {name: tuple(values.get(name, declared)) for name, declared in searched_values(base, PROTOCOL).items()}
    return grid_recipes(base, grid)


def expand_points(method_keys: Sequence[str], values: Mapping[str, Sequence[Any]] | None = None,
                  settings: Mapping[str, Any] | None = None) -> tuple[Recipe, ...]:
    """The points of every method in the given order (no duplicates); see :func:`method_points`."""
    points: list[Recipe] = []
    for method_key in method_keys:
        points += [point for point in method_points(method_key, values, settings) if point not in points]
    return tuple(points)


def searched_settings(point: Recipe) -> dict[str, Any]:
    """``{name: value}`` of the point's searched settings: the paper's (λ, p, retain) first, then the others in
    declaration order."""
    names = searched_hyperparameters([point.method_key])
    ordered = [*(n for n in PAPER_LABELS if n in names), *(n for n in names if n not in PAPER_LABELS)]
    settings = point.settings()
    return {name: settings[name] for name in ordered}


def column_label(name: str) -> str:
    """A searched setting's column: ``λ``, ``p``, ``retain`` for the paper's, the setting's name otherwise."""
    return PAPER_LABELS.get(name, name)


def column_value(name: str, value: Any) -> Any:
    """The value shown in that column (the TIES retain ratio is ``1 - param_value_mask_rate``)."""
    return round(1 - value, 6) if name == "param_value_mask_rate" else value


def method_label(method_key: str) -> str:
    """``Task Arithmetic + DARE`` (the registry's display name, ``+ DARE`` for ``mask_merging+``)."""
    method, dare = split_method_key(method_key)
    return MERGE_METHODS[method].display_name + (" + DARE" if dare else "")


def describe_point(point: Recipe) -> str:
    """``Task Arithmetic + DARE, λ=0.5, p=0.6`` (TIES: ``retain=0.7``): the method and its searched settings."""
    values = [f"{column_label(n)}={column_value(n, v)}" for n, v in searched_settings(point).items()]
    return ", ".join([method_label(point.method_key), *values])


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``0 <= i < N`` (``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT``)."""
    index, _, count = text.partition("/")
    try:
        shard = (int(index), int(count))
    except ValueError:
        shard = (-1, 0)
    if not 0 <= shard[0] < shard[1]:
        raise ValueError(f"shard must be i/N with 0 <= i < N (e.g. 0/4), got {text!r}")
    return shard


#: settings applied after DARE that only scale the merged deltas: grid points that differ in nothing else are merged
#: in one pass from the same DARE'd deltas (``merge_engine.merge_variants``)
SHARED_PASS_SETTINGS = ("scaling_coefficient",)


def merge_pass_key(point: Recipe) -> Recipe:
    """The point with its :data:`SHARED_PASS_SETTINGS` at their declared defaults: points with the same key differ
    only in λ, so one merge pass serves them."""
    values = {name: point.spec.specs[name].default for name in SHARED_PASS_SETTINGS if name in point.spec.specs}
    return point.replace(**values) if values else point


def pass_order(points: Sequence[Recipe]) -> tuple[Recipe, ...]:
    """The points with those differing only in λ next to each other: groups in the grid order of their first
    point, each group's points in grid order."""
    groups: dict[Recipe, list[Recipe]] = {}
    for point in points:
        groups.setdefault(merge_pass_key(point), []).append(point)
    return tuple(point for group in groups.values() for point in group)


def merge_pass_groups(points: Sequence[Recipe], max_outputs: int | None = None) -> list[tuple[Recipe, ...]]:
    """Runs of consecutive points with one :func:`merge_pass_key`, at most ``max_outputs`` each (None: no limit):
    the points one merge pass writes."""
    groups: list[list[Recipe]] = []
    for point in points:
        last = groups[-1] if groups else None
        if (last is not None and merge_pass_key(last[0]) == merge_pass_key(point)
                and (max_outputs is None or len(last) < max_outputs)):
            last.append(point)
        else:
            groups.append([point])
    return [tuple(group) for group in groups]


def shard_points(points: Sequence[Recipe], shard: tuple[int, int]) -> tuple[Recipe, ...]:
    """Block ``i`` of ``N`` consecutive blocks of :func:`pass_order` (their sizes differ by at most one point): the
    shards of one grid are disjoint and together cover it, and the points that differ only in λ stay in one shard
    (one merge pass) unless a block boundary falls between them."""
    index, count = shard
    ordered = pass_order(points)
    start, stop = -(-index * len(ordered) // count), -(-(index + 1) * len(ordered) // count)
    return ordered[start:stop]
