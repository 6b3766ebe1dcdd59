"""A merge recipe: the method, every hyperparameter and the DARE settings, as one validated, hashable value.

A run or a grid point is one :class:`Recipe`. It is validated against the declarations
(``MergeMethod.hyperparameters``, ``DARE_HYPERPARAMETERS``) when it is made, names its folders, is recorded in
``config.json`` and merge records, serves as a cache key, and is compared to decide whether a finished result can
be reused::

    recipe = Recipe("ties_merging", {"scaling_coefficient": 0.5}, dare=Dare(0.9))
    recipe.merging_method_name          # "mask_merging" (MergeLM's name for DARE first)
    recipe.replace(weight_mask_rate=0.5)  # a grid neighbour
    Recipe.from_mergelm("mask_merging", mask_apply_method="ties_merging", weight_mask_rate=0.9)  # the same
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from model_merging_methods.hyperparameters import DARE_SPECS, Hyperparameter, unknown_name_error
from model_merging_methods.registry import DARE_METHOD_NAME, MERGE_METHODS, MergeMethod, get_merge_method

DARE_NAMES = tuple(DARE_SPECS)


class FrozenMapping(Mapping):
    """A read-only, hashable ``{name: value}`` (lists become tuples)."""

    def __init__(self, items: Mapping[str, Any]) -> None:
        self._items = {k: tuple(v) if isinstance(v, list) else v for k, v in items.items()}

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._items.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return repr(self._items)


def _suggest(name: str, accepted: Sequence[str], owner: str) -> ValueError:
    return unknown_name_error("hyperparameter", name, accepted, context=f" for {owner}")


@dataclass(frozen=True)
class Dare:
    """DARE's settings (``DARE_HYPERPARAMETERS``): the drop rate (one, or one per model), rescale, strategy,
    format and mask seed. ``Dare(0.9)`` is the paper's DARE; ``use_weight_rescale=False`` is DropOnly."""

    weight_mask_rate: float | tuple[float, ...]
    use_weight_rescale: bool = DARE_SPECS["use_weight_rescale"].default
    mask_strategy: str = DARE_SPECS["mask_strategy"].default
    weight_format: str = DARE_SPECS["weight_format"].default
    seed: int = DARE_SPECS["seed"].default
    rescale_factor: float | None = DARE_SPECS["rescale_factor"].default

    def __post_init__(self) -> None:
        for name in DARE_NAMES:
            object.__setattr__(self, name, DARE_SPECS[name].check(getattr(self, name), where="DARE's "))
        if self.rescale_factor is not None:
            if self.rescale_factor <= 0:
                raise ValueError(f"DARE's rescale_factor must be > 0, got {self.rescale_factor}; leave it unset for "
                                 "the paper's 1/(1-p)")
            if not self.use_weight_rescale:
                raise ValueError(f"DARE's rescale_factor {self.rescale_factor} replaces the rescale, got it without "
                                 "use_weight_rescale; pass --use_weight_rescale (use_weight_rescale=True)")

    def rates(self, num_models: int) -> tuple[float, ...]:
        """One drop rate per model (a per-model list of the wrong length is a ValueError)."""
        rates = DARE_SPECS["weight_mask_rate"].check(self.weight_mask_rate, num_models=num_models, where="DARE's ")
        return rates if isinstance(rates, tuple) else (rates,) * num_models

    def settings(self) -> dict[str, Any]:
        """``{MergeLM name: value}`` of every DARE setting; ``rescale_factor`` only when set (so runs of the paper's
        rescale keep the names and records they had before the setting existed)."""
        return {name: getattr(self, name) for name in DARE_NAMES
                if not (name == "rescale_factor" and self.rescale_factor is None)}

    @property
    def variant(self) -> str:
        """``DARE``, ``DropOnly`` or ``magnitude`` (+ ``-finetuned_weight`` when fine-tuned weights are dropped)."""
        name = "magnitude" if self.mask_strategy == "magnitude" else "DARE" if self.use_weight_rescale else "DropOnly"
        name += f"-rescale_{self.rescale_factor:g}" if self.rescale_factor is not None else ""
        return name + ("-finetuned_weight" if self.weight_format == "finetuned_weight" else "")


