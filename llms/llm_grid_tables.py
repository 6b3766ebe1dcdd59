"""Tables of a grid search: every point's validation score per benchmark, and the selected settings.

Scores are the paper's metric x100 (GSM8K / MATH accuracy, HumanEval / MBPP pass@1, AlpacaEval win rate from
``external_scores``); ``files`` = generated but scored outside the repository; empty = not finished.
Written as markdown, CSV and JSON into the selection folder (``llms.llm_grid_search``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.run_dir import atomic_write_json, atomic_write_text
from llms.llm_grid import GridPoint

Table = tuple[list[str], list[list[Any]]]
NOT_SCORED = "files"


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


def primary_score(metrics: Mapping[str, Any]) -> float | None:
    """The paper's metric x100 (GSM8K / MATH accuracy, code pass@1), ``None`` when scored externally."""
    for key in ("accuracy", "pass@1"):
        if isinstance(metrics.get(key), (int, float)):
            return float(metrics[key]) * 100
    return None


def _hyperparameters(point: GridPoint) -> list[Any]:
    retain = None if point.param_value_mask_rate is None else round(1 - point.param_value_mask_rate, 6)
    values = (point.scaling_coefficient, point.weight_mask_rate, retain)
    return [point.method, *("" if v is None else str(v) for v in values)]  # as given, not rounded to 2 places


def grid_table(
    points: Sequence[GridPoint], datasets: Sequence[str], scores: Mapping[str, Mapping[GridPoint, float | None]],
    finished: Mapping[GridPoint, Any], selection: Mapping[str, Mapping[str, Any]],
) -> Table:
    """One row per grid point: hyperparameters, status, validation score per benchmark, benchmarks it won."""
    rows = []
    for point in points:
        cells = []
        for dataset in datasets:
            score = scores.get(dataset, {}).get(point)
            cells.append(score if score is not None else (NOT_SCORED if point in finished else None))
        won = [d for d, s in selection.items() if s["point"] == point and s["selected_by"] == "validation grid"]
        rows.append([*_hyperparameters(point), "finished" if point in finished else "missing", *cells,
                     " ".join(won)])
    return ["method", "λ", "p", "retain", "status", *datasets, "selected for"], rows


def selection_table(selection: Mapping[str, Mapping[str, Any]], final: Mapping[str, Mapping[str, Any]]) -> Table:
    """One row per benchmark: the selected setting, who selected it, and its scores on each part."""
    rows = []
    for dataset, chosen in selection.items():
        scores = []
        for part in ("validation", "test", "full"):
            metrics = final.get(dataset, {}).get(part)
            value = None if metrics is None else primary_score(metrics)
            scores.append(value if value is not None or metrics is None else NOT_SCORED)
        counts = [len(final[dataset][p]["ids"]) if dataset in final else None for p in ("validation", "test")]
        rows.append([dataset, chosen["point"].describe(), chosen["selected_by"], *scores, *counts])
    return ["benchmark", "setting", "selected by", "validation", "test", "full", "n validation", "n test"], rows


def write_tables(folder: Path, grid: Table, selected: Table, record: Mapping[str, Any]) -> str:
    """``grid.md`` (both tables), ``grid.csv``, ``selection.csv``, ``selection.json``; returns the markdown."""
    missing = record.get("missing_points", [])
    note = f"\nMissing points ({len(missing)}): {', '.join(missing)}\n" if missing else ""
    markdown = (f"## Validation grid ({record['label']})\n\n{markdown_table(grid)}{note}\n"
                f"## Selected settings\n\n{markdown_table(selected)}")
    atomic_write_text(folder / "grid.md", markdown)
    atomic_write_text(folder / "grid.csv", csv_text(grid))
    atomic_write_text(folder / "selection.csv", csv_text(selected))
    atomic_write_json(folder / "selection.json", dict(record))
    return markdown
