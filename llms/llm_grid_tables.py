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
from llms.llm_grid import PAPER_LABELS, column_label, column_value, describe_point, searched_settings
from model_merging_methods import Recipe

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


def percent_score(metrics: Mapping[str, Any]) -> float | None:
    """An LLM benchmark's metric x100 (GSM8K / MATH accuracy, code pass@1), ``None`` when scored externally."""
    for key in ("accuracy", "pass@1"):
        if isinstance(metrics.get(key), (int, float)):
            return float(metrics[key]) * 100
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


def selection_table(selection: Mapping[str, Mapping[str, Any]], final: Mapping[str, Mapping[str, Any]]) -> Table:
    """One row per benchmark: the selected setting, who selected it, and its scores on each part."""
    rows = []
    for dataset, chosen in selection.items():
        scores = []
        for part in ("validation", "test", "full"):
            metrics = final.get(dataset, {}).get(part)
            value = None if metrics is None else percent_score(metrics)
            scores.append(value if value is not None or metrics is None else NOT_SCORED)
        counts = [len(final[dataset][p]["ids"]) if dataset in final else None for p in ("validation", "test")]
        rows.append([dataset, describe_point(chosen["point"]), chosen["selected_by"], *scores, *counts])
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
