"""Pairwise merging of fine-tuned GLUE classifiers with grid searches selected on validation (or test).

A pair of tasks is merged once per hyperparameter setting and the merged encoder is evaluated on each task of the
pair with that task's own (unmerged) classifier head; hyperparameters are selected per target task. This is
MergeLM's ordered-pair protocol (``source, target``) with the merge shared between the two orders. DARE
(``mask_merging``) is applied to each fine-tuned model's delta before the chosen method; its drop-rate grid runs
after the plain method's grid in the same run, so it never needs an earlier run's results file.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from glue.encoder_models import load_finetuned_classifier, load_pretrained_classifier
from glue.glue_data import GLUE_TASK_NAMES, GLUE_TASKS, load_glue_task, make_dataloader
from glue.glue_inference import GLUE_EXCLUDE_PARAM_NAMES_REGEX, DareSettings, dare_state_dict
from glue.glue_metrics import primary_score
from glue.glue_training import evaluate_model

logger = logging.getLogger(__name__)

MERGING_METHODS = ("average_merging", "task_arithmetic", "fisher_merging", "regmean_merging", "ties_merging")
# MergeLM's grids (merge_plms_glue.py). Fisher's equal per-model coefficients cancel in its weighted mean, so
# the coefficient grid has no effect; it is kept at one value ("paper" keeps MergeLM's six for parity).
PAPER_GRIDS: dict[str, dict[str, list]] = {
    "average_merging": {},
    "task_arithmetic": {"scaling_coefficient": [0.1, 0.3, 0.5, 0.7, 0.9, 1.0]},
    "fisher_merging": {"fisher_scaling_coefficient": [0.1, 0.3, 0.5, 0.7, 0.9, 1.0],
                       "num_fisher_examples": [256, 512, 1024, 2048]},
    "regmean_merging": {"num_regmean_examples": [256, 512, 1024, 2048],
                        "reduce_non_diagonal_ratio": [0.7, 0.8, 0.9, 1.0]},
    "ties_merging": {"scaling_coefficient": [0.1, 0.3, 0.5, 0.7, 0.9, 1.0], "param_value_mask_rate": [0.7, 0.8, 0.9]},
}
QUICK_GRIDS: dict[str, dict[str, list]] = {
    "average_merging": {},
    "task_arithmetic": {"scaling_coefficient": [0.5, 1.0]},
    "fisher_merging": {"fisher_scaling_coefficient": [1.0], "num_fisher_examples": [64]},
    "regmean_merging": {"num_regmean_examples": [64], "reduce_non_diagonal_ratio": [0.9]},
    "ties_merging": {"scaling_coefficient": [0.5, 1.0], "param_value_mask_rate": [0.8]},
}
# "reduced": the CPU reproduction's grid (scripts/reproduce_encoder_results.sh), a subset of the paper's values
# that fits 10 pairs x 5 methods x (plain + 3 DARE seeds) x 2 Fisher estimators in a few CPU hours.
REDUCED_GRIDS: dict[str, dict[str, list]] = {
    "average_merging": {},
    "task_arithmetic": {"scaling_coefficient": [0.3, 0.5, 0.7, 1.0]},
    "fisher_merging": {"fisher_scaling_coefficient": [1.0], "num_fisher_examples": [256]},
    "regmean_merging": {"num_regmean_examples": [256], "reduce_non_diagonal_ratio": [0.7, 0.9]},
    "ties_merging": {"scaling_coefficient": [0.5, 1.0], "param_value_mask_rate": [0.7, 0.9]},
}
PAPER_DARE_RATES = [0.1, 0.3, 0.5, 0.7, 0.9]
REDUCED_DARE_RATES = [0.1, 0.5, 0.9]
QUICK_DARE_RATES = [0.5, 0.9]
GRIDS = {"paper": (PAPER_GRIDS, PAPER_DARE_RATES), "reduced": (REDUCED_GRIDS, REDUCED_DARE_RATES),
         "quick": (QUICK_GRIDS, QUICK_DARE_RATES)}


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of a ``{name: values}`` grid, in MergeLM's nesting order; ``[{}]`` when empty."""
    names = list(grid)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*(grid[n] for n in names))]


def _key(setting: Mapping[str, Any]) -> tuple:
    return tuple(sorted(setting.items()))


@dataclass
class TaskModel:
    """One fine-tuned task: its model (reused for every evaluation), weights and data loaders."""

    task: str
    checkpoint: Any
    model: torch.nn.Module
    finetuned: dict[str, torch.Tensor]
    loaders: dict[str, Any]


