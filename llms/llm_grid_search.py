"""The paper's LLM selection protocol: a validation grid per benchmark, then the selected setting on the rest.

Protocol (first author, MergeLM issues 21, 39, 44): each benchmark is split into a seeded 10 % validation sample
and the other 90 % (``llms.llm_validation_split``); every grid point (``llms.llm_grid``) is merged once by the
streaming merger and evaluated on the validation sample of every benchmark; per benchmark the point with the best
validation score is selected (``common.selection.select_best``: ties go to the earlier point of the grid, a
missing or NaN score never wins) and only then evaluated on the test part; the full set (validation + test, what
the paper reports) is scored from the same generations. Cells whose setting a preset states (``llms.llm_presets``)
skip the grid and are evaluated with that setting.

Work shared between points and benchmarks: a point's benchmarks are generated in one batch before any is scored
(:func:`generate_parts`: with vLLM one child process and one engine start per task folder, the folders whose
tokenizers decode alike sharing one), and the points of a shard that differ only in λ are merged in one streamed
pass (:func:`merge_shared_pass`, ``merge_engine.merge_variants``: the inputs read and the DARE'd deltas computed
once, one model written per λ, bit for bit the separate merges; at most ``max_merge_outputs`` models a pass, each
on disk until its point is evaluated). Each point then reuses its finished folder.

The selection needs every grid point: with a point not finished (a shard still running, a job killed, a point
held by a concurrent job) it raises :class:`IncompleteGridError` before any final merge, naming the missing
points, unless ``GridSearchConfig.allow_missing`` (``--allow_missing``); then it selects among the finished points
and ``selection.json`` records ``"missing_points"`` and ``"allow_missing": true``. Likewise a finished point
without a validation score for a grid benchmark (AlpacaEval before its win rates are ingested, code without
``--allow_code_execution`` or external scores) stops the selection with :class:`UnscoredPointsError`, naming the
points and the commands (``evaluate_generations.py --pending_alpaca_eval``), unless ``allow_missing`` (then
``"unscored_points"`` is recorded and the selection is made among the scored points). Ties are never silent: every
point sharing a benchmark's best validation score is listed under ``selection.<benchmark>.tied`` (the rule,
:data:`TIE_BREAK`, is in ``selection.json`` and the tables) and logged.

Folder ``<results>/grid_search_llms_instruct_math_code/<tasks>/<split and generation settings>/`` (the
generation settings: ``EvaluationSettings.naming()``, e.g. ``backend=hf``, ``dtype=float16``, ``max_new_tokens``):

* ``points/<recipe.method_key>/<settings>/``: one per grid point (its recipe's settings, and ``save_dtype`` when
  not bf16); ``generations/<dataset>.jsonl`` (resumable, shared by the validation and the final runs),
  ``validation/`` and ``final/<part>/`` predictions and external files,
  ``result.json`` (written atomically: the point is finished exactly when it exists, and is never redone),
  ``final/<dataset>.json`` (test / full scores once selected), ``.lock`` (held while a job works on the point, so
  overlapping shards skip it; released by the OS when a job dies);
* ``external_scores/<dataset>.json``: ``{"<method>/<settings>": percent}`` (or ``{"win_rate": percent, ...}``,
  what ``evaluate_generations.py --dataset_name alpaca_eval`` writes) for benchmarks scored outside the repository
  (AlpacaEval, or code without ``--allow_code_execution``), read by the selection;
* ``selections/<label>/``: ``grid.md`` / ``grid.csv`` (every point's validation score per benchmark),
  ``selection.csv``, ``selection.json`` (everything: the missing points and ``allow_missing``, the tied points
  per benchmark and the tie rule ``tie_break``, the evaluation settings in ``config``), ``config.json``, logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from common.run_dir import atomic_write_json, atomic_write_text, hyperparameter_dirname, read_json, run_dir_for
from common.selection import select_best
from evaluation.alpaca_eval import pending as pending_alpaca_eval
from evaluation.generation import release_hf_model
from evaluation.generations_file import load_finished_generations
from evaluation.tasks import get_task
from llms.llm_compute_estimate import DEFAULT_MERGE_SECONDS, describe_plan, measured_rates, plan_compute
from llms.llm_configs import LLM_DATASET_NAMES, MERGE_TASK_ORDER, LlmMergeConfig, saved_naming
from llms.llm_grid import describe_point, merge_pass_groups, shard_points
from llms.llm_grid_tables import TIE_BREAK, grid_table, percent_score, selection_table, write_tables
from llms.llm_merging import merge_llms, merge_variants_into, release_model_dirs, resolve_paths
from llms.llm_pipeline import (
    TASK_DATASETS,
    EvaluationSettings,
    GenerationJob,
    check_datasets_available,
    generate_jobs,
    generation_record,
    score_examples,
    select_examples,
    write_external_file,
)
from llms.llm_validation_split import (
    DEFAULT_VALIDATION_FRACTION,
    ValidationSplit,
    check_validation_fraction,
    split_positions,
)
from model_merging_methods import Recipe

logger = logging.getLogger(__name__)

SCRIPT = "grid_search_llms_instruct_math_code"
RESULT_FILE = "result.json"
PARTS = ("validation", "test", "full")


class IncompleteGridError(RuntimeError):
    """The selection was asked for while grid points are not finished (and ``allow_missing`` is off)."""


class UnscoredPointsError(IncompleteGridError):
    """The selection was asked for while finished grid points have no validation score for a grid benchmark
    (AlpacaEval not ingested yet, code not executed), and ``allow_missing`` is off."""


@dataclass(frozen=True)
class GridSearchConfig:
    """A grid search (or a preset) over merges of ``merge_tasks``; validated before any model is read.

    Attributes:
        merge_tasks: two or three of instruct, math, code.
        points: the validation grid (one :class:`Recipe` per point: every setting, DARE's seed included), for
            the benchmarks without a stated setting.
        datasets: evaluated benchmarks (default: the merged tasks', as MergeLM); a benchmark of a task that is
            not merged is generated with the first merged task's tokenizer.
        fixed: ``{dataset: (point, source)}``: settings stated by the paper or its author (no grid).
        label: name of the selection folder (the preset name, or the methods).
        table1_row: ``(models, method)`` of the paper's Table 1 row this search reproduces, if any.
        validation_fraction, split_seed: the validation sample (``llms.llm_validation_split``).
        shard: ``(i, N)``: this job runs block ``i`` of ``N`` consecutive blocks of the grid, ordered so that the
            points differing only in λ are adjacent (``llms.llm_grid.shard_points``).
        model_paths, save_merge_models_dir, save_dtype, keep_model, merge_num_threads: as in ``LlmMergeConfig``.
        evaluation: generation and scoring settings (always resumed).
        allow_missing: select among the finished points when some are not finished (recorded in
            ``selection.json``); otherwise the selection refuses to run (:class:`IncompleteGridError`).
        max_merge_outputs: at most this many grid points merged by one pass (points that differ only in λ share
            one, ``llms.llm_grid.merge_pass_groups``); None: every such point of the shard; 1: one merge per point.
    """

    merge_tasks: tuple[str, ...]
    points: tuple[Recipe, ...]
    datasets: tuple[str, ...] = ()
    fixed: Mapping[str, tuple[Recipe, str]] = field(default_factory=dict)
    label: str = "custom"
    table1_row: tuple[str, str] | None = None
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION
    split_seed: int = 0
    shard: tuple[int, int] = (0, 1)
    model_paths: Mapping[str, str] = field(default_factory=dict)
    save_merge_models_dir: str = "save_merge_models"
    save_dtype: str = "bfloat16"
    keep_model: bool = False
    merge_num_threads: int | None = None
    homology_check: bool = True
    strict_homology: bool = False
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    allow_missing: bool = False
    max_merge_outputs: int | None = None

    def __post_init__(self) -> None:
        tasks = tuple(t for t in MERGE_TASK_ORDER if t in self.merge_tasks)
        object.__setattr__(self, "merge_tasks", tasks)
        if not self.datasets:
            object.__setattr__(self, "datasets", tuple(d for t in tasks for d in TASK_DATASETS[t]))
        object.__setattr__(self, "evaluation", dataclasses.replace(self.evaluation, resume=True))
        check_validation_fraction(self.validation_fraction)
        if self.max_merge_outputs is not None and self.max_merge_outputs < 1:
            raise ValueError(f"max_merge_outputs must be >= 1 (1: one merge per point), got {self.max_merge_outputs}")
        for dataset in self.datasets:
            if dataset not in LLM_DATASET_NAMES:
                raise ValueError(f"datasets must be among {', '.join(LLM_DATASET_NAMES)}, got {dataset!r}")
        extra = sorted(set(self.fixed) - set(self.datasets))
        if extra:
            raise ValueError(f"stated settings for {extra} which are not evaluated, got datasets {self.datasets}")
        if self.grid_datasets and not self.points:
            raise ValueError(f"{list(self.grid_datasets)} have no stated setting and the grid is empty; pass "
                             "--merging_methods")
        for point in {*self.points, *(p for p, _ in self.fixed.values())}:
            self.merge_config(point)  # every recipe is checked (ranges, method) before any work

    @property
    def grid_datasets(self) -> tuple[str, ...]:
        return tuple(d for d in self.datasets if d not in self.fixed)

    def merge_config(self, point: Recipe) -> LlmMergeConfig:
        return LlmMergeConfig(
            merge_tasks=self.merge_tasks, recipe=point, model_paths=self.model_paths,
            save_merge_models_dir=self.save_merge_models_dir, save_dtype=self.save_dtype, keep_model=self.keep_model,
            merge_num_threads=self.merge_num_threads,
            homology_check=self.homology_check, strict_homology=self.strict_homology, evaluation=self.evaluation,
        )

    def point_key(self, point: Recipe) -> str:
        """``<recipe.method_key>/<settings>``: the point's folder below ``points/`` and its id in tables.

        The settings are the recipe's (DARE's seed included) and the merged model's ``save_dtype`` when not the
        default; the generation settings (backend, dtype, token limit) name the grid folder above
        (:meth:`grid_dir`), so the points of one selection were all generated alike.
        """
        settings = {**point.settings(), **saved_naming(self.save_dtype)}
        return f"{point.method_key}/{hyperparameter_dirname(settings)}"

    def grid_dir(self, results_dir: str | os.PathLike) -> Path:
        """``<results>/grid_search_llms_instruct_math_code/<tasks>/<split and generation settings>``."""
        split = {"validation_fraction": self.validation_fraction, "split_seed": self.split_seed,
                 **self.evaluation.naming()}
        return run_dir_for(results_dir, SCRIPT, "_".join(self.merge_tasks), hyperparameter_dirname(split))

    def record(self) -> dict[str, Any]:
        return {"script": SCRIPT, "merge_tasks": list(self.merge_tasks), "label": self.label,
                "table1_row": list(self.table1_row) if self.table1_row else None,
                "datasets": list(self.datasets), "points": [p.record() for p in self.points],
                "fixed": {d: {"point": p.record(), "source": s} for d, (p, s) in self.fixed.items()},
                "validation_fraction": self.validation_fraction, "split_seed": self.split_seed,
                "shard": list(self.shard), "model_paths": dict(self.model_paths),
                "save_merge_models_dir": self.save_merge_models_dir, "save_dtype": self.save_dtype,
                "homology_check": self.homology_check, "strict_homology": self.strict_homology,
                "evaluation": dataclasses.asdict(self.evaluation), "allow_missing": self.allow_missing,
                "max_merge_outputs": self.max_merge_outputs}


def grid_model_paths(config: GridSearchConfig) -> dict[str, str]:
    """Resolve the backbone and the merged models, and check every benchmark's data (before any heavy work)."""
    any_point = (config.points or tuple(p for p, _ in config.fixed.values()))[0]
    merge = config.merge_config(any_point)
    check_datasets_available(config.datasets, config.evaluation)
    return resolve_paths([merge.backbone_name, *merge.finetuned_model_names], config.model_paths)


# ---------------------------------------------------------------------------------------------------------------
# Splits and evaluation of one merged model on parts of a benchmark


@cache
def dataset_split(dataset: str, settings: EvaluationSettings, fraction: float, seed: int):
    """``(records, examples, split)`` of the ``[start_index:end_index]`` slice of ``dataset``."""
    records, examples = select_examples(get_task(dataset), settings)
    return records, examples, split_positions(len(examples), dataset_name=dataset, fraction=fraction, seed=seed)


def part_positions(split: ValidationSplit, part: str) -> tuple[int, ...]:
    if part == "full":
        return tuple(sorted(split.validation + split.test))
    return split.validation if part == "validation" else split.test


def _count_tokens(model_path: str, texts: Sequence[str]) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)


