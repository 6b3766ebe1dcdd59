"""Turn a results tree (run folders with ``config.json`` + ``metrics.json``) into paper-style tables and plots.

Example:
    python summarize_results.py --results_dir results/quickstart

Writes into ``--output_dir`` (default ``<results_dir>/summary``): ``summary.md`` (every table, markdown),
one CSV per table, and ``dare_sweep_<settings>.png`` (test metric vs drop rate, one line per task). GLUE runs get
the fine-tuning table, the drop-rate sweep table and the pairwise merging table (target task x method, without
and with DARE); runs of the three LLM scripts get one table (``llm.csv``: model or merge x AlpacaEval, GSM8K,
MATH, HumanEval, MBPP, see ``utils.results_tables``); runs of any other script are listed with their flattened
top-level metrics.
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

from utils.paper_table1 import write_side_by_side
from utils.results_tables import is_llm_run, llm_table

logger = logging.getLogger(__name__)

MERGE_METHOD_ORDER = ("average_merging", "task_arithmetic", "fisher_merging", "regmean_merging", "ties_merging")
PRIMARY = {"cola": "matthews_correlation", "sst2": "accuracy", "mrpc": "averaged_scores", "stsb": "averaged_scores",
           "qqp": "averaged_scores", "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy"}
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


def _primary(task: str, metrics: Mapping[str, Any] | None) -> float | None:
    if not metrics:
        return None
    key = PRIMARY.get(task, "accuracy")
    value = metrics.get(key)
    return float(value) * 100 if isinstance(value, (int, float)) else None


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def finetune_table(runs: Sequence[dict]) -> Table:
    """One row per fine-tuning run: task, model, run folder, best epoch, validation and test primary metric."""
    rows = []
    for run in runs:
        config, metrics = run["config"], run["metrics"]
        for task in [t for t in (config.get("auxiliary_dataset_name"), config["dataset_name"]) if t in metrics]:
            rows.append([task, Path(str(config["language_model_name"])).name, run["dir"].name,
                         metrics.get("best_epoch"), _primary(task, metrics[task].get("validation")),
                         _primary(task, metrics[task].get("test"))])
    return ["task", "model", "run", "best epoch", "validation", "test"], rows


def _variant(config: Mapping[str, Any]) -> str:
    dare = config.get("dare", {})
    name = "DARE" if dare.get("use_weight_rescale") else "DropOnly"
    if dare.get("mask_strategy") == "magnitude":
        name += "-magnitude"
    if dare.get("weight_format") == "finetuned_weight":
        name += "-finetuned_weight"
    if config.get("max_eval_samples") is not None:
        name += f"-n{config['max_eval_samples']}"  # sweeps on different test caps are not comparable
    return name


def sweep_series(runs: Sequence[dict]) -> dict[tuple[str, str], dict[float, float | None]]:
    """``{(task, variant): {rate: test primary metric}}``; rate 0 (no drop) is shared by every variant."""
    series: dict[tuple[str, str], dict[float, float | None]] = defaultdict(dict)
    zero: dict[tuple[str, Any], float | None] = {}
    caps: dict[tuple[str, str], Any] = {}
    for run in runs:
        config, task = run["config"], run["config"]["dataset_name"]
        rate, score = float(config["weight_mask_rate"]), _primary(task, run["metrics"][task].get("test"))
        cap = config.get("max_eval_samples")
        if rate == 0.0:
            zero[(task, cap)] = score
        else:
            series[(task, _variant(config))][rate] = score
            caps[(task, _variant(config))] = cap
    for (task, variant), points in series.items():
        if (task, caps[(task, variant)]) in zero:
            points[0.0] = zero[(task, caps[(task, variant)])]
    for (task, cap), score in zero.items():
        if not any(t == task and c == cap for (t, _), c in caps.items()):
            series[(task, "DARE" + (f"-n{cap}" if cap is not None else ""))][0.0] = score
    return dict(series)


def sweep_table(series: Mapping[tuple[str, str], Mapping[float, float | None]]) -> Table:
    rates = sorted({r for points in series.values() for r in points})
    rows = [[task, variant, *[points.get(r) for r in rates]] for (task, variant), points in sorted(series.items())]
    return ["task", "variant", *[f"p={r}" for r in rates]], rows


def merge_table(runs: Sequence[dict]) -> Table:
    """Rows ``pair -> target``; per method two columns: plain and with DARE (test primary metric)."""
    cells: dict[tuple[str, str], dict[str, float | None]] = defaultdict(dict)
    for run in runs:
        config, metrics = run["config"], run["metrics"]
        dare = config["merging_method_name"] == "mask_merging"
        column = config["applied_method"] + (" +DARE" if dare else "")
        pair = "+".join(config["dataset_pair"])
        for task, result in metrics.items():
            cells[(pair, task)][column] = _primary(task, result.get("test"))
    columns = [c for m in MERGE_METHOD_ORDER for c in (m, f"{m} +DARE")]
    columns = [c for c in columns if any(c in row for row in cells.values())]
    rows = [[pair, task, *[row.get(c) for c in columns]] for (pair, task), row in sorted(cells.items())]
    return ["pair", "target task", *columns], rows


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
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(table[0])
        writer.writerows(table[1])


def plot_sweeps(series: Mapping[tuple[str, str], Mapping[float, float | None]], output_dir: Path) -> list[Path]:
    """One PNG per drop variant: test primary metric (x100) vs drop rate, one line per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for variant in sorted({v for _, v in series}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for (task, v), points in sorted(series.items()):
            rates = [r for r in sorted(points) if points[r] is not None]
            if v == variant and rates:
                ax.plot(rates, [points[r] for r in rates], marker="o", label=task)
        ax.set(xlabel="drop rate p", ylabel="test metric (x100)", title=f"{variant}: performance vs drop rate")
        ax.grid(alpha=0.3)
        ax.legend()
        path = output_dir / f"dare_sweep_{variant}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


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
    series = sweep_series(by_script.pop("inference_plms_glue", []))
    finetuned = finetune_table(by_script.pop("train_plms_glue", []))
    tables = {"finetune": ("Fine-tuned models (primary metric x100)", finetuned),
              "dare_sweep": ("Drop-rate sweep, test split (primary metric x100)", sweep_table(series)),
              "merging": ("Pairwise merging, test split (primary metric x100)",
                          merge_table(by_script.pop("merge_plms_glue", []))),
              "llm": ("LLMs (GSM8K / MATH accuracy, HumanEval / MBPP pass@1, x100; files = outputs for the "
                      "external evaluator only)", llm_table(llm_runs)),
              "other": ("Other runs", other_table([r for rs in by_script.values() for r in rs]))}
    tables = {k: v for k, v in tables.items() if v[1][1]}
    markdown = "\n".join(to_markdown(title, table) for title, table in tables.values())
    (output_dir / "summary.md").write_text(markdown, encoding="utf-8")
    for name, (_, table) in tables.items():
        write_csv(output_dir / f"{name}.csv", table)
    plots = plot_sweeps(series, output_dir) if series else []
    return {"tables": {k: v[1] for k, v in tables.items()}, "markdown": markdown, "plots": plots,
            "output_dir": output_dir}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results_dir", default="results")
    parser.add_argument("--output_dir", default=None, help="default: <results_dir>/summary")
    parser.add_argument("--paper_table1", action="store_true",
                        help="only the paper's Table 1 next to ours (table1.md, table1.csv; utils/paper_table1.py)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.paper_table1:
        markdown = write_side_by_side(args.results_dir, args.output_dir or Path(args.results_dir) / "summary")
        sys.stdout.write(markdown)
        return {"markdown": markdown}
    summary = summarize(args.results_dir, args.output_dir)
    sys.stdout.write(summary["markdown"])
    return summary


if __name__ == "__main__":
    main()
