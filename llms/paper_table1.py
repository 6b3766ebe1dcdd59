"""The paper's Table 1 (decoder LLMs) and our results next to it, for ``summarize_results.py --paper_table1``.

Paper numbers: arXiv 2311.03099 as recovered in the project's reference notes; **S** = the paper (secondary
notes of its TeX), **A#n** = the first author in MergeLM issue n; a number marked uncertain (``?`` in the table)
has one secondary source only. Ours: single models from ``inference_llms_instruct_math_code.py`` runs with
``--weight_mask_rate 0.0``, merges from the selections of ``grid_search_llms_instruct_math_code.py`` (the
full-set score of the selected setting, else its test-part score), matched to a row by the selection's
``table1_row``. Cells: ``ours / paper (ours - paper)``, x100; ``files`` = scored outside the repository.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.run_dir import atomic_write_text
from llms.llm_grid_tables import NOT_SCORED, csv_text, markdown_table, percent_score

COLUMNS = {"alpaca_eval": "AlpacaEval", "gsm8k": "GSM8K", "MATH": "MATH", "human_eval": "HumanEval", "mbpp": "MBPP"}
LM_MATH, ALL3 = "WizardLM + WizardMath", "WizardLM + WizardMath + code-alpaca"
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
    if metrics is None:
        return None
    score = percent_score(metrics)
    return NOT_SCORED if score is None else score


def single_model_results(results_dir: Path) -> dict[tuple[str, str], dict[str, float | str]]:
    """``{(model, "—" + slice note): {dataset: score}}`` from plain inference runs (drop rate 0)."""
    found: dict[tuple[str, str], dict[str, float | str]] = {}
    for path in sorted(results_dir.rglob("config.json")):
        config = _read(path).get("config", {})
        if (config.get("script") != "inference_llms_instruct_math_code" or config.get("weight_mask_rate") != 0.0
                or config.get("finetuned_model_name") not in SINGLE_MODELS
                or not path.with_name("metrics.json").is_file()):
            continue
        evaluation = config.get("evaluation", {})
        partial = evaluation.get("start_index", 0) or evaluation.get("end_index", sys.maxsize) < sys.maxsize
        source = "inference, part of the test set" if partial else "inference"
        cells = found.setdefault((SINGLE_MODELS[config["finetuned_model_name"]], source), {})
        for dataset, metrics in _read(path.with_name("metrics.json")).items():
            if dataset in COLUMNS and isinstance(metrics, Mapping):
                cells[dataset] = _score(metrics)
    return found


def grid_results(results_dir: Path) -> list[tuple[tuple[str, str], str, dict[str, float | str]]]:
    """``(table1_row, source, {dataset: score})`` of every grid-search selection (full set, else test part)."""
    found = []
    for path in sorted(results_dir.rglob("selections/*/selection.json")):
        record = _read(path)
        cells, parts = {}, set()
        for dataset, final in record.get("final", {}).items():
            part = "full" if final.get("full") is not None else "test"
            cells[dataset] = _score(final.get(part))
            parts.add(part)
        row = tuple(record["table1_row"]) if record.get("table1_row") else ("(not a Table 1 row)", record["label"])
        found.append((row, f"grid {record['label']} ({'/'.join(sorted(parts)) or 'nothing evaluated'})", cells))
    return found


def _cell(ours: float | str | None, paper: PaperCell | None) -> str:
    text = "–" if ours is None else (f"{ours:.2f}" if isinstance(ours, float) else ours)
    if paper is None:
        return f"{text} / –"
    text += f" / {paper.value:.2f}{'' if paper.certain else '?'}"
    return text + (f" ({ours - paper.value:+.2f})" if isinstance(ours, float) else "")


def side_by_side(results_dir: str | Path) -> tuple[tuple[list[str], list[list[Any]]], tuple[list[str], list]]:
    """Table 1 rows with our values next to the paper's: ``(wide table for markdown, long table for CSV)``."""
    results_dir = Path(results_dir)
    sources: dict[tuple[str, str], list[tuple[str, dict]]] = {key: [] for key in PAPER_TABLE1}
    for (model, source), cells in single_model_results(results_dir).items():
        sources.setdefault((model, "—"), []).append((source, cells))
    for row, source, cells in grid_results(results_dir):
        sources.setdefault(row, []).append((source, cells))
    wide, long = [], []
    for (models, method), found in sources.items():
        paper = PAPER_TABLE1.get((models, method), {})
        for source, cells in found or [("not run", {})]:
            wide.append([models, method, source, *[_cell(cells.get(d), paper.get(d)) for d in COLUMNS]])
            for dataset, label in COLUMNS.items():
                ours, reference = cells.get(dataset), paper.get(dataset)
                if ours is None and reference is None:
                    continue
                difference = ours - reference.value if isinstance(ours, float) and reference else None
                cited = f"{reference.source}{'' if reference.certain else ' ?'}" if reference else ""
                long.append([models, method, source, label, ours, reference.value if reference else None,
                             difference, cited])
    header = ["models", "method", "ours from", *COLUMNS.values()]
    long_header = ["models", "method", "ours from", "benchmark", "ours", "paper", "difference", "paper source"]
    return (header, wide), (long_header, long)


def write_side_by_side(results_dir: str | Path, output_dir: str | Path) -> str:
    """``table1.md`` and ``table1.csv`` in ``output_dir``; returns the markdown."""
    wide, long = side_by_side(results_dir)
    markdown = ("## Table 1 side by side (ours / paper (ours - paper), x100; ? = one secondary source)\n\n"
                + markdown_table(wide))
    atomic_write_text(Path(output_dir) / "table1.md", markdown)
    atomic_write_text(Path(output_dir) / "table1.csv", csv_text(long))
    return markdown
