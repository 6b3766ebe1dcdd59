"""Pairwise merging of fine-tuned GLUE classifiers with grid searches selected on validation (or test).

A pair of tasks is merged once per hyperparameter setting and the merged encoder is evaluated on each task of the
pair with that task's own (unmerged) classifier head; hyperparameters are selected per target task. This is
MergeLM's ordered-pair protocol (``source, target``) with the merge shared between the two orders. DARE
(``mask_merging``) is applied to each fine-tuned model's delta before the chosen method; its drop-rate grid runs
after the plain method's grid in the same run, so it never needs an earlier run's results file.

A run is a :class:`Search`: a :class:`~model_merging_methods.Recipe` (every setting) and the values searched. Every
merge, statistics pass and evaluation is keyed by the recipe it belongs to, so two settings never share a result.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from common.selection import select_best
from glue.encoder_models import load_finetuned_classifier, load_pretrained_classifier
from glue.glue_data import GLUE_TASK_NAMES, GLUE_TASKS, load_glue_task, make_dataloader
from glue.glue_inference import GLUE_EXCLUDE_PARAM_NAMES_REGEX, dare_state_dict
from glue.glue_metrics import primary_score
from glue.glue_training import evaluate_model
from model_merging_methods import Dare, Recipe, compute_statistics, grid_recipes, merge_state_dicts

logger = logging.getLogger(__name__)

#: ``--grid`` name -> the declared grid protocol (``Hyperparameter.grids``); ``none`` searches the flags' values
GRID_PROTOCOLS = {"paper": "glue_paper", "reduced": "glue_reduced", "quick": "glue_quick"}
#: training examples loaded per task for the Fisher / Gram statistics (the largest count of MergeLM's grid)
DEFAULT_MAX_STATISTICS_EXAMPLES = 2048
#: seed of the permutation that fixes each task's statistics examples (``--statistics_seed``)
DEFAULT_STATISTICS_SEED = 0


def statistics_order(count: int, seed: int = DEFAULT_STATISTICS_SEED) -> list[int]:
    """Positions, in the loaded train part, of a task's statistics examples in the order they are used.

    A seeded permutation of the ``count`` loaded examples; a statistic over n examples uses its first n, the
    same ones whatever the process computed before and whether the model was DARE'd or not (MergeLM draws them
    from a shuffled loader that moves on with every statistic, which confounds a method's change with new
    examples). The positions are recorded in each run's ``config.json``.
    """
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()


@dataclass(frozen=True)
class Search:
    """One run of a pair: a recipe, the method's values searched on it, then (with DARE) the drop rates.

    Attributes:
        recipe: every setting of the run; a searched setting holds its first value.
        grid: ``{name: values}`` of the method's settings searched first (the first name varies slowest, MergeLM's
            nesting order).
        dare_rates: DARE drop rates searched after the method's best setting (MergeLM's order); empty without DARE.
    """

    recipe: Recipe
    grid: Mapping[str, tuple] = field(default_factory=dict)
    dare_rates: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", {k: tuple(v) for k, v in self.grid.items()})
        object.__setattr__(self, "dare_rates", tuple(self.dare_rates))
        if bool(self.dare_rates) != (self.recipe.dare is not None):
            raise ValueError(f"DARE drop rates are searched exactly when the recipe has DARE, got rates "
                             f"{list(self.dare_rates)} for {self.recipe.describe()}")
        for recipe in self.candidates():  # every value checked by its declaration, before any work
            self.with_rates(recipe)

    @property
    def searched_names(self) -> tuple[str, ...]:
        return (*self.grid, *(("weight_mask_rate",) if self.dare_rates else ()))

    @property
    def key(self) -> str:
        """``mask_merging/ties_merging/fisher_estimator=exact/seed=0``: the method, then each setting that is one run
        per value (``Hyperparameter.run_per_value``)."""
        declarations = self.recipe.declarations()
        per_run = [f"{n}={v}" for n, v in self.recipe.settings().items() if declarations[n].run_per_value]
        return "/".join([*self.recipe.method_path, *per_run])

    def candidates(self) -> list[Recipe]:
        """The method's grid (without DARE's rates: DARE keeps the recipe's first rate)."""
        return grid_recipes(self.recipe, self.grid)

    def with_rates(self, best: Recipe) -> list[Recipe]:
        """``best`` at every DARE drop rate."""
        return [best.replace(weight_mask_rate=rate) for rate in self.dare_rates]

    def searched(self, recipe: Recipe) -> dict[str, Any]:
        """The searched settings of ``recipe`` (``metrics.json``'s ``hyperparameters``)."""
        settings = recipe.settings()
        return {name: settings[name] for name in self.searched_names}