@dataclass
class TaskPool:
    """The fine-tuned tasks of a run, loaded once and shared by every pair they are in.

    ``statistics`` holds each model's Fisher diagonals and Gram matrices keyed by (task, kind, examples,
    estimator, DARE settings, rate, seed), ``dared`` each DARE'd state dict keyed by (task, DARE settings, rate,
    seed): a task's DARE mask depends on the seed and the task, not on the pair, so a DARE'd model and its
    statistics are computed once for all the pairs it is in (4 of the 10 pairs of 5 tasks) and all the methods.
    """

    pretrained: dict[str, torch.Tensor]
    tasks: dict[str, TaskModel]
    device: str = "cpu"
    statistics: dict[tuple, dict] = field(default_factory=dict)
    dared: dict[tuple, dict] = field(default_factory=dict)

    def release(self, dare_seed: int) -> None:
        """Drop the DARE'd models of ``dare_seed`` and their statistics (the seed's runs are finished)."""
        for cache in (self.statistics, self.dared):
            for key in [k for k in cache if k[-1] == dare_seed]:
                del cache[key]

    def pair(self, tasks: Sequence[str], dare: DareSettings, fisher_options: Mapping[str, Any] | None = None
             ) -> PairMerger:
        members = [self.tasks[t] for t in tasks]
        return PairMerger(list(tasks), [m.finetuned for m in members], self.pretrained, [m.model for m in members],
                          {m.task: m.loaders for m in members}, dare, fisher_options=dict(fisher_options or {}),
                          device=self.device, checkpoints={m.task: m.checkpoint for m in members},
                          _stats=self.statistics, _dared_cache=self.dared)


def dare_mask_index(task: str) -> int:
    """The DARE mask key of a task's model: its GLUE task index, the same in every pair (see TaskPool)."""
    return GLUE_TASK_NAMES.index(task)