@dataclass(frozen=True)
class Recipe:
    """One merge: a registered method, all its hyperparameters (defaults filled in) and DARE (None: no DARE).

    Attributes:
        method: a ``MERGE_METHODS`` name (the method applied after DARE, MergeLM's ``mask_apply_method``).
        hyperparameters: given values; unknown names are a ValueError suggesting the nearest declared name, and
            the declared defaults fill in the rest.
        dare: DARE's settings, applied to every delta first.
    """

    method: str
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    dare: Dare | None = None

    def __post_init__(self) -> None:
        spec = get_merge_method(self.method)
        given = dict(self.hyperparameters)
        for name in given:
            if name not in spec.specs:
                raise _suggest(name, list(spec.specs), self.method)
        values = {}
        for name, declaration in spec.specs.items():
            if name not in given and declaration.required:
                raise ValueError(f"{self.method} needs {name} ({declaration.help}), got none")
            values[name] = declaration.check(given.get(name, declaration.default), where=f"{self.method}'s ")
        object.__setattr__(self, "hyperparameters", FrozenMapping(values))

    # -- construction from MergeLM's flat names ------------------------------------------------------------------

    @classmethod
    def from_mergelm(cls, merging_method_name: str, **values: Any) -> Recipe:
        """The recipe of MergeLM's ``merging_models(merging_method_name, **kwargs)`` keywords.

        ``mask_merging`` is DARE (``weight_mask_rate``, ``use_weight_rescale``, ``mask_strategy``,
        ``weight_format``) followed by ``mask_apply_method`` (default ``average_merging``); ``seed`` is accepted
        by every method (DARE's mask seed; without DARE it changes nothing). Unknown names are a ValueError that
        names the requested method and suggests the nearest accepted name.
        """
        values = dict(values)
        if merging_method_name == DARE_METHOD_NAME:
            method = values.pop("mask_apply_method", None) or "average_merging"
            if method not in MERGE_METHODS:
                raise unknown_name_error("mask_apply_method", method, list(MERGE_METHODS))
            owner = f"{DARE_METHOD_NAME} + {method}"
            accepted = [*DARE_NAMES, *get_merge_method(method).specs]
            for name in values:
                if name not in accepted:
                    raise _suggest(name, [*accepted, "mask_apply_method"], owner)
            if values.get("weight_mask_rate") is None:
                raise ValueError(f"{owner} needs weight_mask_rate (the DARE drop rate p in [0, 1)), got none")
            dare = Dare(**{k: values.pop(k) for k in DARE_NAMES if k in values})
            return cls(method, values, dare)
        if merging_method_name not in MERGE_METHODS:
            raise unknown_name_error("merging_method_name", merging_method_name,
                                     [*MERGE_METHODS, DARE_METHOD_NAME])
        values.pop("seed", None)
        if "mask_apply_method" in values:
            raise ValueError(f"mask_apply_method applies after DARE, got it with {merging_method_name}; pass "
                             f"merging_method_name={DARE_METHOD_NAME!r} or drop mask_apply_method")
        for name in values:
            if name in DARE_SPECS:
                raise ValueError(f"{name} is a DARE setting, got it with {merging_method_name}; pass "
                                 f"merging_method_name={DARE_METHOD_NAME!r} with mask_apply_method="
                                 f"{merging_method_name!r} for DARE first")
        return cls(merging_method_name, values)

    # -- what the recipe is ------------------------------------------------------------------------------------

    @property
    def spec(self) -> MergeMethod:
        return MERGE_METHODS[self.method]

    @property
    def merging_method_name(self) -> str:
        """MergeLM's name: ``mask_merging`` with DARE, else the method."""
        return DARE_METHOD_NAME if self.dare is not None else self.method

    @property
    def method_path(self) -> tuple[str, ...]:
        """Folder parts: ``("mask_merging", "ties_merging")`` with DARE, ``("ties_merging",)`` without."""
        return (DARE_METHOD_NAME, self.method) if self.dare is not None else (self.method,)

    @property
    def method_key(self) -> str:
        """``mask_merging+ties_merging`` or ``ties_merging`` (one folder name)."""
        return "+".join(self.method_path)

    def declarations(self) -> dict[str, Hyperparameter]:
        """``{name: Hyperparameter}`` of every setting of this recipe: the method's, then DARE's."""
        return {**self.spec.specs, **(DARE_SPECS if self.dare is not None else {})}

    def merge_hyperparameters(self) -> dict[str, Any]:
        """The settings ``merge`` reads (statistics settings left out)."""
        return {k: v for k, v in self.hyperparameters.items() if not self.spec.specs[k].statistics}

    def statistics_settings(self) -> dict[str, Any]:
        """The settings of the caller's Fisher / Gram computation (``num_fisher_examples``, ...)."""
        return {k: v for k, v in self.hyperparameters.items() if self.spec.specs[k].statistics}

    def settings(self, *, statistics: bool = True) -> dict[str, Any]:
        """Every setting by its flat name: the method's hyperparameters, then DARE's (the folder names' keys)."""
        values = dict(self.hyperparameters if statistics else self.merge_hyperparameters())
        return {**values, **(self.dare.settings() if self.dare is not None else {})}

    def mergelm_hyperparameters(self, *, statistics: bool = False) -> dict[str, Any]:
        """MergeLM's flat keywords (``mask_apply_method`` with DARE); ``from_mergelm`` inverts it."""
        values = self.settings(statistics=statistics)
        if self.dare is None:
            values.pop("seed", None)
            return values
        return {"mask_apply_method": self.method, **values}

    def replace(self, **values: Any) -> Recipe:
        """This recipe with some settings changed (method hyperparameters or DARE settings, by flat name)."""
        dare_values = {k: values.pop(k) for k in list(values) if k in DARE_SPECS}
        if dare_values and self.dare is None:
            raise ValueError(f"{sorted(dare_values)} are DARE settings, got them for {self.method} without DARE")
        dare = self.dare if not dare_values else Dare(**{**self.dare.settings(), **dare_values})
        return Recipe(self.method, {**self.hyperparameters, **values}, dare)

    def record(self, *, statistics: bool = True) -> dict[str, Any]:
        """What ``config.json`` and merge records hold (JSON; ``from_record`` reads it back).

        ``statistics=False`` leaves out the statistics settings (a merge of precomputed statistics files).
        """
        values = self.hyperparameters if statistics else self.merge_hyperparameters()
        return {"merging_method_name": self.merging_method_name, "method": self.method,
                "hyperparameters": _json_lists(values),
                "dare": _json_lists(self.dare.settings()) if self.dare is not None else None}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Recipe:
        dare = record.get("dare")
        return cls(record["method"], record.get("hyperparameters", {}), Dare(**dare) if dare else None)

    def describe(self) -> str:
        """``TIES + DARE: scaling_coefficient=0.5, param_value_mask_rate=0.3, weight_mask_rate=0.6``."""
        label = self.spec.display_name + (" + DARE" if self.dare is not None else "")
        values = ", ".join(f"{k}={v}" for k, v in self.settings().items())
        return f"{label}: {values}" if values else label


def _json_lists(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


# ---------------------------------------------------------------------------------------------------------------
# Grids


def searched_values(recipe: Recipe, protocol: str, *, dare_rate: bool = True) -> dict[str, tuple]:
    """``{name: values}`` the protocol searches for this recipe: the method's declared grids in declaration order,
    then DARE's drop rate (``dare_rate=False`` leaves it out, for searches that pick it in a second stage)."""
    declarations = recipe.declarations()
    if not dare_rate:
        declarations.pop("weight_mask_rate", None)
    return {name: spec.grids[protocol] for name, spec in declarations.items() if protocol in spec.grids}


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of a ``{name: values}`` grid, the first name varying slowest; ``[{}]`` when empty."""
    names = list(grid)
    for name in names:
        if not grid[name]:
            raise ValueError(f"the grid of {name} is empty; give at least one value")
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*(grid[n] for n in names))]


def grid_recipes(base: Recipe, grid: Mapping[str, Sequence[Any]]) -> list[Recipe]:
    """``base`` with every combination of ``grid`` (each recipe validated)."""
    return [base.replace(**setting) for setting in expand_grid(grid)]