def generation_path(folder: Path, dataset: str) -> Path:
    return folder / "generations" / f"{get_task(dataset).name}.jsonl"


def generate_parts(
    config: GridSearchConfig, views: Mapping[str, Path], datasets: Sequence[str], folder: Path, parts: Sequence[str]
) -> dict[str, float]:
    """Generate the examples of ``parts`` of every dataset (resuming ``folder/generations``) in one batch: the
    merged model is loaded once for all of them (one vLLM child process and engine for the task folders whose
    tokenizers decode alike, ``llms.llm_pipeline.generate_jobs``).

    Returns ``{"generation_seconds", "generated_tokens"}`` of the examples generated now (0 when none was).
    """
    jobs, before = [], []
    for dataset in datasets:
        task = get_task(dataset)
        _, examples, split = dataset_split(dataset, config.evaluation, config.validation_fraction, config.split_seed)
        needed = sorted({i for part in parts for i in part_positions(split, part)})
        path = generation_path(folder, dataset)
        made_with = generation_record(task, config.evaluation, config.save_dtype)
        before.append(set(load_finished_generations(path, id_field=task.id_field, settings=made_with)[0]))
        jobs.append(GenerationJob(task, [examples[i] for i in needed], model_for(config, views, dataset), path,
                                  config.save_dtype))
    start = time.monotonic()
    rows = generate_jobs(jobs, config.evaluation)
    seconds = time.monotonic() - start
    tokens, generated = 0, False
    for job, done, job_rows in zip(jobs, before, rows, strict=True):
        new = [r["completion"] for r in job_rows if r[job.task.id_field] not in done]
        if new:
            tokens, generated = tokens + _count_tokens(job.model_path, new), True
    return {"generation_seconds": seconds if generated else 0.0, "generated_tokens": tokens}


