"""Paper-shaped tables and figures of the GLUE scripts' runs, for ``summarize_results.py``.

* fine-tuning: one row per run, validation and test primary metric next to the majority-class score on test;
* drop-rate sweeps: ``(task, variant) x rate``, mean +- std over the mask seeds (DARE, DropOnly, magnitude
  pruning, masking fine-tuned weights); one PNG per task (the paper's comparison, error bars = std) and one per
  variant;
* pairwise merging: ``pair -> target task x method``, without and with DARE (mean +- std over DARE seeds), Fisher
  once per estimator, and the relative change DARE brings per method next to the paper's stated averages;
* fine-tuning seeds: with several (``train_plms_glue.py --seed``, picked by ``--train_seed``), the fine-tuned
  scores and the sweeps over them, a merge row per seed, and the effects resampled over them too.

Scores are primary metrics x100. A cell with several seeds is a :class:`Stat`; a single run stays a float.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glue.effect_statistics import PairedCell, holm, paired_effect

MERGE_METHOD_ORDER = ("average_merging", "task_arithmetic", "fisher_merging", "fisher_merging (exact)",
                      "regmean_merging", "ties_merging")
# PEFT's factor-wise LoRA merges (peft_lora_glue.py): the plain combination and its DARE counterpart
PEFT_MERGE_PAIRS = (("PEFT linear", "PEFT dare_linear"), ("PEFT ties", "PEFT dare_ties"))
# (row name, plain column, DARE column) of the DARE-effect tables: each method, then PEFT's DARE combinations
DARE_COMPARISONS = (*[(m, m, f"{m} +DARE") for m in MERGE_METHOD_ORDER], *[(d, p, d) for p, d in PEFT_MERGE_PAIRS])
# DARE on ΔW (ours) against PEFT's factor-wise DARE, with the same base combination
FACTORWISE_CONTRASTS = (("task_arithmetic +DARE", "PEFT dare_linear"), ("ties_merging +DARE", "PEFT dare_ties"))
PEFT_SCRIPT = "peft_lora_glue"
# Average relative change of the merged models' scores brought by DARE, encoder pairs (the paper, Section 4.3).
PAPER_DARE_RELATIVE_CHANGE = {"average_merging": 0.58, "task_arithmetic": 0.36, "fisher_merging": 0.37,
                              "regmean_merging": -0.03, "ties_merging": 0.84}
Table = tuple[list[str], list[list[Any]]]


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation of one cell's runs (seeds)."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}"


def cell(values: Sequence[float | None]) -> float | Stat | None:
    """A float for one run, a :class:`Stat` for several, None for none (runs scored None are left out)."""
    kept = tuple(v for v in values if v is not None)
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else Stat(kept)


def mean_of(value: float | Stat | None) -> float | None:
    return value.mean if isinstance(value, Stat) else value


def primary(task: str, metrics: Mapping[str, Any] | None) -> float | None:
    """The task's primary metric x100 (None when missing or NaN)."""
    from glue.glue_data import GLUE_TASKS

    if not metrics:
        return None
    value = metrics.get(GLUE_TASKS[task].primary_metric if task in GLUE_TASKS else "accuracy")
    if not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value) * 100


def majority_class_score(task: str, glue_dir: str | None) -> float | None:
    """Test primary metric x100 of predicting the train part's most frequent label (STS-B: 0, no correlation);
    None without a local GLUE copy."""
    import numpy as np

    from glue.glue_data import load_raw_splits, resolve_glue_dir, split_train_validation
    from glue.glue_metrics import compute_glue_metrics

    try:
        if resolve_glue_dir(glue_dir) is None:
            return None  # never downloads: only a local GLUE copy is read
        raw = load_raw_splits(task, glue_dir)
    except (OSError, ValueError):
        return None
    train, _ = split_train_validation(raw["train"])
    labels = np.array([r["label"] for r in raw["test"]])
    if task == "stsb":
        return 0.0  # a constant prediction has no correlation with the gold scores
    values, counts = np.unique([r["label"] for r in train], return_counts=True)
    return primary(task, compute_glue_metrics(task, np.full(len(labels), values[counts.argmax()]), labels))


