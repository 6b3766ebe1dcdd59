"""The paper's Table 1 (decoder LLMs) and our results next to it, for ``summarize_results.py --paper_table1``.

Paper numbers: arXiv 2311.03099 as recovered in the project's reference notes; **S** = the paper (secondary
notes of its TeX), **A#n** = the first author in MergeLM issue n; a number marked uncertain (``?`` in the table)
has one secondary source only. Ours: single models from ``inference_llms_instruct_math_code.py`` runs with
``--weight_mask_rate 0.0``, merges from the selections of ``grid_search_llms_instruct_math_code.py`` (the
selected setting's scores on the validation sample it was selected on, on the other 90 % (test) and on the full
set, side by side), matched to a row by the selection's ``table1_row``. Cells: ``ours / paper (ours - paper)``,
x100, the difference from the full-set score; ``files`` = generated but not scored yet (AlpacaEval until its win
rate is ingested with ``evaluate_generations.py --dataset_name alpaca_eval``; code without execution). AlpacaEval
cells are the ingested win rates (percent): a single model's from its run's ``metrics.json``, a selection's parts
from the selected point's ``final/alpaca_eval.json`` (read here, so scores ingested after the selection show
without running it again).

A run is *full* only when it evaluated every example with the paper's generation length: its recorded
evaluation settings (``config.json``, or ``selection.json``'s ``config``) have ``start_index`` 0, ``end_index``
all examples and ``max_new_tokens`` None, and, for a selection, no grid point was missing or unscored
(``--allow_missing``).
Any other run is *partial* (``partial: 10 examples, 2 new tokens``; a run whose settings are not recorded too):
its row says so and its scores are left out unless ``show_partial`` (``--show_partial``), which shows them still
marked partial and without a difference from the paper.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.run_dir import atomic_write_text
from llms.llm_grid_tables import NOT_SCORED, csv_text, markdown_table, percent_score

COLUMNS = {"alpaca_eval": "AlpacaEval", "gsm8k": "GSM8K", "MATH": "MATH", "human_eval": "HumanEval", "mbpp": "MBPP"}
LM_MATH, ALL3 = "WizardLM + WizardMath", "WizardLM + WizardMath + code-alpaca"
PARTS = {"validation": "val", "test": "test", "full": "full"}
SINGLE_MODELS = {"WizardLM-13B-V1.2": "WizardLM-13B", "WizardMath-13B-V1.0": "WizardMath-13B",
                 "llama-2-13b-code-alpaca": "llama-2-13b-code-alpaca"}


@dataclass(frozen=True)
class PaperCell:
    value: float
    source: str
    certain: bool = True


def _row(source: str, values: Mapping[str, float], uncertain: tuple[str, ...] = ()) -> dict[str, PaperCell]:
    return {d: PaperCell(v, source, d not in uncertain) for d, v in values.items()}


PAPER_TABLE1: dict[tuple[str, str], dict[str, PaperCell]] = {
    ("WizardLM-13B", "—"): _row("S", {"alpaca_eval": 67.20, "gsm8k": 2.20, "MATH": 0.04, "human_eval": 36.59,
                                      "mbpp": 34.00}, ("MATH", "human_eval", "mbpp")),
    ("WizardMath-13B", "—"): _row("S", {"gsm8k": 64.22, "MATH": 14.02}),
    ("llama-2-13b-code-alpaca", "—"): _row("S", {"human_eval": 23.78, "mbpp": 27.60}),
    (LM_MATH, "Task Arithmetic"): _row("S, A#14", {"alpaca_eval": 67.04, "gsm8k": 66.34, "MATH": 13.40,
                                                   "human_eval": 28.66, "mbpp": 30.60}, ("human_eval", "mbpp")),
    (LM_MATH, "Task Arithmetic + DARE"): _row("S, A#14", {"alpaca_eval": 67.45, "gsm8k": 66.26, "MATH": 12.86,
                                                          "human_eval": 26.83, "mbpp": 32.40}, ("human_eval", "mbpp")),
    (ALL3, "Task Arithmetic"): _row("S, A#37", {"alpaca_eval": 69.03, "gsm8k": 58.45, "MATH": 9.88,
                                                "human_eval": 18.29, "mbpp": 29.80}),
    (ALL3, "Task Arithmetic + DARE"): _row("S, A#37", {"alpaca_eval": 69.28, "gsm8k": 56.48, "MATH": 10.16,
                                                       "human_eval": 23.17, "mbpp": 31.60}),
    (ALL3, "TIES + DARE"): _row("S", {"alpaca_eval": 72.50, "gsm8k": 58.00, "MATH": 9.20, "human_eval": 29.27,
                                      "mbpp": 31.40}, tuple(COLUMNS)),
}


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _score(metrics: Mapping[str, Any] | None) -> float | str | None:
    if not isinstance(metrics, Mapping):
        return None
    score = percent_score(metrics)
    return NOT_SCORED if score is None else score


def partial_evaluation(evaluation: Mapping[str, Any] | None) -> str | None:
    """``None`` when the settings are the paper's (every example, its generation length), else what differs:
    ``10 examples, 2 new tokens``, ``examples from #5 on``, ``evaluation settings not recorded``."""
    if not isinstance(evaluation, Mapping):
        return "evaluation settings not recorded"
    start = evaluation.get("start_index") or 0
    end = evaluation.get("end_index")
    end = sys.maxsize if end is None else end
    parts = []
    if end < sys.maxsize:
        parts.append(f"{end - start} examples" + (f" from #{start}" if start else ""))
    elif start:
        parts.append(f"examples from #{start} on")
    if evaluation.get("max_new_tokens") is not None:
        parts.append(f"{evaluation['max_new_tokens']} new tokens")
    return ", ".join(parts) or None


