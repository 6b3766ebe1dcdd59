"""DARE / DropOnly / magnitude pruning of fine-tuned GLUE classifiers, evaluated over a sweep of drop rates."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.run_dir import hyperparameter_dirname, run_dir_for
from glue.encoder_models import load_finetuned_classifier, load_pretrained_classifier, model_short_name
from glue.glue_data import GLUE_TASK_NAMES, GLUE_TASKS, get_glue_task, load_glue_task, make_dataloader
from glue.glue_finetune import checkpoint_tag
from glue.glue_training import evaluate_model, predict
from model_merging_methods import DARE_SPECS, Dare, apply_dare

logger = logging.getLogger(__name__)

SCRIPT_NAME = "inference_plms_glue"
GLUE_EXCLUDE_PARAM_NAMES_REGEX = (".*classifier.*",)
RESCALE_SEARCHES = ("last_layer",)
#: unlabelled training examples the rescale search compares outputs on (DAREx uses one small batch)
RESCALE_SEARCH_EXAMPLES = 32
RESCALE_SEARCH_CANDIDATES = 24


def dare_state_dict(
    pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], dare: Dare, *, model_index: int = 0,
) -> dict[str, torch.Tensor]:
    """The fine-tuned state dict after DARE (identity at rate 0 with the paper's rescale); classifier heads are never
    dropped."""
    if dare.weight_mask_rate == 0.0 and dare.rescale_factor is None:
        return dict(finetuned)
    return apply_dare(dict(pretrained), dict(finetuned), weight_mask_rate=dare.weight_mask_rate,
                      use_weight_rescale=dare.use_weight_rescale, mask_strategy=dare.mask_strategy,
                      weight_format=dare.weight_format, seed=dare.seed, model_index=model_index,
                      exclude_param_names_regex=list(GLUE_EXCLUDE_PARAM_NAMES_REGEX),
                      rescale_factor=dare.rescale_factor)


@dataclass(frozen=True)
class InferenceConfig:
    """``inference_plms_glue.py``: tasks, drop rates, mask seeds and how the fine-tuned checkpoints are found."""

    language_model_name: str = "roberta-base"
    dataset_names: tuple[str, ...] = GLUE_TASK_NAMES
    #: MergeLM's command-line default (DARE's drop rate has no library default: the rate is the experiment)
    weight_mask_rates: tuple[float, ...] = (DARE_SPECS["weight_mask_rate"].command_line_default,)
    #: how weights are dropped: the first point of the sweep (each point replaces its rate and seed); None: DARE's
    #: declared defaults at the first rate
    dare: Dare | None = None
    batch_size: int = 16
    max_seq_length: int = 128
    max_eval_samples: int | None = None
    glue_dir: str | None = None
    device: str = "cpu"
    seeds: tuple[int, ...] = ()
    #: ``last_layer``: per point, the rescale factor chosen on an unlabelled training batch (DAREx-q, see
    #: :func:`search_rescale_factor`) instead of 1/(1-p)
    rescale_search: str | None = None

    def __post_init__(self) -> None:
        for name in self.dataset_names:
            get_glue_task(name)
        if self.rescale_search not in (None, *RESCALE_SEARCHES):
            raise ValueError(f"rescale_search must be one of {', '.join(RESCALE_SEARCHES)}, got "
                             f"{self.rescale_search!r}")
        if not self.weight_mask_rates:
            raise ValueError("the sweep needs at least one drop rate, got none; pass --weight_mask_rate")
        dare = self.dare or Dare(self.weight_mask_rates[0])
        for rate in self.weight_mask_rates:  # each drop rate checked by DARE's declaration, before any work
            replace(dare, weight_mask_rate=rate)
        object.__setattr__(self, "dare", replace(dare, weight_mask_rate=self.weight_mask_rates[0]))
        searchable = (self.dare.use_weight_rescale and self.dare.rescale_factor is None
                      and self.dare.mask_strategy == "random")
        if self.rescale_search is not None and not searchable:
            raise ValueError("rescale_search chooses DARE's rescale factor: it needs --use_weight_rescale, the random "
                             "strategy and no --rescale_factor, got " + self.dare.variant)

    @property
    def mask_seeds(self) -> tuple[int, ...]:
        """The seeds to run: ``seeds`` (default: the one in ``dare``); one for magnitude pruning (no randomness)."""
        seeds = tuple(dict.fromkeys(self.seeds or (self.dare.seed,)))
        return seeds[:1] if self.dare.mask_strategy == "magnitude" else seeds

    def settings(self, rate: float, seed: int) -> Dare:
        """The DARE settings of one point of the sweep."""
        return replace(self.dare, weight_mask_rate=rate, seed=seed)

    def run_dir(self, output_dir: str | os.PathLike, task: str, checkpoint: Path, rate: float,
                seed: int | None = None) -> Path:
        """``<output>/inference_plms_glue/<task>/<model>/<fine-tuning run>/<drop settings>``."""
        hyper = self.settings(rate, self.dare.seed if seed is None else seed).settings()
        if self.rescale_search is not None:
            hyper["rescale_search"] = self.rescale_search
        if self.max_eval_samples is not None:
            hyper["max_eval_samples"] = self.max_eval_samples
        return run_dir_for(output_dir, SCRIPT_NAME, task, model_short_name(self.language_model_name),
                           checkpoint_tag(checkpoint, output_dir), hyperparameter_dirname(hyper))


def _logits(model: torch.nn.Module, state: Mapping[str, torch.Tensor], loader: Any, device: str) -> np.ndarray:
    model.load_state_dict(state)
    model.to(device)
    return predict(model, loader, device=device, desc="rescale search")["logits"]


def search_rescale_factor(model: torch.nn.Module, pretrained: Mapping[str, torch.Tensor],
                          finetuned: Mapping[str, torch.Tensor], dare: Dare, loader: Any, *, device: str = "cpu",
                          candidates: int = RESCALE_SEARCH_CANDIDATES) -> tuple[float, dict[str, Any]]:
    """DAREx-q (Deng et al., arXiv 2410.09344) without labels: the factor ``s`` by which the kept deltas are scaled
    that minimises the mean squared change of the model's last-layer outputs (the classifier logits) on the
    ``loader``'s unlabelled training examples, against the fine-tuned model.

    The candidates are ``candidates`` values spaced geometrically from 1 (DropOnly) to 1.5 / (1 - p) (beyond
    DARE's 1 / (1 - p), which is always a candidate); each candidate's model is built by the library
    (``dare`` with ``rescale_factor = s``: same mask, same arithmetic), so the chosen factor's model is exactly the
    one scored. Returns ``(s, {"candidates", "errors", "dare_error"})``.
    """
    reference = _logits(model, finetuned, loader, device)
    paper = 1.0 / (1.0 - dare.weight_mask_rate)
    grid = sorted({*np.geomspace(1.0, 1.5 * paper, candidates).tolist(), paper})
    errors = []
    for factor in grid:
        state = dare_state_dict(pretrained, finetuned, replace(dare, rescale_factor=factor))
        errors.append(float(np.mean((_logits(model, state, loader, device) - reference) ** 2)))
    best = int(np.argmin(errors))
    return grid[best], {"candidates": grid, "errors": errors, "dare_error": errors[grid.index(paper)]}


def sweep_drop_rates(config: InferenceConfig, task: str, checkpoint: Path, tokenizer: Any,
                     points: Sequence[tuple[float, int]] | None = None) -> dict[tuple[float, int], dict]:
    """Test metrics of one fine-tuned model at every ``(rate, seed)`` point (default: every rate x mask seed).

    Rate 0 (no drop) is evaluated once and shared by every seed. With ``rescale_search`` each point's metrics also
    hold ``rescale_factor`` (the chosen factor) and ``rescale_search`` (candidates and errors).
    """
    if points is None:
        points = [(r, s) for s in config.mask_seeds for r in config.weight_mask_rates]
    finetuned_model = load_finetuned_classifier(checkpoint)
    finetuned = {k: v.clone() for k, v in finetuned_model.state_dict().items()}
    pretrained = load_pretrained_classifier(config.language_model_name, GLUE_TASKS[task].num_labels).state_dict()
    search = config.rescale_search is not None
    data = load_glue_task(task, tokenizer, glue_dir=config.glue_dir, max_seq_length=config.max_seq_length,
                          max_eval_samples=config.max_eval_samples,
                          max_train_samples=RESCALE_SEARCH_EXAMPLES if search else 0)
    loader = make_dataloader(data.test, tokenizer, batch_size=config.batch_size, sort_by_length=True)
    unlabelled = make_dataloader(data.train, tokenizer, batch_size=config.batch_size) if search else None
    results: dict[tuple[float, int], dict] = {}
    unmasked = None
    for rate, seed in points:
        if rate == 0.0 and unmasked is not None:
            results[(rate, seed)] = unmasked
            continue
        dare, chosen = config.settings(rate, seed), {}
        if search and rate > 0.0:
            factor, trace = search_rescale_factor(finetuned_model, pretrained, finetuned, dare, unlabelled,
                                                  device=config.device)
            dare, chosen = replace(dare, rescale_factor=factor), {"rescale_factor": factor, "rescale_search": trace}
            logger.info("%s p=%s seed=%s: rescale factor %.4g chosen (DARE's %.4g)", task, rate, seed, factor,
                        1 / (1 - rate))
        finetuned_model.load_state_dict(dare_state_dict(pretrained, finetuned, dare))
        finetuned_model.to(config.device)
        results[(rate, seed)] = {**evaluate_model(finetuned_model, loader, [task], device=config.device,
                                                  desc=f"{task} p={rate} seed={seed}"), **chosen}
        unmasked = results[(rate, seed)] if rate == 0.0 else unmasked
        logger.info("%s test performance at weight_mask_rate %s, seed %s: %s", task, rate, seed,
                    results[(rate, seed)])
    return results