def evaluate_parts(
    config: GridSearchConfig, dataset: str, folder: Path, parts: Sequence[str], out: str
) -> dict[str, dict[str, Any]]:
    """Score each of ``parts`` separately from ``folder/generations`` (made by :func:`generate_parts`).

    Returns ``{part: metrics}``; predictions and external files go to ``folder/<out>/<part>/``.
    """
    task = get_task(dataset)
    records, examples, split = dataset_split(dataset, config.evaluation, config.validation_fraction, config.split_seed)
    made_with = generation_record(task, config.evaluation, config.save_dtype)
    done, _ = load_finished_generations(generation_path(folder, dataset), id_field=task.id_field, settings=made_with)
    metrics = {}
    for part in parts:
        positions = part_positions(split, part)
        chosen = [examples[i] for i in positions]
        missing = [e[task.id_field] for e in chosen if e[task.id_field] not in done]
        if missing:
            raise RuntimeError(f"{generation_path(folder, dataset)} lacks {len(missing)} generations of the {part} "
                               f"part (e.g. {missing[0]!r}) after generating them")
        part_metrics, predictions = score_examples(
            task, [records[i] for i in positions], chosen, [done[e[task.id_field]]["completion"] for e in chosen],
            config.evaluation)
        target = folder / out / part
        lines = "".join(json.dumps(p, ensure_ascii=False, default=str) + "\n" for p in predictions)
        atomic_write_text(target / "predictions" / f"{task.name}.jsonl", lines)
        write_external_file(task, target, [records[i] for i in positions], predictions, str(folder))
        metrics[part] = {**part_metrics, "ids": [e[task.id_field] for e in chosen]}
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# One grid point