@dataclass
class PairMerger:
    """Fine-tuned models, data and caches for merging one pair of tasks and scoring the merges."""

    tasks: list[str]
    finetuned: list[dict[str, torch.Tensor]]
    pretrained: dict[str, torch.Tensor]
    models: list[torch.nn.Module]
    loaders: dict[str, dict[str, Any]]
    dare: DareSettings
    fisher_options: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    fisher_estimator: str = "mergelm"
    checkpoints: dict[str, Any] = field(default_factory=dict)
    _stats: dict[tuple, dict] = field(default_factory=dict)
    _dared_cache: dict[tuple, dict] = field(default_factory=dict)
    _scores: dict[tuple, dict] = field(default_factory=dict)
    _last: tuple[tuple, dict] | None = None
    evaluations: list[dict[str, Any]] = field(default_factory=list)

    def _dare_key(self, rate: float | None) -> tuple:
        """What a DARE'd model depends on besides the rate: the mask seed (none without DARE)."""
        return (rate, self.dare.seed) if rate else (None, None)

    def _dare_settings(self, rate: float | None) -> tuple | None:
        return (self.dare.use_weight_rescale, self.dare.mask_strategy, self.dare.weight_format) if rate else None

    def _dared(self, rate: float | None) -> list[dict[str, torch.Tensor]]:
        if not rate:
            return self.finetuned
        # heads are never dropped, and their shapes differ between tasks (STS-B has one output): DARE runs on the
        # encoder only and each model keeps its own head
        encoder = lambda sd: {k: v for k, v in sd.items() if "classifier" not in k}
        out = []
        for task, sd in zip(self.tasks, self.finetuned, strict=True):
            key = (task, self._dare_settings(rate), *self._dare_key(rate))
            if key not in self._dared_cache:
                self._dared_cache[key] = {**sd, **dare_state_dict(encoder(self.pretrained), encoder(sd), rate,
                                                                  self.dare, model_index=dare_mask_index(task))}
            out.append(self._dared_cache[key])
        return out

    def clear_merged(self) -> None:
        """Forget the last merged state dict (kept while one setting is scored on both tasks)."""
        self._last = None

    def _statistics(self, kind: str, index: int, num_examples: int, rate: float | None, state: dict) -> dict:
        estimator = self.fisher_estimator if kind == "fisher" else None
        task = self.tasks[index]
        key = (task, kind, num_examples, estimator, self._dare_settings(rate), *self._dare_key(rate))
        if key not in self._stats:
            from model_merging_methods import compute_fisher_weights, compute_gram_matrices

            model = self.models[index]
            model.load_state_dict(state)
            train = self.loaders[task]["train"]
            loader = ({k: v for k, v in b.items() if k != "dataset_ids"} for b in train)
            if kind == "fisher":
                self._stats[key] = compute_fisher_weights(model, loader, num_examples=num_examples,
                                                          device=self.device, estimator=estimator)
            else:
                self._stats[key] = compute_gram_matrices(model, loader, num_examples=num_examples, device=self.device)
        return self._stats[key]

    def merge(self, method: str, setting: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Merged encoder state dict (classifier heads excluded) for one setting; DARE first if it has a rate."""
        from model_merging_methods import merge_state_dicts

        rate = setting.get("weight_mask_rate")
        states = self._dared(rate)
        hyper = {k: v for k, v in setting.items() if k != "weight_mask_rate"}
        if method == "fisher_merging":
            n, c = hyper.pop("num_fisher_examples"), hyper.pop("fisher_scaling_coefficient")
            hyper["fisher_weights"] = [self._statistics("fisher", i, n, rate, s) for i, s in enumerate(states)]
            hyper.update(fisher_scaling_coefficients=[c] * len(states), **self.fisher_options)
        elif method == "regmean_merging":
            n = hyper.pop("num_regmean_examples")
            hyper["gram_matrices"] = [self._statistics("gram", i, n, rate, s) for i, s in enumerate(states)]
        strip = lambda sd: {k: v for k, v in sd.items() if "classifier" not in k}
        return merge_state_dicts(method, strip(self.pretrained), [strip(s) for s in states],
                                 exclude_param_names_regex=list(GLUE_EXCLUDE_PARAM_NAMES_REGEX), **hyper)

    def score(self, method: str, setting: Mapping[str, Any], task: str, split: str) -> dict[str, Any]:
        """Metrics of the merged model on ``task``/``split`` with ``task``'s own head (memoised)."""
        fisher = self.fisher_estimator if method == "fisher_merging" else None
        mkey = (method, fisher, _key(setting), *self._dare_key(setting.get("weight_mask_rate")))
        key = (*mkey, task, split)
        if key not in self._scores:
            if self._last is None or self._last[0] != mkey:
                self._last = (mkey, self.merge(method, setting))
            index = self.tasks.index(task)
            heads = {k: v for k, v in self.finetuned[index].items() if "classifier" in k}
            model = self.models[index]
            model.load_state_dict({**self._last[1], **heads})
            metrics = evaluate_model(model, self.loaders[task][split], [task], device=self.device,
                                     desc=f"{task} {split}")
            self._scores[key] = metrics
            self.evaluations.append({"method": method, "setting": dict(setting), "task": task, "split": split,
                                     "dare_seed": self._dare_key(setting.get("weight_mask_rate"))[1],
                                     "fisher_estimator": fisher, "metrics": metrics})
        return self._scores[key]


def load_task_pool(
    tasks: Sequence[str], checkpoints: Mapping[str, Any], tokenizer: Any, *, language_model_name: str,
    data_options: Mapping[str, Any], batch_size: int = 16, device: str = "cpu", max_statistics_examples: int = 2048,
) -> TaskPool:
    """Load each task's fine-tuned model and train/validation/test loaders once, and the pretrained encoder."""
    loaded = {}
    for task in tasks:
        model = load_finetuned_classifier(checkpoints[task]).to(device)
        data = load_glue_task(task, tokenizer, max_train_samples=max_statistics_examples, **data_options)
        loaders = {split: make_dataloader(getattr(data, split), tokenizer, batch_size=batch_size,
                                          shuffle=split == "train", seed=0, sort_by_length=split != "train")
                   for split in ("train", "validation", "test")}
        finetuned = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        loaded[task] = TaskModel(task, checkpoints[task], model, finetuned, loaders)
    pretrained = load_pretrained_classifier(language_model_name, GLUE_TASKS[tasks[0]].num_labels).state_dict()
    return TaskPool(pretrained, loaded, device=device)


def select_best(merger: PairMerger, method: str, settings: Sequence[Mapping[str, Any]], task: str,
                select_on: str) -> dict[str, Any]:
    """The first setting with the highest primary metric on ``select_on`` (strictly-greater replaces).

    A NaN score (e.g. STS-B's correlation of a constant prediction) never wins; when every setting scores NaN the
    first setting is selected, with a warning.
    """
    best, best_score = None, -float("inf")
    for setting in tqdm(settings, desc=f"{method} grid ({task})", leave=False):
        score = primary_score(task, merger.score(method, setting, task, select_on))
        if best is None or score > best_score:  # NaN > x is False: a NaN never replaces a number
            best, best_score = dict(setting), score if score == score else -float("inf")
    if best_score == -float("inf"):
        logger.warning("%s on %s: every setting scored NaN on %s; selected the first, %s", method, task, select_on,
                       best)
    return best


def grid_search_pair(merger: PairMerger, method: str, grid: Mapping[str, Sequence[Any]], *,
                     dare_rates: Sequence[float] | None = None, select_on: str = "validation",
                     plain_best: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Per target task: the selected setting with its validation and test metrics.

    With ``dare_rates``, the plain method's best setting is selected first, then the drop rate (MergeLM order);
    ``plain_best`` (``{task: setting}``, e.g. read from the finished plain run) skips that first search.
    """
    if select_on not in ("validation", "test"):
        raise ValueError(f"select_on must be 'validation' or 'test', got {select_on!r}")
    results = {}
    for task in merger.tasks:
        if plain_best is not None and task in plain_best:
            best = dict(plain_best[task])
        else:
            best = select_best(merger, method, expand_grid(grid), task, select_on)
        if dare_rates:
            best = select_best(merger, method, [{**best, "weight_mask_rate": r} for r in dare_rates], task,
                               select_on)
        results[task] = {"hyperparameters": best, "selected_on": select_on,
                         "validation": merger.score(method, best, task, "validation"),
                         "test": merger.score(method, best, task, "test")}
        logger.info("%s on %s: best %s -> test %s", method, task, best, results[task]["test"])
    return results
