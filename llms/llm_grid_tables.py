"""Tables of a grid search: every point's validation score per benchmark, and the selected settings.

Scores are the paper's metric x100 (GSM8K / MATH accuracy, HumanEval / MBPP pass@1; the AlpacaEval win rate in
percent, ingested by ``evaluate_generations.py --dataset_name alpaca_eval``: validation from ``external_scores``,
the selected point's parts from its ``final/alpaca_eval.json``); ``files`` = generated but not scored yet (judged
outside the repository); empty = not finished. The selected
settings' table says how many grid points the selection saw (a partial grid only with ``--allow_missing``) and
which points tied for the best validation score (:data:`TIE_BREAK`).
Written as markdown, CSV and JSON into the selection folder (``llms.llm_grid_search``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.run_dir import atomic_write_json, atomic_write_text
from llms.llm_grid import PAPER_LABELS, column_label, column_value, describe_point, searched_settings
from model_merging_methods import Recipe

Table = tuple[list[str], list[list[Any]]]
NOT_SCORED = "files"
#: how a tie for the best validation score is broken (``common.selection.select_best``), stated in every selection
TIE_BREAK = "the earlier point in grid order wins"


def format_cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def markdown_table(table: Table) -> str:
    header, rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(format_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(table: Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table[0])
    writer.writerows(table[1])
    return buffer.getvalue()


def percent_score(metrics: Mapping[str, Any]) -> float | None:
    """An LLM benchmark's metric in percent: GSM8K / MATH accuracy and code pass@1 x100, an ingested AlpacaEval
    ``win_rate`` as it is (already percent, ``evaluation.alpaca_eval``); ``None`` while not scored."""
    for key in ("accuracy", "pass@1"):
        if isinstance(metrics.get(key), (int, float)) and not isinstance(metrics[key], bool):
            return float(metrics[key]) * 100
    if isinstance(metrics.get("win_rate"), (int, float)) and not isinstance(metrics["win_rate"], bool):
        return float(metrics["win_rate"])
    return None


def grid_table(
    points: Sequence[Recipe], datasets: Sequence[str], scores: Mapping[str, Mapping[Recipe, float | None]],
    finished: Mapping[Recipe, Any], selection: Mapping[str, Mapping[str, Any]],
) -> Table:
    """One row per grid point: method, one column per searched setting found in the points (λ, p, retain for the
    paper's), status, validation score per benchmark, benchmarks it won."""
    found = list(dict.fromkeys(name for point in points for name in searched_settings(point)))
    names = [*(n for n in PAPER_LABELS if n in found), *(n for n in found if n not in PAPER_LABELS)]
    rows = []
    for point in points:
        settings = searched_settings(point)
        values = ["" if n not in settings else str(column_value(n, settings[n])) for n in names]  # as given
        cells = []
        for dataset in datasets:
            score = scores.get(dataset, {}).get(point)
            cells.append(score if score is not None else (NOT_SCORED if point in finished else None))
        won = [d for d, s in selection.items() if s["point"] == point and s["selected_by"] == "validation grid"]
        rows.append([point.method_key, *values, "finished" if point in finished else "missing", *cells,
                     " ".join(won)])
    return ["method", *(column_label(n) for n in names), "status", *datasets, "selected for"], rows


def selection_table(
    selection: Mapping[str, Mapping[str, Any]], final: Mapping[str, Mapping[str, Any]],
    grid_points: tuple[int, int] | None = None,
) -> Table:
    """One row per benchmark: the selected setting, who selected it, its scores on each part, the grid it was
    selected from (``grid_points`` = (finished, all); ``partial grid`` when some were missing) and the points that
    tied with it for the best validation score (:data:`TIE_BREAK`)."""
    grid = ""
    if grid_points is not None:
        grid = f"{grid_points[0]} of {grid_points[1]}" + (" (partial grid)" if grid_points[0] < grid_points[1] else "")
    rows = []
    for dataset, chosen in selection.items():
        scores = []
        for part in ("validation", "test", "full"):
            metrics = final.get(dataset, {}).get(part)
            value = None if metrics is None else percent_score(metrics)
            scores.append(value if value is not None or metrics is None else NOT_SCORED)
        counts = [len(final[dataset][p]["ids"]) if dataset in final else None for p in ("validation", "test")]
        by_grid = chosen["selected_by"] == "validation grid"
        tied = "; ".join(describe_point(p) for p in chosen.get("tied", []))
        rows.append([dataset, describe_point(chosen["point"]), chosen["selected_by"], *scores, *counts,
                     grid if by_grid else "", tied])
    return ["benchmark", "setting", "selected by", "validation", "test", "full", "n validation", "n test",
            "grid points", f"tied ({TIE_BREAK})"], rows


def write_tables(folder: Path, grid: Table, selected: Table, record: Mapping[str, Any]) -> str:
    """``grid.md`` (both tables), ``grid.csv``, ``selection.csv``, ``selection.json``; returns the markdown."""
    missing = record.get("missing_points", [])
    note = ""
    if missing:
        note = (f"\n**Selection over a partial grid** (--allow_missing): {len(missing)} of "
                f"{record.get('grid_points', '?')} points not finished. Missing points ({len(missing)}): "
                f"{', '.join(missing)}\n")
    markdown = (f"## Validation grid ({record['label']})\n\n{markdown_table(grid)}{note}\n"
                f"## Selected settings\n\n{markdown_table(selected)}\n"
                f"Ties for the best validation score: {record.get('tie_break', TIE_BREAK)} "
                "(`common.selection.select_best`); the tied points are listed (selection.json: "
                "`selection.<benchmark>.tied`).\n")
    atomic_write_text(folder / "grid.md", markdown)
    atomic_write_text(folder / "grid.csv", csv_text(grid))
    atomic_write_text(folder / "selection.csv", csv_text(selected))
    atomic_write_json(folder / "selection.json", dict(record))
    return markdown