@contextlib.contextmanager
def point_lock(folder: Path) -> Iterator[bool]:
    """``True`` while this process holds the point (another live job holding it gives ``False``)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def generations_complete(config: GridSearchConfig, dataset: str, folder: Path, parts: Sequence[str]) -> bool:
    """True when ``folder``'s generations file of ``dataset`` holds every example of ``parts``, made with this
    search's settings (a file made otherwise is not complete: generating will name the difference)."""
    task = get_task(dataset)
    path = folder / "generations" / f"{task.name}.jsonl"
    if not path.is_file():
        return False
    _, examples, split = dataset_split(dataset, config.evaluation, config.validation_fraction, config.split_seed)
    try:
        done, _ = load_finished_generations(path, id_field=task.id_field,
                                            settings=generation_record(task, config.evaluation, config.save_dtype))
    except ValueError:
        return False
    return all(examples[i][task.id_field] in done for part in parts for i in part_positions(split, part))


@contextlib.contextmanager
def point_models(config: GridSearchConfig, point: Recipe, paths: Mapping[str, str], folder: Path,
                 datasets: Sequence[str], parts: Sequence[str]) -> Iterator[tuple[dict, float | None]]:
    """The point's merged folders for generating ``datasets``' ``parts``; when every generation is already in the
    point's files (a run killed after generating), nothing is merged: yields ``({}, None)``."""
    if all(generations_complete(config, d, folder, parts) for d in datasets):
        logger.info("%s: the generations of %s are complete; scored without merging", config.point_key(point),
                    ", ".join(datasets))
        yield {}, None
        return
    with merged_point(config, point, paths) as merged:
        yield merged


@contextlib.contextmanager
def merged_point(config: GridSearchConfig, point: Recipe, paths: Mapping[str, str]) -> Iterator[tuple[dict, float]]:
    """Merge ``point`` once (reusing a finished merge of the same recipe); yields ``({task: folder}, seconds)``."""
    merge = config.merge_config(point)
    start = time.monotonic()
    views = merge_llms(merge, paths)
    try:
        yield views, time.monotonic() - start
    finally:
        release_hf_model()
        release_model_dirs(list(views.values()), Path(config.save_merge_models_dir), keep=config.keep_model)


def folder_task(config: GridSearchConfig, dataset: str) -> str:
    """The merged task whose folder (and tokenizer) generates ``dataset``: its own, else the first merged task."""
    return next((t for t in config.merge_tasks if dataset in TASK_DATASETS[t]), config.merge_tasks[0])