def partial_grid(record: Mapping[str, Any]) -> str | None:
    """``selection over 1 of 2 grid points`` when the selection ran with missing points, ``alpaca_eval selected
    without 2 unscored points`` when finished points had no validation score (both only with ``--allow_missing``),
    else ``None``."""
    parts = []
    missing = record.get("missing_points") or []
    if missing:
        total = record.get("grid_points")
        if total is None and isinstance(record.get("config"), Mapping) and "points" in record["config"]:
            total = len(record["config"]["points"])
        parts.append(f"selection with {len(missing)} grid points missing" if total is None
                     else f"selection over {total - len(missing)} of {total} grid points")
    unscored = record.get("unscored_points") or {}
    parts += [f"{dataset} selected without {len(keys)} unscored points" for dataset, keys in unscored.items() if keys]
    return "; ".join(parts) or None


@dataclass(frozen=True)
class OurRun:
    """One source of our numbers for a Table 1 row.

    Attributes:
        source: where they come from (``inference``, ``grid <label>``).
        partial: ``None`` for a full run, else what makes it partial (``10 examples, 2 new tokens``).
        cells: ``{dataset: {part: score}}``; single models have the ``full`` part only (the whole test set).
    """

    source: str
    partial: str | None
    cells: dict[str, dict[str, float | str | None]] = field(default_factory=dict)


def single_model_results(results_dir: Path) -> dict[tuple[str, str | None], dict[str, dict[str, float | str]]]:
    """``{(model, partial): {dataset: {"full": score}}}`` from plain inference runs (drop rate 0)."""
    found: dict[tuple[str, str | None], dict[str, dict[str, float | str]]] = {}
    for path in sorted(results_dir.rglob("config.json")):
        config = _read(path).get("config", {})
        if (config.get("script") != "inference_llms_instruct_math_code" or config.get("weight_mask_rate") != 0.0
                or config.get("finetuned_model_name") not in SINGLE_MODELS
                or not path.with_name("metrics.json").is_file()):
            continue
        partial = partial_evaluation(config.get("evaluation"))
        cells = found.setdefault((SINGLE_MODELS[config["finetuned_model_name"]], partial), {})
        for dataset, metrics in _read(path.with_name("metrics.json")).items():
            if dataset in COLUMNS and isinstance(metrics, Mapping):
                cells[dataset] = {"full": _score(metrics)}
    return found


def current_final(path: Path, record: Mapping[str, Any]) -> dict[str, Any]:
    """The selection's ``final`` with each part scored since (an AlpacaEval win rate ingested into the selected
    point's ``final/<dataset>.json`` after ``selection.json`` was written) taken from that file."""
    final = {d: dict(parts) for d, parts in (record.get("final") or {}).items() if isinstance(parts, Mapping)}
    grid_dir = path.parents[2]  # <grid>/selections/<label>/selection.json
    for dataset, chosen in (record.get("selection") or {}).items():
        key = chosen.get("key") if isinstance(chosen, Mapping) else None
        file = grid_dir / "points" / key / "final" / f"{dataset}.json" if key else None
        if dataset not in final or file is None or not file.is_file():
            continue
        current = _read(file)
        for part in PARTS:
            if isinstance(current.get(part), Mapping) and percent_score(current[part]) is not None:
                final[dataset][part] = current[part]
    return final


def grid_results(results_dir: Path) -> list[tuple[tuple[str, str], OurRun]]:
    """``(table1_row, run)`` of every grid-search selection: validation, test and full scores per benchmark."""
    found = []
    for path in sorted(results_dir.rglob("selections/*/selection.json")):
        record = _read(path)
        cells = {dataset: {part: _score(final.get(part)) for part in PARTS}
                 for dataset, final in current_final(path, record).items()}
        config = record.get("config")
        evaluation = config.get("evaluation") if isinstance(config, Mapping) else None
        partial = "; ".join(p for p in (partial_evaluation(evaluation), partial_grid(record)) if p) or None
        row = tuple(record["table1_row"]) if record.get("table1_row") else ("(not a Table 1 row)", record["label"])
        source = f"grid {record['label']}" + ("" if cells else " (nothing evaluated)")
        found.append((row, OurRun(source, partial, cells)))
    return found