@dataclass
class TaskModel:
    """One fine-tuned task: its model (reused for every evaluation), weights and data loaders."""

    task: str
    checkpoint: Any
    model: torch.nn.Module
    finetuned: dict[str, torch.Tensor]
    loaders: dict[str, Any]
    statistics_order: list[int] = field(default_factory=list)


@dataclass
class TaskPool:
    """The fine-tuned tasks of a run, loaded once and shared by every pair they are in.

    ``statistics`` holds each model's Fisher diagonals and Gram matrices keyed by (task, kind, statistics settings,
    DARE settings), ``dared`` each DARE'd state dict keyed by (task, DARE settings): a task's DARE mask depends on
    the DARE settings (seed included) and the task, not on the pair, so a DARE'd model and its statistics are
    computed once for all the pairs it is in (4 of the 10 pairs of 5 tasks) and all the methods.
    """

    pretrained: dict[str, torch.Tensor]
    tasks: dict[str, TaskModel]
    device: str = "cpu"
    statistics_seed: int = DEFAULT_STATISTICS_SEED
    statistics: dict[tuple, dict] = field(default_factory=dict)
    dared: dict[tuple, dict] = field(default_factory=dict)

    def release(self, dare_seed: int) -> None:
        """Drop the DARE'd models of ``dare_seed`` and their statistics (the seed's runs are finished)."""
        for cache in (self.statistics, self.dared):
            for key in [k for k in cache if k[-1] is not None and k[-1].seed == dare_seed]:
                del cache[key]

    def pair(self, tasks: Sequence[str]) -> PairMerger:
        members = [self.tasks[t] for t in tasks]
        return PairMerger(list(tasks), [m.finetuned for m in members], self.pretrained, [m.model for m in members],
                          {m.task: m.loaders for m in members}, device=self.device,
                          checkpoints={m.task: m.checkpoint for m in members},
                          statistics_orders={m.task: m.statistics_order for m in members},
                          statistics_seed=self.statistics_seed, _stats=self.statistics, _dared_cache=self.dared)


def dare_mask_index(task: str) -> int:
    """The DARE mask key of a task's model: its GLUE task index, the same in every pair (see TaskPool)."""
    return GLUE_TASK_NAMES.index(task)