def model_for(config: GridSearchConfig, views: Mapping[str, Path], dataset: str) -> str:
    """The merged folder with the tokenizer of ``dataset``'s task (the first merged task's when not merged);
    without merged folders (every generation done) a placeholder that nothing loads."""
    return str(views[folder_task(config, dataset)]) if views else "(not merged: every generation was already made)"


def _missing_datasets(config: GridSearchConfig, folder: Path) -> tuple[dict[str, Any] | None, list[str]]:
    result = read_json(folder / RESULT_FILE) if (folder / RESULT_FILE).is_file() else None
    done = result["validation"] if result is not None else {}
    return result, [d for d in config.grid_datasets if d not in done]


def run_point(config: GridSearchConfig, grid_dir: Path, point: Recipe, paths: Mapping[str, str], *,
              shared_merge_seconds: float = 0.0) -> dict | None:
    """Validation scores of one point (``result.json``); a finished (point, benchmark) is read, never redone.

    ``shared_merge_seconds``: this point's share of a merge pass that wrote its model with other λ values
    (:func:`merge_shared_pass`), added to its ``merge_seconds``.
    """
    folder = grid_dir / "points" / config.point_key(point)
    result, missing = _missing_datasets(config, folder)
    if not missing:
        return result
    with point_lock(folder) as held:
        if not held:
            logger.info("%s: another job is working on this point; skipped", config.point_key(point))
            return None
        result, missing = _missing_datasets(config, folder)
        if not missing:
            return result
        logger.info("grid point %s: %s", describe_point(point), ", ".join(missing))
        result = result or {"point": point.record(), "key": config.point_key(point), "validation": {},
                            "generation_seconds": 0.0, "generated_tokens": 0}
        with point_models(config, point, paths, folder, missing, ["validation"]) as (views, merge_seconds):
            if merge_seconds is not None:
                result["merge_seconds"] = merge_seconds + shared_merge_seconds
            stats = generate_parts(config, views, missing, folder, ["validation"])
            result["generation_seconds"] += stats["generation_seconds"]
            result["generated_tokens"] += stats["generated_tokens"]
            for dataset in missing:
                result["validation"][dataset] = evaluate_parts(config, dataset, folder, ["validation"],
                                                               "validation")["validation"]
        atomic_write_json(folder / RESULT_FILE, result)
        return result


# ---------------------------------------------------------------------------------------------------------------
# Selection (validation only) and the final evaluation of the selected points


def load_point_results(config: GridSearchConfig, grid_dir: Path) -> tuple[dict[Recipe, dict], list[Recipe]]:
    """Finished points' results and the points of the grid that lack a benchmark of this search."""
    finished, missing = {}, []
    for point in config.points:
        result, datasets = _missing_datasets(config, grid_dir / "points" / config.point_key(point))
        if datasets:
            missing.append(point)
        else:
            finished[point] = result
    return finished, missing


def external_scores(grid_dir: Path, dataset: str) -> dict[str, float]:
    """``external_scores/<dataset>.json``: ``{point key: percent}``, a value either a number or a record with
    ``win_rate`` (percent; what ``evaluate_generations.py --dataset_name alpaca_eval`` writes for AlpacaEval)."""
    path = grid_dir / "external_scores" / f"{dataset}.json"
    if not path.is_file():
        return {}
    scores = {}
    for key, value in read_json(path).items():
        score = value.get("win_rate") if isinstance(value, Mapping) else value
        if isinstance(score, (int, float)) and not isinstance(score, bool):
            scores[str(key)] = float(score)
    return scores


def validation_scores(
    config: GridSearchConfig, grid_dir: Path, finished: Mapping[Recipe, dict]
) -> dict[str, dict[Recipe, float | None]]:
    """``{dataset: {point: validation score}}`` (in-repo metric, else ``external_scores``)."""
    scores: dict[str, dict[Recipe, float | None]] = {}
    for dataset in config.grid_datasets:
        external = external_scores(grid_dir, dataset)
        scores[dataset] = {}
        for point, result in finished.items():
            metrics = result["validation"].get(dataset)
            score = percent_score(metrics) if metrics is not None else None
            scores[dataset][point] = score if score is not None else external.get(config.point_key(point))
    return scores


def tied_points(scores: Mapping[Recipe, float | None], best: float) -> list[Recipe]:
    """The points (grid order) whose validation score equals the best one; a missing or NaN score is never tied."""
    return [point for point, score in scores.items() if score is not None and score == best]