def _text(value: float | str | None) -> str:
    return "–" if value is None else (f"{value:.2f}" if isinstance(value, float) else value)


def _ours(parts: Mapping[str, float | str | None] | None) -> str:
    """``65.00`` (a single model's full set), ``val 90.00 · test 45.00 · full 50.00`` (a grid selection), ``files``
    (every part scored outside the repository)."""
    if not parts:
        return "–"
    if set(parts) == {"full"} or all(parts.get(p) == NOT_SCORED for p in PARTS):
        return _text(parts["full"])
    return " · ".join(f"{label} {_text(parts.get(part))}" for part, label in PARTS.items())


def _difference(parts: Mapping[str, Any] | None, paper: PaperCell | None, partial: bool) -> float | None:
    full = (parts or {}).get("full")
    return full - paper.value if isinstance(full, float) and paper is not None and not partial else None


def _cell(parts: Mapping[str, float | str | None] | None, paper: PaperCell | None, partial: bool) -> str:
    text = _ours(parts)
    if paper is None:
        return f"{text} / –"
    text += f" / {paper.value:.2f}{'' if paper.certain else '?'}"
    difference = _difference(parts, paper, partial)
    return text + (f" ({difference:+.2f})" if difference is not None else "")


def side_by_side(
    results_dir: str | Path, show_partial: bool = False
) -> tuple[tuple[list[str], list[list[Any]]], tuple[list[str], list]]:
    """Table 1 rows with our values next to the paper's: ``(wide table for markdown, long table for CSV)``.

    A partial run (see the module docstring) is a row marked ``[partial: ...]``; its scores are shown only with
    ``show_partial``.
    """
    results_dir = Path(results_dir)
    sources: dict[tuple[str, str], list[OurRun]] = {key: [] for key in PAPER_TABLE1}
    for (model, partial), cells in single_model_results(results_dir).items():
        sources.setdefault((model, "—"), []).append(OurRun("inference", partial, cells))
    for row, run in grid_results(results_dir):
        sources.setdefault(row, []).append(run)
    wide, long = [], []
    for (models, method), found in sources.items():
        paper = PAPER_TABLE1.get((models, method), {})
        for run in found or [OurRun("not run", None)]:
            source, cells, evaluation = run.source, run.cells, "full" if run.source != "not run" else ""
            if run.partial is not None:
                evaluation = f"partial: {run.partial}"
                if show_partial:
                    source += f" [{evaluation}]"
                else:
                    source += f" [{evaluation}; not shown, pass --show_partial]"
                    cells = {}
            partial = run.partial is not None
            wide.append([models, method, source, *[_cell(cells.get(d), paper.get(d), partial) for d in COLUMNS]])
            for dataset, label in COLUMNS.items():
                ours, reference = cells.get(dataset) or {}, paper.get(dataset)
                if not ours and reference is None:
                    continue
                cited = f"{reference.source}{'' if reference.certain else ' ?'}" if reference else ""
                long.append([models, method, source, evaluation, label, ours.get("full"), ours.get("validation"),
                             ours.get("test"), reference.value if reference else None,
                             _difference(ours, reference, partial), cited])
    header = ["models", "method", "ours from", *COLUMNS.values()]
    long_header = ["models", "method", "ours from", "evaluation", "benchmark", "ours", "ours validation",
                   "ours test", "paper", "difference", "paper source"]
    return (header, wide), (long_header, long)


TITLE = ("## Table 1 side by side (ours / paper (ours - paper), x100; ? = one secondary source)\n\n"
         "Grid selections: val · test · full = the selected setting's score on the 10 % validation sample it was "
         "selected on, on the other 90 % (test) and on the full set (what the paper reports; the difference is the "
         "full set's). Partial runs (fewer examples or new tokens than the paper's, or a selection over part of the "
         "grid) are marked [partial: ...]; their scores are shown only with --show_partial, without a difference."
         "\n\n")


def write_side_by_side(results_dir: str | Path, output_dir: str | Path, show_partial: bool = False) -> str:
    """``table1.md`` and ``table1.csv`` in ``output_dir``; returns the markdown."""
    wide, long = side_by_side(results_dir, show_partial=show_partial)
    markdown = TITLE + markdown_table(wide)
    atomic_write_text(Path(output_dir) / "table1.md", markdown)
    atomic_write_text(Path(output_dir) / "table1.csv", csv_text(long))
    return markdown