def finetune_seed(config: Mapping[str, Any]) -> int:
    """The fine-tuning seed behind an inference or merge run: its ``train_seed``, else the ``seed=N`` of the
    fine-tuning run folder its ``checkpoint`` is in (0 for a checkpoint from anywhere else)."""
    if config.get("train_seed") is not None:
        return int(config["train_seed"])
    checkpoint = config.get("checkpoint")
    if isinstance(checkpoint, str):
        match = re.search(r"(?:^|,)seed=(\d+)(?:,|$)", Path(checkpoint).parent.name)
        if match:
            return int(match.group(1))
    return 0


def by_finetune_seed(runs: Sequence[dict]) -> dict[int, list[dict]]:
    """``{fine-tuning seed: runs}``, seeds ascending."""
    groups: dict[int, list[dict]] = defaultdict(list)
    for run in runs:
        groups[finetune_seed(run["config"])].append(run)
    return dict(sorted(groups.items()))


def finetune_seed_table(runs: Sequence[dict]) -> Table:
    """Tasks fine-tuned with several seeds (single-task runs alike but for the seed): validation and test primary
    metric, mean ± std over the seeds."""
    scores: dict[tuple[str, str], dict[int, tuple]] = defaultdict(dict)
    for run in runs:
        config, metrics = run["config"], run["metrics"]
        if config.get("multitask_training") or config["dataset_name"] not in metrics:
            continue
        task = config["dataset_name"]
        setting = re.sub(r"(^|,)seed=\d+(,|$)", r"\1seed=*\2", run["dir"].name)
        result = metrics[task]
        scores[(task, setting)][config.get("seed", 0)] = (primary(task, result.get("validation")),
                                                         primary(task, result.get("test")))
    rows = [[task, setting, ", ".join(map(str, sorted(seeds))), cell([v for v, _ in seeds.values()]),
             cell([t for _, t in seeds.values()])]
            for (task, setting), seeds in sorted(scores.items()) if len(seeds) > 1]
    return ["task", "run", "fine-tuning seeds", "validation", "test"], rows


def finetune_table(runs: Sequence[dict]) -> Table:
    """One row per fine-tuning run: task, model, run, best epoch, validation, test, majority class on test."""
    rows, baselines = [], {}
    for run in runs:
        config, metrics = run["config"], run["metrics"]
        for task in [t for t in (config.get("auxiliary_dataset_name"), config["dataset_name"]) if t in metrics]:
            key = (task, config.get("glue_dir"))
            if key not in baselines:
                baselines[key] = majority_class_score(task, config.get("glue_dir"))
            rows.append([task, Path(str(config["language_model_name"])).name, run["dir"].name,
                         metrics.get("best_epoch"), primary(task, metrics[task].get("validation")),
                         primary(task, metrics[task].get("test")), baselines[key]])
    return ["task", "model", "run", "best epoch", "validation", "test", "majority class (test)"], rows


def sweep_variant(config: Mapping[str, Any]) -> str:
    """``DARE``, ``DropOnly``, ``DropOnly-magnitude``, ``DARE-finetuned_weight``, ``DAREx-last_layer``,
    ``DARE-rescale_20``, ... (+ ``-n<cap>``)."""
    dare = config.get("dare", {})
    name = "DARE" if dare.get("use_weight_rescale") else "DropOnly"
    if config.get("script") == PEFT_SCRIPT:
        name = f"PEFT {config['combination_type']} (factors)"  # PEFT's DARE on A and B, not on ΔW
    elif config.get("rescale_search"):
        name = f"DAREx-{config['rescale_search']}"  # a rescale chosen per point (search_rescale_factor)
    elif dare.get("rescale_factor") is not None:
        name += f"-rescale_{dare['rescale_factor']:g}"
    if dare.get("mask_strategy") == "magnitude":
        name += "-magnitude"
    if dare.get("weight_format") == "finetuned_weight":
        name += "-finetuned_weight"
    if config.get("max_eval_samples") is not None:
        name += f"-n{config['max_eval_samples']}"  # sweeps on different test caps are not comparable
    return name