def select_settings(
    config: GridSearchConfig, scores: Mapping[str, Mapping[Recipe, float | None]]
) -> dict[str, dict[str, Any]]:
    """Per benchmark: the stated setting, or the validation best (only validation scores are looked at).

    A grid selection's ``"tied"`` lists every point sharing the best score, in grid order (empty when the best is
    unique); the first of them is selected (:data:`TIE_BREAK`), and the tie is logged.
    """
    selection = {}
    for dataset in config.datasets:
        if dataset in config.fixed:
            point, source = config.fixed[dataset]
            selection[dataset] = {"point": point, "selected_by": source, "validation_score": None}
            continue
        best = select_best(scores[dataset].items())  # first highest; a missing or NaN score never wins
        if best is None:
            logger.warning("%s: no finished point has a validation score, so it has no selection (--allow_missing); "
                           "%s", dataset, how_to_score(dataset))
            continue
        tied = tied_points(scores[dataset], best[1])
        if len(tied) > 1:
            logger.warning("%s: %d points share the best validation score %.2f (%s); %s: %s", dataset, len(tied),
                           best[1], ", ".join(config.point_key(p) for p in tied), TIE_BREAK,
                           config.point_key(best[0]))
        selection[dataset] = {"point": best[0], "selected_by": "validation grid", "validation_score": best[1],
                              "tied": tied if len(tied) > 1 else []}
    return selection


def run_final(
    config: GridSearchConfig, grid_dir: Path, selection: Mapping[str, Mapping[str, Any]], paths: Mapping[str, str]
) -> dict[str, dict[str, Any]]:
    """Validation / test / full scores of each benchmark's selected point: one merge per distinct point."""
    final: dict[str, dict[str, Any]] = {}
    by_point: dict[Recipe, list[str]] = {}
    for dataset, chosen in selection.items():
        by_point.setdefault(chosen["point"], []).append(dataset)
    for point, datasets in by_point.items():
        folder = grid_dir / "points" / config.point_key(point)
        todo = [d for d in datasets if not (folder / "final" / f"{d}.json").is_file()]
        if todo:
            with point_lock(folder) as held:
                if not held:
                    logger.info("%s: another job is working on this point; its final scores are skipped",
                                config.point_key(point))
                    continue
                with point_models(config, point, paths, folder, todo, PARTS) as (views, _):
                    generate_parts(config, views, todo, folder, PARTS)
                    for dataset in todo:
                        metrics = evaluate_parts(config, dataset, folder, PARTS, "final")
                        record = {"point": point.record(), "key": config.point_key(point),
                                  "selected_by": selection[dataset]["selected_by"], **metrics}
                        atomic_write_json(folder / "final" / f"{dataset}.json", record)
        for dataset in datasets:
            if (folder / "final" / f"{dataset}.json").is_file():
                final[dataset] = read_json(folder / "final" / f"{dataset}.json")
    return final


# ---------------------------------------------------------------------------------------------------------------
# Plan, estimate and the whole search


def compute_plan_text(
    config: GridSearchConfig, grid_dir: Path, *, tokens_per_second: float | None, merge_seconds: float | None,
    stage: str = "all", engine_start_seconds: float | None = None,
) -> str:
    """Points still to run in this shard, examples, token upper bound and time of ``stage`` (given or measured
    rates; the final runs only where the stage runs them)."""
    check_datasets_available(config.datasets, config.evaluation)
    finished, _ = load_point_results(config, grid_dir)
    todo = [p for p in shard_points(config.points, config.shard) if p not in finished]
    sizes, final, max_tokens = {}, {}, {}
    for dataset in config.datasets:
        _, _, split = dataset_split(dataset, config.evaluation, config.validation_fraction, config.split_seed)
        sizes[dataset] = len(split.validation)
        final[dataset] = len(split.test) if dataset in config.grid_datasets else len(split.validation + split.test)
        max_tokens[dataset] = config.evaluation.max_new_tokens or get_task(dataset).sampling.max_tokens
    fixed_points = {p for p, _ in config.fixed.values()}
    final_merges = len(fixed_points) + min(len(config.grid_datasets), len(config.points))
    plan = plan_compute(grid_points=len(todo), grid_datasets=config.grid_datasets, final_datasets=final,
                        final_merges=final_merges, validation_sizes=sizes, max_new_tokens=max_tokens, stage=stage,
                        dataset_folders={d: folder_task(config, d) for d in config.datasets},
                        stated_points={d: point for d, (point, _) in config.fixed.items()})
    measured_tps, measured_merge = measured_rates(list(finished.values()))
    tps, tps_source = tokens_per_second, "--tokens_per_second"
    if tps is None and measured_tps is not None:
        tps, tps_source = measured_tps, f"measured on {len(finished)} finished points"
    merge_source = "--merge_seconds"
    if merge_seconds is None:
        merge_seconds, merge_source = DEFAULT_MERGE_SECONDS, "assumed for 13B; pass --merge_seconds"
        if measured_merge is not None:
            merge_seconds, merge_source = measured_merge, f"measured on {len(finished)} finished points"
    header = (f"grid search {config.label}: {' + '.join(config.merge_tasks)}, {len(config.points)} grid points "
              f"({len(finished)} finished, {len(todo)} to run in shard {config.shard[0]}/{config.shard[1]}), "
              f"benchmarks {', '.join(config.datasets)} (stated settings: {', '.join(config.fixed) or 'none'})\n"
              f"folder: {grid_dir}\n")
    starts = {} if engine_start_seconds is None else {"engine_start_seconds": engine_start_seconds,
                                                      "engine_source": "--engine_start_seconds"}
    return header + describe_plan(plan, tokens_per_second=tps, tps_source=tps_source, merge_seconds=merge_seconds,
                                  merge_source=merge_source, **starts)


