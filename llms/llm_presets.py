"""Table 1 presets: the merges, methods and per-benchmark settings the paper and its first author state.

Sources (see the README, "Reproducing Table 1"): **A#n** = the first author's answer in MergeLM issue n, **S** =
the paper (arXiv 2311.03099) as read from secondary notes. A cell with a stated setting (``point``) is evaluated
with it directly; a cell whose setting is unknown (``point is None``) is selected by the validation grid of the
preset's ``methods`` (paper ranges unless the preset narrows them). Runs of a preset are listed next to the
paper's numbers by ``summarize_results.py --paper_table1`` under the preset's ``table1_row``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from llms.llm_grid import describe_point, method_label
from model_merging_methods import Dare, Recipe

ALL_DATASETS = ("alpaca_eval", "gsm8k", "MATH", "human_eval", "mbpp")
TA_DARE = "mask_merging+task_arithmetic"
A39 = "A#39 (first author's best settings, lambda / p)"
UNKNOWN = "unknown (A#39 is cut off here): validation grid"


def _ta_dare(scaling_coefficient: float, weight_mask_rate: float) -> Recipe:
    """Task Arithmetic + DARE as in Table 1 (DARE rescales)."""
    return Recipe("task_arithmetic", {"scaling_coefficient": scaling_coefficient}, Dare(weight_mask_rate))


@dataclass(frozen=True)
class PresetCell:
    """One benchmark of a preset: the stated setting (or ``None`` = grid) and where it comes from.

    A stated setting is a :class:`Recipe` of what the source states; the settings it does not state (DARE's mask
    seed, TIES' trim scope) are the grid command line's, applied as to every grid point.
    """

    dataset: str
    point: Recipe | None
    source: str


@dataclass(frozen=True)
class Preset:
    """A Table 1 cell group.

    Attributes:
        name: ``table1/<models>/<method>``.
        merge_tasks: merged tasks (instruct = WizardLM-13B-V1.2, math = WizardMath-13B-V1.0, code =
            llama-2-13b-code-alpaca).
        methods: grid methods for the cells without a stated setting.
        cells: one per evaluated benchmark.
        table1_row: ``(models, method)`` of the paper's row.
        note: what is stated and what is not.
        grid_points: the candidate points when the source names them (else the paper ranges of ``methods``).
    """

    name: str
    merge_tasks: tuple[str, ...]
    methods: tuple[str, ...]
    cells: tuple[PresetCell, ...]
    table1_row: tuple[str, str]
    note: str
    grid_points: tuple[Recipe, ...] = field(default=())

    @property
    def fixed(self) -> dict[str, tuple[Recipe, str]]:
        return {c.dataset: (c.point, c.source) for c in self.cells if c.point is not None}

    @property
    def datasets(self) -> tuple[str, ...]:
        return tuple(c.dataset for c in self.cells)


def _grid_cells(datasets: tuple[str, ...], source: str) -> tuple[PresetCell, ...]:
    return tuple(PresetCell(d, None, source) for d in datasets)


_A21_POINTS = (Recipe("average_merging", dare=Dare(0.5)), _ta_dare(1.0, 0.1))
PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("table1/lm+math/task_arithmetic", ("instruct", "math"), ("task_arithmetic",),
           _grid_cells(ALL_DATASETS, "not stated: validation grid (lambda in [0.5, 1.0], A#44)"),
           ("WizardLM + WizardMath", "Task Arithmetic"), "no per-benchmark lambda is published"),
    Preset("table1/lm+math/task_arithmetic+dare", ("instruct", "math"), (TA_DARE,),
           (PresetCell("alpaca_eval", _ta_dare(1.0, 0.2), A39),
            *(PresetCell(d, _ta_dare(0.5, 0.6), A39 + ": the four other benchmarks") for d in ALL_DATASETS[1:])),
           ("WizardLM + WizardMath", "Task Arithmetic + DARE"), "every cell stated (A#39)"),
    Preset("table1/lm+code/task_arithmetic+dare", ("instruct", "code"), (TA_DARE,),
           (PresetCell("alpaca_eval", _ta_dare(1.0, 0.3), A39), PresetCell("human_eval", _ta_dare(1.0, 0.3), A39),
            PresetCell("mbpp", _ta_dare(0.5, 0.4), A39)),
           ("WizardLM + code-alpaca", "Task Arithmetic + DARE"), "every cell stated (A#39); paper numbers unknown"),
    Preset("table1/math+code/task_arithmetic+dare", ("math", "code"), (TA_DARE,),
           (PresetCell("gsm8k", _ta_dare(1.0, 0.5), A39), PresetCell("MATH", _ta_dare(1.0, 0.5), A39),
            PresetCell("human_eval", _ta_dare(0.5, 0.9), A39), PresetCell("mbpp", _ta_dare(0.5, 0.9), A39)),
           ("WizardMath + code-alpaca", "Task Arithmetic + DARE"), "every cell stated (A#39); paper numbers unknown"),
    Preset("table1/lm+math+code/task_arithmetic+dare", ("instruct", "math", "code"), (TA_DARE,),
           (PresetCell("alpaca_eval", _ta_dare(1.0, 0.1), A39), PresetCell("gsm8k", _ta_dare(0.5, 0.5), A39),
            PresetCell("MATH", _ta_dare(0.5, 0.5), A39), *_grid_cells(("human_eval", "mbpp"), UNKNOWN)),
           ("WizardLM + WizardMath + code-alpaca", "Task Arithmetic + DARE"),
           "HumanEval / MBPP settings unknown (A#39 is cut off): grid over lambda x p"),
    Preset("table1/lm+math+code/average_or_task_arithmetic+dare", ("instruct", "math", "code"),
           ("mask_merging+average_merging", TA_DARE),
           _grid_cells(ALL_DATASETS, "A#21: the better of Average Merging + DARE (p=0.5) and Task Arithmetic + DARE "
                                     "(lambda=1.0, p=0.1), chosen here on the validation sample"),
           ("WizardLM + WizardMath + code-alpaca", "Task Arithmetic + DARE"),
           "two candidate merges per benchmark (A#21)", grid_points=_A21_POINTS),
    Preset("table1/lm+math+code/task_arithmetic", ("instruct", "math", "code"), ("task_arithmetic",),
           _grid_cells(ALL_DATASETS, "not stated: validation grid (lambda in [0.5, 1.0], A#44)"),
           ("WizardLM + WizardMath + code-alpaca", "Task Arithmetic"), "no per-benchmark lambda is published"),
    Preset("table1/lm+math+code/ties_merging+dare", ("instruct", "math", "code"), ("mask_merging+ties_merging",),
           _grid_cells(ALL_DATASETS, "not stated: validation grid (lambda in [0.5, 1.0], retain in {0.5, 0.7, 0.9}, "
                                     "A#21/A#44)"),
           ("WizardLM + WizardMath + code-alpaca", "TIES + DARE"), "no setting is published; the largest grid"),
)}


MODEL_LABELS = {"instruct": "WizardLM", "math": "WizardMath", "code": "code-alpaca"}


def table1_row_for(merge_tasks: tuple[str, ...], methods: list[str] | tuple[str, ...]) -> tuple[str, str] | None:
    """``(models, method)`` Table 1 row of a grid of one method (``None`` for a grid over several methods)."""
    if len(methods) != 1:
        return None
    return " + ".join(MODEL_LABELS[t] for t in merge_tasks), method_label(methods[0])


def get_preset(name: str) -> Preset:
    if name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(name, list(PRESETS), n=2)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown preset {name!r}.{hint} Available (--list_presets): {', '.join(PRESETS)}")


def describe_presets() -> str:
    """``--list_presets``: every preset, its cells with their settings and sources."""
    lines = []
    for preset in PRESETS.values():
        lines.append(f"{preset.name}: {' + '.join(preset.merge_tasks)}; {preset.note}")
        for cell in preset.cells:
            setting = describe_point(cell.point) if cell.point is not None else "grid of " + ", ".join(preset.methods)
            lines.append(f"    {cell.dataset:<12} {setting}  [{cell.source}]")
    return "\n".join(lines) + "\n"
