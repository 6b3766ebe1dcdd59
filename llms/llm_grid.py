"""Grid points of the paper's LLM hyperparameter search: one merge recipe each, its folder name, and sharding.

A :class:`GridPoint` is one merge of the chosen models: a method of :data:`GRID_METHODS` (the names of
``LlmMergeConfig.method_dirname``) and the values of the hyperparameters that method has. The paper's ranges
(Yu et al. 2023, arXiv 2311.03099, as stated by the first author in MergeLM issues 21, 39 and 44) are the
defaults: scaling coefficient lambda in [0.5, 1.0] (searched here in steps of 0.1, the step is not stated), DARE
drop rate p in {0.1, ..., 0.9} (the author's best settings span 0.1 to 0.9), TIES retain ratio in {0.5, 0.7, 0.9}
(``param_value_mask_rate`` = 1 - retain ratio). DARE always rescales (``use_weight_rescale``) with the random
strategy on deltas, as in Table 1.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

# method name -> (merging_method_name, mask_apply_method, hyperparameters searched)
GRID_METHODS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "average_merging": ("average_merging", "average_merging", ()),
    "task_arithmetic": ("task_arithmetic", "average_merging", ("scaling_coefficient",)),
    "ties_merging": ("ties_merging", "average_merging", ("scaling_coefficient", "param_value_mask_rate")),
    "mask_merging+average_merging": ("mask_merging", "average_merging", ("weight_mask_rate",)),
    "mask_merging+task_arithmetic": ("mask_merging", "task_arithmetic", ("scaling_coefficient", "weight_mask_rate")),
    "mask_merging+ties_merging": ("mask_merging", "ties_merging",
                                  ("scaling_coefficient", "weight_mask_rate", "param_value_mask_rate")),
}
PAPER_SCALING_COEFFICIENTS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
PAPER_WEIGHT_MASK_RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
PAPER_PARAM_VALUE_MASK_RATES = (0.5, 0.3, 0.1)  # TIES retain ratios 0.5, 0.7, 0.9
METHOD_LABELS = {
    "average_merging": "Average Merging", "task_arithmetic": "Task Arithmetic", "ties_merging": "TIES",
    "mask_merging+average_merging": "Average Merging + DARE", "mask_merging+task_arithmetic": "Task Arithmetic + DARE",
    "mask_merging+ties_merging": "TIES + DARE",
}


def check_method(method: str) -> None:
    if method not in GRID_METHODS:
        raise ValueError(f"merging method must be one of {', '.join(GRID_METHODS)}, got {method!r}")


@dataclass(frozen=True)
class GridPoint:
    """One merge recipe; hyperparameters the method does not have are ``None``.

    Attributes:
        method: a key of :data:`GRID_METHODS`.
        scaling_coefficient: lambda (task arithmetic, TIES).
        weight_mask_rate: DARE drop rate p (``mask_merging+*``).
        param_value_mask_rate: TIES trim rate (1 - retain ratio).
    """

    method: str
    scaling_coefficient: float | None = None
    weight_mask_rate: float | None = None
    param_value_mask_rate: float | None = None

    def __post_init__(self) -> None:
        check_method(self.method)
        searched = GRID_METHODS[self.method][2]
        for name in ("scaling_coefficient", "weight_mask_rate", "param_value_mask_rate"):
            given = getattr(self, name) is not None
            if given != (name in searched):
                need = "needs" if name in searched else "has no"
                raise ValueError(f"{self.method} {need} {name}, got {name}={getattr(self, name)}")

    def merge_fields(self) -> dict[str, object]:
        """``LlmMergeConfig`` fields of this recipe (DARE with rescaling, as in the paper)."""
        merging_method_name, mask_apply_method, _ = GRID_METHODS[self.method]
        fields: dict[str, object] = {"merging_method_name": merging_method_name,
                                     "mask_apply_method": mask_apply_method, "use_weight_rescale": True}
        for name in GRID_METHODS[self.method][2]:
            fields[name] = getattr(self, name)
        return fields

    def describe(self) -> str:
        """``Task Arithmetic + DARE, λ=0.5, p=0.6`` (TIES: ``retain=0.7``)."""
        parts = [METHOD_LABELS[self.method]]
        if self.scaling_coefficient is not None:
            parts.append(f"λ={self.scaling_coefficient}")
        if self.weight_mask_rate is not None:
            parts.append(f"p={self.weight_mask_rate}")
        if self.param_value_mask_rate is not None:
            parts.append(f"retain={round(1 - self.param_value_mask_rate, 6)}")
        return ", ".join(parts)

    def as_dict(self) -> dict[str, object]:
        return {"method": self.method, "scaling_coefficient": self.scaling_coefficient,
                "weight_mask_rate": self.weight_mask_rate, "param_value_mask_rate": self.param_value_mask_rate}


def expand_grid(
    methods: Sequence[str], *, scaling_coefficients: Sequence[float] = PAPER_SCALING_COEFFICIENTS,
    weight_mask_rates: Sequence[float] = PAPER_WEIGHT_MASK_RATES,
    param_value_mask_rates: Sequence[float] = PAPER_PARAM_VALUE_MASK_RATES,
) -> tuple[GridPoint, ...]:
    """Every combination of the values each method searches, methods in the given order (no duplicates)."""
    values = {"scaling_coefficient": scaling_coefficients, "weight_mask_rate": weight_mask_rates,
              "param_value_mask_rate": param_value_mask_rates}
    points: list[GridPoint] = []
    for method in methods:
        check_method(method)
        names = GRID_METHODS[method][2]
        for name in names:
            if not values[name]:
                raise ValueError(f"{method} searches {name}, got an empty list of values")
        for combination in itertools.product(*(values[name] for name in names)):
            point = GridPoint(method, **{name: float(v) for name, v in zip(names, combination, strict=True)})
            if point not in points:
                points.append(point)
    return tuple(points)


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


def shard_points(points: Sequence[GridPoint], shard: tuple[int, int]) -> tuple[GridPoint, ...]:
    """Every N-th point starting at i: the shards of one grid are disjoint and together cover it."""
    index, count = shard
    return tuple(points[index::count])