def selection_folder(config: GridSearchConfig, grid_dir: Path) -> Path:
    return grid_dir / "selections" / config.label.replace("/", "_")


def merge_shared_pass(config: GridSearchConfig, grid_dir: Path, points: Sequence[Recipe],
                      paths: Mapping[str, str]) -> dict[Recipe, float]:
    """Merge, in one streamed pass, the points of ``points`` (which differ only in λ) that are about to be merged:
    not finished, generations not complete, merge not finished, and not held by another job (their locks are held
    during the pass). Each point's evaluation then reuses its folder (``merge_into`` with ``resume``).

    Returns ``{point: its share of the pass's seconds}`` for the points merged now (empty when fewer than two
    needed a merge: those are merged alone, as before).
    """
    with contextlib.ExitStack() as locks:
        chosen = []
        for point in points:
            folder = grid_dir / "points" / config.point_key(point)
            _, missing = _missing_datasets(config, folder)
            if (missing and locks.enter_context(point_lock(folder))
                    and not all(generations_complete(config, d, folder, ["validation"]) for d in missing)):
                chosen.append(point)
        if len(chosen) < 2:
            return {}
        merges = {point: config.merge_config(point) for point in chosen}
        outputs = {point: (m.merged_model_dir(m.merge_tasks[0]), m.recipe) for point, m in merges.items()}
        first = next(iter(merges.values()))
        logger.info("grid points %s differ only in λ: one merge pass for their %d models (the inputs read once, the "
                    "DARE'd deltas computed once)", "; ".join(describe_point(p) for p in chosen), len(chosen))
        start = time.monotonic()
        merged = merge_variants_into(
            list(outputs.values()), paths[first.backbone_name], [paths[n] for n in first.finetuned_model_names],
            save_dtype=config.save_dtype, copy_config_from=0, num_threads=config.merge_num_threads,
            progress=config.evaluation.progress, homology_check=config.homology_check,
            strict_homology=config.strict_homology)
        share = (time.monotonic() - start) / max(1, len(merged))
        return {point: share for point, (folder, _) in outputs.items() if folder in merged}


def run_grid(config: GridSearchConfig, grid_dir: Path, paths: Mapping[str, str]) -> list[Recipe]:
    """Validation runs of this shard's points, those differing only in λ merged in one pass (at most
    ``max_merge_outputs`` points each); returns the points this job finished or found finished."""
    done = []
    for group in merge_pass_groups(shard_points(config.points, config.shard), config.max_merge_outputs):
        shares = merge_shared_pass(config, grid_dir, group, paths) if len(group) > 1 else {}
        for point in group:
            if run_point(config, grid_dir, point, paths, shared_merge_seconds=shares.get(point, 0.0)) is not None:
                done.append(point)
    return done


def how_to_score(dataset: str, grid_dir: Path | None = None) -> str:
    """What gives ``dataset``'s grid points their validation scores."""
    if dataset == "alpaca_eval":
        where = "<grid folder>" if grid_dir is None else str(grid_dir)
        return (f"AlpacaEval is judged outside the repository: `python evaluate_generations.py --pending_alpaca_eval "
                f"{where}` prints the alpaca_eval call and the ingestion command for each point's validation outputs")
    note = ""
    if get_task(dataset).unsafe_code:
        note = (" (e.g. from evaluate_generations.py --allow_code_execution on each point's generations file; a "
                "finished point is not scored again by rerunning the grid with --allow_code_execution)")
    return f"write external_scores/{dataset}.json ({{point key: percent}}) in the grid folder{note}"


def unscored_points(scores: Mapping[str, Mapping[Recipe, float | None]]) -> dict[str, list[Recipe]]:
    """``{dataset: finished points without a validation score}`` (grid order; a NaN is a score)."""
    found = {d: [p for p, s in by_point.items() if s is None] for d, by_point in scores.items()}
    return {d: points for d, points in found.items() if points}