def _encoder(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without classifier heads (their shapes differ between tasks; they are never merged)."""
    return {k: v for k, v in state.items() if "classifier" not in k}


@dataclass
class PairMerger:
    """Fine-tuned models, data and caches for merging one pair of tasks and scoring the merges of recipes."""

    tasks: list[str]
    finetuned: list[dict[str, torch.Tensor]]
    pretrained: dict[str, torch.Tensor]
    models: list[torch.nn.Module]
    loaders: dict[str, dict[str, Any]]
    device: str = "cpu"
    checkpoints: dict[str, Any] = field(default_factory=dict)
    statistics_orders: dict[str, list[int]] = field(default_factory=dict)
    statistics_seed: int = DEFAULT_STATISTICS_SEED
    _stats: dict[tuple, dict] = field(default_factory=dict)
    _dared_cache: dict[tuple, dict] = field(default_factory=dict)
    _scores: dict[tuple, dict] = field(default_factory=dict)
    _last: tuple[Recipe, dict] | None = None

    def _dared(self, dare: Dare | None) -> list[dict[str, torch.Tensor]]:
        if dare is None:
            return self.finetuned
        # heads are never dropped, and their shapes differ between tasks (STS-B has one output): DARE runs on the
        # encoder only and each model keeps its own head
        out = []
        for task, state in zip(self.tasks, self.finetuned, strict=True):
            key = (task, dare)
            if key not in self._dared_cache:
                self._dared_cache[key] = {**state, **dare_state_dict(_encoder(self.pretrained), _encoder(state), dare,
                                                                     model_index=dare_mask_index(task))}
            out.append(self._dared_cache[key])
        return out

    def clear_merged(self) -> None:
        """Forget the last merged state dict (kept while one setting is scored on both tasks)."""
        self._last = None

    def statistics_examples(self, recipe: Recipe) -> dict[str, int]:
        """``{task: training examples}`` the recipe's statistics use: the requested count, or fewer where a task's
        loaded training set is smaller (what ``grid.json`` records)."""
        specs = recipe.spec.specs
        counts = [v for k, v in recipe.statistics_settings().items() if specs[k].statistics == "num_examples"]
        if not counts:
            return {}
        return {task: min(*counts, len(self.loaders[task]["statistics"].dataset)) for task in self.tasks}

    def statistics_subset(self, recipes: Sequence[Recipe]) -> dict[str, Any] | None:
        """``{"seed", "positions": {task: [...]}}``: the training examples (positions in the loaded train part, in
        the order used) that ``recipes``' statistics draw from; a statistic over n examples uses the first n.
        ``None`` when no recipe computes statistics."""
        counts: dict[str, int] = {}
        for recipe in recipes:
            for task, n in self.statistics_examples(recipe).items():
                counts[task] = max(counts.get(task, 0), n)
        if not counts:
            return None
        return {"seed": self.statistics_seed,
                "positions": {task: self.statistics_orders[task][:n] for task, n in counts.items()}}

    def _statistics(self, index: int, recipe: Recipe, state: dict) -> dict:
        task, settings = self.tasks[index], recipe.statistics_settings()
        key = (task, recipe.spec.statistics, tuple(sorted(settings.items())), recipe.dare)
        if key not in self._stats:
            model = self.models[index]
            model.load_state_dict(state)
            # the statistics loader is not shuffled: every pass starts at the same seeded subset
            loader = ({k: v for k, v in b.items() if k != "dataset_ids"} for b in self.loaders[task]["statistics"])
            self._stats[key] = compute_statistics(recipe.spec, settings, model, loader, device=self.device)
        return self._stats[key]

    def merge(self, recipe: Recipe) -> dict[str, torch.Tensor]:
        """Merged encoder state dict (classifier heads excluded) of ``recipe``; DARE first when it has DARE."""
        states = self._dared(recipe.dare)
        statistics = {}
        if recipe.spec.statistics is not None:
            argument = {"fisher": "fisher_weights", "gram": "gram_matrices"}[recipe.spec.statistics]
            statistics[argument] = [self._statistics(i, recipe, s) for i, s in enumerate(states)]
        undared = Recipe(recipe.method, recipe.hyperparameters)  # the deltas are DARE'd already
        return merge_state_dicts(undared, _encoder(self.pretrained), [_encoder(s) for s in states],
                                 exclude_param_names_regex=list(GLUE_EXCLUDE_PARAM_NAMES_REGEX), **statistics)

    def score(self, recipe: Recipe, task: str, split: str) -> dict[str, Any]:
        """Metrics of the merge of ``recipe`` on ``task``/``split`` with ``task``'s own head (memoised by recipe)."""
        key = (recipe, task, split)
        if key not in self._scores:
            if self._last is None or self._last[0] != recipe:
                self._last = (recipe, self.merge(recipe))
            index = self.tasks.index(task)
            heads = {k: v for k, v in self.finetuned[index].items() if "classifier" in k}
            model = self.models[index]
            model.load_state_dict({**self._last[1], **heads})
            self._scores[key] = evaluate_model(model, self.loaders[task][split], [task], device=self.device,
                                               desc=f"{task} {split}")
        return self._scores[key]


def load_task_pool(
    tasks: Sequence[str], checkpoints: Mapping[str, Any], tokenizer: Any, *, language_model_name: str,
    data_options: Mapping[str, Any], batch_size: int = 16, device: str = "cpu",
    max_statistics_examples: int = DEFAULT_MAX_STATISTICS_EXAMPLES, statistics_seed: int = DEFAULT_STATISTICS_SEED,
) -> TaskPool:
    """Load each task's fine-tuned model and statistics/validation/test loaders once, and the pretrained encoder.

    The statistics loader holds the first ``max_statistics_examples`` training examples in the fixed order of
    :func:`statistics_order` (``statistics_seed``), unshuffled, so every statistic over n examples uses the same n.
    """
    loaded = {}
    for task in tasks:
        model = load_finetuned_classifier(checkpoints[task]).to(device)
        data = load_glue_task(task, tokenizer, max_train_samples=max_statistics_examples, **data_options)
        order = statistics_order(len(data.train), statistics_seed)
        loaders = {split: make_dataloader(getattr(data, split), tokenizer, batch_size=batch_size, sort_by_length=True)
                   for split in ("validation", "test")}
        loaders["statistics"] = make_dataloader([data.train[i] for i in order], tokenizer, batch_size=batch_size)
        finetuned = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        loaded[task] = TaskModel(task, checkpoints[task], model, finetuned, loaders, order)
    pretrained = load_pretrained_classifier(language_model_name, GLUE_TASKS[tasks[0]].num_labels).state_dict()
    return TaskPool(pretrained, loaded, device=device, statistics_seed=statistics_seed)


class Evaluations:
    """The evaluations one run used, each listed once in the order first used, cached or not (``grid.json``)."""

    def __init__(self, merger: PairMerger, search: Search) -> None:
        self.merger, self.search = merger, search
        self.used: dict[tuple, dict[str, Any]] = {}

    def score(self, recipe: Recipe, task: str, split: str) -> dict[str, Any]:
        metrics = self.merger.score(recipe, task, split)
        if (recipe, task, split) not in self.used:
            self.used[(recipe, task, split)] = {
                "setting": self.search.searched(recipe), "task": task, "split": split, "recipe": recipe.record(),
                "statistics_examples": self.merger.statistics_examples(recipe), "metrics": metrics}
        return metrics

    def records(self) -> list[dict[str, Any]]:
        return list(self.used.values())


def select_on_split(evaluations: Evaluations, candidates: Sequence[Recipe], task: str, select_on: str) -> Recipe:
    """The candidate with the highest primary metric on ``select_on`` (``common.selection.select_best``: the first
    on ties; a NaN score, e.g. STS-B's correlation of a constant prediction, never wins). When every candidate scores
    NaN the first is selected, with a warning."""
    label = candidates[0].spec.display_name
    scored = [(recipe, primary_score(task, evaluations.score(recipe, task, select_on)))
              for recipe in tqdm(candidates, desc=f"{label} grid ({task})", leave=False)]
    best = select_best(scored)
    if best is None:
        logger.warning("%s on %s: every setting scored NaN on %s; selected the first, %s", label, task, select_on,
                       candidates[0].describe())
        return candidates[0]
    return best[0]


def grid_search_pair(merger: PairMerger, search: Search, *, select_on: str = "validation",
                     plain_best: Mapping[str, Recipe] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per target task: the selected recipe with its validation and test metrics; and every evaluation used.

    With DARE, the plain method's best setting is selected first, then the drop rate (MergeLM order);
    ``plain_best`` (``{task: recipe without DARE}``, e.g. read from the finished plain run) skips that first search.
    """
    if select_on not in ("validation", "test"):
        raise ValueError(f"select_on must be 'validation' or 'test', got {select_on!r}")
    evaluations = Evaluations(merger, search)
    results = {}
    for task in merger.tasks:
        if plain_best is not None and task in plain_best:
            best = Recipe(search.recipe.method, plain_best[task].hyperparameters, search.recipe.dare)
        else:
            best = select_on_split(evaluations, search.candidates(), task, select_on)
        if search.dare_rates:
            best = select_on_split(evaluations, search.with_rates(best), task, select_on)
        results[task] = {"hyperparameters": search.searched(best), "recipe": best.record(), "selected_on": select_on,
                         "validation": evaluations.score(best, task, "validation"),
                         "test": evaluations.score(best, task, "test")}
        logger.info("%s on %s: best %s -> test %s", search.key, task, best.describe(), results[task]["test"])
    return results, evaluations.records()
