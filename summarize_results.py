"""Turn a results tree (run folders with ``config.json`` + ``metrics.json``) into paper-style tables and plots.

Example:
    python summarize_results.py --results_dir results/quickstart

Writes into ``--output_dir`` (default ``<results_dir>/summary``): ``summary.md`` (every table, markdown),
one CSV per table and ``summary.json`` (full precision), ``dare_sweep_<variant>.png`` (test metric vs drop rate,
one line per task) and ``drop_rate_<task>.png`` (one line per variant), error bars = std over mask seeds. GLUE
runs get the fine-tuning table (with the majority-class score), the drop-rate sweep table, the pairwise merging
table (target task x method, without and with DARE) and DARE's relative change per method (see
``glue.glue_tables``), and with several fine-tuning seeds their spread (the sweeps' figures show the first seed);
runs of the three LLM scripts get one table (``llm.csv``: model or merge x AlpacaEval, GSM8K, MATH, HumanEval,
MBPP, see ``llms.results_tables``); runs of any other script are listed with their flattened top-level metrics.
``--paper_table1`` prints only the paper's Table 1 next to ours (``llms.paper_table1``: validation, test and
full-set scores of each grid selection; partial runs marked and, without ``--show_partial``, not shown).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.run_dir import atomic_write_json
from glue.glue_tables import (
    Stat,
    by_finetune_seed,
    dare_effect_seed_table,
    dare_effect_table,
    factorwise_contrast_table,
    finetune_seed_table,
    finetune_table,
    merge_table,
    plot_sweeps,
    sweep_contrast_table,
    sweep_seed_table,
    sweep_series,
    sweep_table,
    table_records,
)
from llms.paper_table1 import write_side_by_side
from llms.results_tables import is_llm_run, llm_table

logger = logging.getLogger(__name__)

Table = tuple[list[str], list[list[Any]]]


def load_runs(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every folder under ``results_dir`` holding both ``config.json`` and ``metrics.json``."""
    runs = []
    for config_path in sorted(Path(results_dir).rglob("config.json")):
        metrics_path = config_path.with_name("metrics.json")
        if not metrics_path.exists():
            continue
        record = json.loads(config_path.read_text(encoding="utf-8"))
        config = record.get("config", record)
        runs.append({"dir": config_path.parent, "config": config,
                     "metrics": json.loads(metrics_path.read_text(encoding="utf-8"))})
    return runs


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def other_table(runs: Sequence[dict]) -> Table:
    """Runs of other scripts: folder and every top-level numeric metric (nested one level, ``task/metric``)."""
    rows = []
    for run in runs:
        flat = {}
        for key, value in run["metrics"].items():
            if isinstance(value, (int, float)):
                flat[key] = value
            elif isinstance(value, Mapping):
                flat.update({f"{key}/{k}": v for k, v in value.items() if isinstance(v, (int, float))})
        rows.append([run["config"].get("script", "?"), str(run["dir"]), json.dumps(flat, sort_keys=True)])
    return ["script", "run", "metrics"], rows


def to_markdown(title: str, table: Table) -> str:
    header, rows = table
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, table: Table) -> None:
    """Full precision; a column holding seed statistics becomes ``<column> mean``, ``<column> std``, ``<column> n``."""
    header, rows = table
    stat_columns = {i for row in rows for i, v in enumerate(row) if isinstance(v, Stat)}
    out_header = [c for i, h in enumerate(header) for c in ([f"{h} mean", f"{h} std", f"{h} n"]
                                                            if i in stat_columns else [h])]

    def expand(i: int, v: Any) -> list[Any]:
        if i not in stat_columns:
            return [v]
        if isinstance(v, Stat):
            return [v.mean, v.std, len(v.values)]
        return [v, None if v is None else 0.0, 0 if v is None else 1]

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(out_header)
        writer.writerows([c for i, v in enumerate(row) for c in expand(i, v)] for row in rows)