def check_scored(config: GridSearchConfig, grid_dir: Path, unscored: Mapping[str, Sequence[Recipe]],
                 finished: int) -> None:
    """Refuse a selection while finished points lack a benchmark's validation score, unless ``allow_missing``."""
    if not unscored:
        return
    lines = [f"{d}: {len(points)} of {finished} finished points have no validation score "
             f"({', '.join(config.point_key(p) for p in points)}); {how_to_score(d, grid_dir)}"
             for d, points in unscored.items()]
    if not config.allow_missing:
        raise UnscoredPointsError(
            "no selection yet: " + "; ".join(lines) + ". Then run --stage select (nothing is regenerated); or pass "
            "--allow_missing to select among the scored points (selection.json and the tables then record the "
            "unscored ones)")
    logger.warning("--allow_missing: selecting among the scored points. %s", "; ".join(lines))


def check_complete(config: GridSearchConfig, missing: Sequence[Recipe]) -> None:
    """Refuse a selection over part of the grid unless ``allow_missing`` (then the missing points are logged)."""
    if not missing:
        return
    keys = ", ".join(config.point_key(p) for p in missing)
    if not config.allow_missing:
        raise IncompleteGridError(
            f"{len(missing)} of {len(config.points)} grid points are not finished, so there is no selection yet: "
            f"{keys}. Finish them (rerun the grid jobs, --stage grid --shard i/N, or wait for the jobs still "
            "working on them), then run --stage select; or pass --allow_missing to select among the finished "
            "points (selection.json and the tables then record the missing ones)")
    logger.warning("--allow_missing: %d of %d grid points are not finished; selecting among the finished ones. "
                   "Missing: %s", len(missing), len(config.points), keys)


def select_and_evaluate(config: GridSearchConfig, grid_dir: Path, paths: Mapping[str, str]) -> dict[str, Any]:
    """Select on the finished points, evaluate the selection, write the tables.

    Raises :class:`IncompleteGridError` (before any final merge) when a grid point is not finished, unless
    ``config.allow_missing``.
    """
    finished, missing = load_point_results(config, grid_dir)
    check_complete(config, missing)
    scores = validation_scores(config, grid_dir, finished)
    unscored = unscored_points(scores)
    check_scored(config, grid_dir, unscored, len(finished))
    selection = select_settings(config, scores)
    final = run_final(config, grid_dir, selection, paths)
    record = {"label": config.label, "config": config.record(), "table1_row": config.table1_row,
              "missing_points": [config.point_key(p) for p in missing], "allow_missing": config.allow_missing,
              "finished_points": len(finished), "grid_points": len(config.points), "tie_break": TIE_BREAK,
              "unscored_points": {d: [config.point_key(p) for p in points] for d, points in unscored.items()},
              "validation_scores": {d: {config.point_key(p): s for p, s in by_point.items()}
                                    for d, by_point in scores.items()},
              "selection": {d: {**s, "point": s["point"].record(), "key": config.point_key(s["point"]),
                                **({"tied": [config.point_key(p) for p in s["tied"]]} if "tied" in s else {})}
                            for d, s in selection.items()},
              "final": {d: {part: {k: v for k, v in m.items() if k != "ids"} if isinstance(m, Mapping) else m
                            for part, m in parts.items()} for d, parts in final.items()}}
    grid = grid_table(config.points, config.grid_datasets, scores, finished, selection)
    selected = selection_table(selection, final, grid_points=(len(finished), len(config.points)))
    markdown = write_tables(selection_folder(config, grid_dir), grid, selected, record)
    if "alpaca_eval" in final:
        log_pending_alpaca_eval(grid_dir, "the selected settings' AlpacaEval parts (validation, test, full)")
    return {**record, "markdown": markdown}


def log_pending_alpaca_eval(grid_dir: Path, what: str) -> None:
    """Say how many AlpacaEval outputs of the grid folder still wait for their judge, and the command."""
    waiting = [item for item in pending_alpaca_eval(grid_dir) if item["not_ready"] is None]
    if waiting:
        logger.warning("AlpacaEval: %d model outputs files without a score (%s); `python evaluate_generations.py "
                       "--pending_alpaca_eval %s` prints the alpaca_eval calls and the ingestion commands",
                       len(waiting), what, grid_dir)


def run_grid_search(
    config: GridSearchConfig, grid_dir: Path, paths: Mapping[str, str], stage: str = "all"
) -> dict[str, Any]:
    """``grid``: this shard's validation runs; ``select``: selection + final evaluation; ``all``: both."""
    if stage not in ("all", "grid", "select"):
        raise ValueError(f"stage must be one of all, grid, select, got {stage!r}")
    done = run_grid(config, grid_dir, paths) if stage in ("all", "grid") else []
    if "alpaca_eval" in config.grid_datasets and stage in ("all", "grid"):
        log_pending_alpaca_eval(grid_dir, "the grid points' validation outputs, needed before --stage select")
    if stage == "grid":
        return {"finished_points": [config.point_key(p) for p in done]}
    return select_and_evaluate(config, grid_dir, paths)