def sweep_series(runs: Sequence[dict]) -> dict[tuple[str, str], dict[float, list[float | None]]]:
    """``{(task, variant): {rate: [test primary metric per seed]}}``; rate 0 (no drop) is shared by every variant
    of the same test cap (one value: it does not depend on the seed)."""
    series: dict[tuple[str, str], dict[float, list[float | None]]] = defaultdict(lambda: defaultdict(list))
    zero: dict[tuple[str, Any], float | None] = {}
    caps: dict[tuple[str, str], Any] = {}
    for run in runs:
        config, task = run["config"], run["config"]["dataset_name"]
        rate, score = float(config["weight_mask_rate"]), primary(task, run["metrics"][task].get("test"))
        cap = config.get("max_eval_samples")
        if rate == 0.0:
            zero[(task, cap)] = score
        else:
            series[(task, sweep_variant(config))][rate].append(score)
            caps[(task, sweep_variant(config))] = cap
    for (task, variant), points in series.items():
        if (task, caps[(task, variant)]) in zero:
            points[0.0] = [zero[(task, caps[(task, variant)])]]
    for (task, cap), score in zero.items():
        if not any(t == task and c == cap for (t, _), c in caps.items()):
            series[(task, "DARE" + (f"-n{cap}" if cap is not None else ""))][0.0] = [score]
    return {key: {rate: points[rate] for rate in sorted(points)} for key, points in series.items()}


def sweep_table(series: Mapping[tuple[str, str], Mapping[float, Sequence[float | None]]]) -> Table:
    rates = sorted({r for points in series.values() for r in points})
    rows = [[task, variant, *[cell(points.get(r, [])) for r in rates]]
            for (task, variant), points in sorted(series.items())]
    return ["task", "variant", *[f"p={r}" for r in rates]], rows


def sweep_seed_table(series_by_seed: Mapping[int, Mapping[tuple[str, str], Mapping[float, Sequence[float | None]]]]
                     ) -> Table:
    """The sweeps of several fine-tuning seeds: ``(task, variant) x rate``, mean ± std over the fine-tuning seeds
    of each seed's mean over its mask seeds, at the rates every seed swept (none with a single seed)."""
    if len(series_by_seed) < 2:
        return ["task", "variant"], []
    keys = sorted({k for series in series_by_seed.values() for k in series})
    table: dict[tuple[str, str], dict[float, float | Stat | None]] = {}
    for key in keys:
        runs = [series.get(key, {}) for series in series_by_seed.values()]
        rates = sorted(set.intersection(*[set(points) for points in runs]))
        if rates:
            table[key] = {r: cell([mean_of(cell(points[r])) for points in runs]) for r in rates}
    rates = sorted({r for row in table.values() for r in row})
    rows = [[task, variant, *[row.get(r) for r in rates]] for (task, variant), row in table.items()]
    return ["task", "variant", *[f"p={r}" for r in rates]], rows


def merge_column(config: Mapping[str, Any]) -> str:
    """``task_arithmetic``, ``ties_merging +DARE``, ``fisher_merging (exact) +DARE``, ``PEFT dare_linear``..."""
    if config.get("script") == PEFT_SCRIPT:
        return f"PEFT {config['combination_type']}"
    column = config["applied_method"]
    if column == "fisher_merging" and config.get("fisher_estimator") == "exact":
        column += " (exact)"
    return column + (" +DARE" if config["merging_method_name"] == "mask_merging" else "")