def summarize(results_dir: str | Path, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Build every table, write ``summary.md``, the CSVs and the plots; return tables, markdown and paths."""
    runs = load_runs(results_dir)
    if not runs:
        raise FileNotFoundError(f"no run folders (config.json + metrics.json) under {results_dir}; run a script first")
    output_dir = Path(output_dir or Path(results_dir) / "summary")
    output_dir.mkdir(parents=True, exist_ok=True)
    by_script = defaultdict(list)
    for run in runs:
        by_script[run["config"].get("script", "other")].append(run)
    llm_runs = [r for rs in by_script.values() for r in rs if is_llm_run(r["config"])]
    by_script = {s: [r for r in rs if not is_llm_run(r["config"])] for s, rs in by_script.items()}
    peft = by_script.pop("peft_lora_glue", [])
    peft_sweeps = [r for r in peft if r["config"]["mode"] == "sweep"]
    # sweeps per fine-tuning seed; the sweep table and figures show the first seed, the seeds table all of them
    series_by_seed = {seed: sweep_series(rs) for seed, rs in
                      by_finetune_seed(by_script.pop("inference_plms_glue", []) + peft_sweeps).items()}
    first_seed = min(series_by_seed, default=0)
    series = series_by_seed.get(first_seed, {})
    seed_note = f", fine-tuning seed {first_seed}" if len(series_by_seed) > 1 else ""
    trained = by_script.pop("train_plms_glue", [])
    merges = by_script.pop("merge_plms_glue", []) + [r for r in peft if r["config"]["mode"] == "merge"]
    tables = {"finetune": ("Fine-tuned models (primary metric x100)", finetune_table(trained)),
              "finetune_seeds": ("Fine-tuning seeds (primary metric x100, mean ± std over the seeds)",
                                 finetune_seed_table(trained)),
              "dare_sweep": (f"Drop-rate sweep, test split (primary metric x100; mean ± std over mask "
                             f"seeds{seed_note})", sweep_table(series)),
              "sweep_seeds": ("Drop-rate sweep over fine-tuning seeds, test split (mean ± std over the fine-tuning "
                              "seeds of each one's mean over mask seeds; rates every seed swept)",
                              sweep_seed_table(series_by_seed)),
              "merging": ("Pairwise merging, test split (primary metric x100; +DARE: mean ± std over DARE seeds)",
                          merge_table(merges)),
              "dare_effect": ("What DARE changes in merging, over (pair, target) cells: the change in points with its "
                              "95 % bootstrap interval (pairs, fine-tuning seeds within them and DARE seeds "
                              "resampled), cells changed beyond 1e-9 (a cell's change is its mean over fine-tuning "
                              "seeds), the signed-rank test (Holm over methods; cells of one pair are not "
                              "independent), and the change in % where the plain score is at least 10 (each "
                              "fine-tuning seed's cell counted)",
                              dare_effect_table(merges)),
              "dare_effect_seeds": ("What DARE changes in merging, per fine-tuning seed (pairs and DARE seeds "
                                    "resampled)", dare_effect_seed_table(merges)),
              "factorwise_contrast": ("LoRA adapters: DARE on delta W (ours) against PEFT's factor-wise DARE with "
                                      "the same combination, over (pair, target) cells (pairs and seeds resampled)",
                                      factorwise_contrast_table(merges)),
              "sweep_contrast": ("DARE against the other drop variants at p = 0.9, 0.99, 0.995 and 0.999, over the "
                                 "tasks swept with both (tasks, fine-tuning seeds within them and mask seeds "
                                 "resampled; with 5 tasks the smallest two-sided p is 0.0625)",
                                 sweep_contrast_table(series, by_finetune_seed=series_by_seed)),
              "llm": ("LLMs (GSM8K / MATH accuracy, HumanEval / MBPP pass@1, x100; files = outputs for the "
                      "external evaluator only)", llm_table(llm_runs)),
              "other": ("Other runs", other_table([r for rs in by_script.values() for r in rs]))}
    tables = {k: v for k, v in tables.items() if v[1][1]}
    markdown = "\n".join(to_markdown(title, table) for title, table in tables.values())
    (output_dir / "summary.md").write_text(markdown, encoding="utf-8")
    for name, (_, table) in tables.items():
        write_csv(output_dir / f"{name}.csv", table)
    atomic_write_json(output_dir / "summary.json", {name: table_records(table) for name, (_, table) in tables.items()})
    plots = plot_sweeps(series, output_dir) if series else []
    return {"tables": {k: v[1] for k, v in tables.items()}, "markdown": markdown, "plots": plots,
            "output_dir": output_dir}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results_dir", default="results")
    parser.add_argument("--output_dir", default=None, help="default: <results_dir>/summary")
    parser.add_argument("--paper_table1", action="store_true",
                        help="only the paper's Table 1 next to ours (table1.md, table1.csv; llms/paper_table1.py); "
                             "grid selections show validation, test (the other 90 %%) and full-set scores")
    parser.add_argument("--show_partial", action="store_true",
                        help="with --paper_table1: also show the scores of partial runs (fewer examples or new "
                             "tokens than the paper's, or a selection over part of the grid), marked partial")
    args = parser.parse_args(argv)
    if args.show_partial and not args.paper_table1:
        parser.error("--show_partial applies to --paper_table1 only")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.paper_table1:
        markdown = write_side_by_side(args.results_dir, args.output_dir or Path(args.results_dir) / "summary",
                                      show_partial=args.show_partial)
        sys.stdout.write(markdown)
        return {"markdown": markdown}
    summary = summarize(args.results_dir, args.output_dir)
    sys.stdout.write(summary["markdown"])
    return summary


if __name__ == "__main__":
    main()