def merge_cells(runs: Sequence[dict]) -> dict[tuple[str, str, int], dict[str, float | Stat | None]]:
    """``{(pair, target task, fine-tuning seed): {column: test score, or Stat over DARE seeds}}``."""
    values: dict[tuple[str, str, int], dict[str, list[float | None]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        config, metrics = run["config"], run["metrics"]
        pair = "+".join(config["dataset_pair"])
        for task, result in metrics.items():
            values[(pair, task, finetune_seed(config))][merge_column(config)].append(primary(task, result.get("test")))
    return {key: {column: cell(v) for column, v in row.items()} for key, row in values.items()}


def merge_table(runs: Sequence[dict]) -> Table:
    """Rows ``pair -> target`` (and fine-tuning seed, when there are several); per method two columns: plain and
    with DARE (test primary metric)."""
    cells = merge_cells(runs)
    columns = [*[c for m in MERGE_METHOD_ORDER for c in (m, f"{m} +DARE")], *[c for p in PEFT_MERGE_PAIRS for c in p]]
    columns = [c for c in columns if any(c in row for row in cells.values())]
    if len({seed for _, _, seed in cells}) > 1:
        rows = [[pair, task, seed, *[row.get(c) for c in columns]]
                for (pair, task, seed), row in sorted(cells.items())]
        return ["pair", "target task", "fine-tuning seed", *columns], rows
    rows = [[pair, task, *[row.get(c) for c in columns]] for (pair, task, _), row in sorted(cells.items())]
    return ["pair", "target task", *columns], rows


# A relative change is only meaningful against a score clearly away from 0: CoLA's MCC of a merged model can be
# 0.9 points, where +2 points is +220 %. Cells whose plain score is below this (x100 scale) are left out of the
# relative mean (and counted in the change in points).
RELATIVE_CHANGE_MIN_PLAIN = 10.0


def _seed_values(value: float | Stat) -> tuple[float, ...]:
    return value.values if isinstance(value, Stat) else (value,)


def _paired_cells(cells, reference_column: str, treated_column: str) -> tuple[list[PairedCell], list[float]]:
    """The cells with both columns, once per fine-tuning seed: ``PairedCell(pair, mean reference, treated seeds,
    target, fine-tuning seed)``, and the relative changes (%) of those whose reference is at least
    ``RELATIVE_CHANGE_MIN_PLAIN``."""
    paired, relative = [], []
    for (pair, target, seed), row in sorted(cells.items()):
        reference, treated = row.get(reference_column), row.get(treated_column)
        if mean_of(reference) is None or treated is None:
            continue
        paired.append(PairedCell(pair, mean_of(reference), _seed_values(treated), target, seed))
        if mean_of(reference) >= RELATIVE_CHANGE_MIN_PLAIN:
            relative.append(paired[-1].change / mean_of(reference) * 100)
    return paired, relative


def dare_effect_table(runs: Sequence[dict]) -> Table:
    """Per method, over the (pair, target) cells with both a plain and a DARE score (DARE: the mean over seeds):
    the mean change in points with its 95 % bootstrap interval (pairs resampled, the unit that shares a merge,
    and DARE seeds within them), how many cells DARE raised / lowered by more than ``TIE_TOLERANCE``, the
    Wilcoxon signed-rank p-value over the cells with Holm's correction over the methods, and the mean relative
    change ``(DARE - plain) / plain`` in % over the cells whose plain score is at least
    ``RELATIVE_CHANGE_MIN_PLAIN``, next to the paper's average (stated for MergeLM's Fisher estimator only).
    PEFT's factor-wise merges, when present, get a row each: ``dare_linear`` against ``linear``, ``dare_ties``
    against ``ties``. With several fine-tuning seeds a cell's change is its mean over them (they are resampled
    within each pair, DARE seeds within each of them), and the relative change counts each seed's cell."""
    cells = merge_cells(runs)
    effects, relatives, seeds = {}, {}, {}
    for method, plain_column, dare_column in DARE_COMPARISONS:
        paired, relative = _paired_cells(cells, plain_column, dare_column)
        if paired:
            effects[method], relatives[method] = paired_effect(paired), relative
            seeds[method] = len({c.replicate for c in paired})
    adjusted = holm({m: e.p_value for m, e in effects.items()})
    rows = [[m, e.cells, e.mean, e.low, e.high, e.higher, e.lower, e.p_value, adjusted[m], len(relatives[m]),
             statistics.fmean(relatives[m]) if relatives[m] else None, PAPER_DARE_RELATIVE_CHANGE.get(m),
             seeds[m]] for m, e in effects.items()]
    return ["method", "cells", "mean change (points)", "95% CI low", "95% CI high", "DARE higher", "DARE lower",
            "Wilcoxon p", "Holm p", f"cells with plain >= {RELATIVE_CHANGE_MIN_PLAIN:g}",
            "mean relative change on those (%)", "paper (%)", "fine-tuning seeds"], rows


def dare_effect_seed_table(runs: Sequence[dict]) -> Table:
    """With several fine-tuning seeds, DARE's effect per method and per fine-tuning seed (how much the merge
    table moves with the fine-tuned models): cells, the mean over them of the plain and the DARE score (DARE:
    the mean over DARE seeds), the mean change with its 95 % bootstrap interval (pairs and DARE seeds
    resampled), cells higher / lower beyond ``TIE_TOLERANCE``. Empty with a single fine-tuning seed."""
    cells = merge_cells(runs)
    seeds = sorted({seed for _, _, seed in cells})
    rows = []
    if len(seeds) > 1:
        for method, plain_column, dare_column in DARE_COMPARISONS:
            for seed in seeds:
                paired, _ = _paired_cells({k: v for k, v in cells.items() if k[2] == seed}, plain_column,
                                          dare_column)
                if paired:
                    e = paired_effect(paired)
                    rows.append([method, seed, e.cells, statistics.fmean(c.reference for c in paired),
                                 statistics.fmean(statistics.fmean(c.treated) for c in paired), e.mean, e.low,
                                 e.high, e.higher, e.lower])
    return ["method", "fine-tuning seed", "cells", "plain mean", "DARE mean", "mean change (points)",
            "95% CI low", "95% CI high", "DARE higher", "DARE lower"], rows


def factorwise_contrast_table(runs: Sequence[dict]) -> Table:
    """DARE on ΔW (ours, with Task Arithmetic / TIES) against PEFT's factor-wise ``dare_linear`` / ``dare_ties``
    over the (pair, target) cells with both: ours minus PEFT's in points (means over their seeds), the 95 %
    bootstrap interval (pairs and our seeds resampled), cells higher / lower, Wilcoxon p with Holm over the rows."""
    cells = merge_cells(runs)
    effects = {}
    for ours, peft in FACTORWISE_CONTRASTS:
        paired, _ = _paired_cells(cells, peft, ours)
        if paired:
            effects[(ours, peft)] = paired_effect(paired)
    adjusted = holm({f"{o} - {p}": e.p_value for (o, p), e in effects.items()})
    rows = [[f"{o} - {p}", e.cells, e.mean, e.low, e.high, e.higher, e.lower, e.p_value, adjusted[f"{o} - {p}"]]
            for (o, p), e in effects.items()]
    return ["contrast", "cells", "mean difference (points)", "95% CI low", "95% CI high", "ours higher",
            "ours lower", "Wilcoxon p", "Holm p"], rows


SWEEP_CONTRAST_RATES = (0.9, 0.99, 0.995, 0.999)


def sweep_contrast_table(series: Mapping[tuple[str, str], Mapping[float, Sequence[float | None]]], *,
                         by_finetune_seed: Mapping[int, Mapping] | None = None) -> Table:
    """DARE against each other drop variant (DropOnly, magnitude pruning) at ``SWEEP_CONTRAST_RATES``, over the
    tasks swept with both: the mean difference in points (DARE's mean over seeds minus the other's), its 95 %
    bootstrap interval (tasks resampled, DARE seeds within them), the tasks where DARE is higher / lower, and the
    Wilcoxon p-value with Holm's correction over the rows (with 5 tasks the smallest two-sided p is 0.0625).
    ``by_finetune_seed`` (``{seed: series}``, replacing ``series``) adds the fine-tuning seeds: a task's
    difference is its mean over the seeds that swept both at that rate, resampled within the task."""
    by_finetune_seed = by_finetune_seed or {0: series}
    effects, seeds = {}, {}
    variants = sorted({v for runs in by_finetune_seed.values() for _, v in runs
                       if v != "DARE" and not v.startswith("DARE-")})
    for rate in SWEEP_CONTRAST_RATES:
        for other in variants:
            paired = []
            for seed, runs in by_finetune_seed.items():
                for (task, variant), points in sorted(runs.items()):
                    if variant != "DARE":
                        continue
                    dare = cell(points.get(rate, []))
                    reference = mean_of(cell(runs.get((task, other), {}).get(rate, [])))
                    if dare is not None and reference is not None:
                        paired.append(PairedCell(task, reference, _seed_values(dare), task, seed))
            if paired:
                effects[(rate, other)] = paired_effect(paired)
                seeds[(rate, other)] = len({c.replicate for c in paired})
    adjusted = holm({f"{r}/{o}": e.p_value for (r, o), e in effects.items()})
    rows = [[f"{rate:g}", f"DARE - {other}", e.cells, e.mean, e.low, e.high, e.higher, e.lower, e.p_value,
             adjusted[f"{rate}/{other}"], seeds[(rate, other)]] for (rate, other), e in effects.items()]
    return ["drop rate", "contrast", "tasks", "mean difference (points)", "95% CI low", "95% CI high",
            "DARE higher", "DARE lower", "Wilcoxon p", "Holm p", "fine-tuning seeds"], rows


def plot_sweeps(series: Mapping[tuple[str, str], Mapping[float, Sequence[float | None]]],
                output_dir: Path) -> list[Path]:
    """PNGs of test metric vs drop rate with std error bars: one per task (every variant), one per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def draw(path: Path, title: str, lines: Sequence[tuple[str, Mapping[float, Sequence[float | None]]]]) -> Path:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, points in lines:
            stats = [(r, cell(points[r])) for r in sorted(points) if cell(points[r]) is not None]
            if stats:
                ax.errorbar([r for r, _ in stats], [mean_of(s) for _, s in stats], capsize=3, marker="o",
                            yerr=[s.std if isinstance(s, Stat) else 0.0 for _, s in stats], label=label)
        ax.set(xlabel="drop rate p", ylabel="test metric (x100)", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return path

    paths = []
    for variant in sorted({v for _, v in series}):
        lines = [(task, points) for (task, v), points in sorted(series.items()) if v == variant]
        paths.append(draw(output_dir / f"dare_sweep_{variant}.png", f"{variant}: performance vs drop rate", lines))
    tasks = sorted({t for t, _ in series})
    if any(sum(t == task for t, _ in series) > 1 for task in tasks):
        for task in tasks:
            lines = [(variant, points) for (t, variant), points in sorted(series.items()) if t == task]
            paths.append(draw(output_dir / f"drop_rate_{task}.png", f"{task}: dropping delta parameters", lines))
    return paths


def table_records(table: Table) -> list[dict[str, Any]]:
    """Rows as dicts at full precision (a :class:`Stat` becomes ``{mean, std, values}``), for JSON."""
    header, rows = table
    out = []
    for row in rows:
        out.append({h: ({"mean": v.mean, "std": v.std, "values": list(v.values)} if isinstance(v, Stat) else v)
                    for h, v in zip(header, row, strict=True)})
    return out
