"""PEFT's factor-wise LoRA merges of GLUE adapters: the baseline that DARE on ΔW is compared with.

Example:
    python peft_lora_glue.py sweep --language_model_name all-MiniLM-L6-v2 --lora_rank 8 --learning_rate 5e-4 \
        --dataset_names rte mrpc --weight_mask_rate 0.1 0.5 0.9 --seeds 0 1 2
    python peft_lora_glue.py merge --language_model_name all-MiniLM-L6-v2 --lora_rank 8 --learning_rate 5e-4 \
        --dataset_names cola sst2 mrpc stsb rte --combination_type dare_linear --seeds 0

``sweep``: each adapter alone through ``add_weighted_adapter([a], [1], "dare_linear", density=1-p)``, PEFT's DARE on
the factors (compare ``inference_plms_glue.py --lora_rank R --use_weight_rescale``, DARE on ΔW). ``merge``: every pair
of tasks with ``dare_linear`` (plain counterpart ``linear``) or ``dare_ties`` (plain counterpart ``ties`` at density
1), selected per target task on validation as ``merge_plms_glue.py`` does: the plain combination's weight
(``--weights``, both adapters weighted alike) first, then the drop rate. The adapters come from
``train_plms_glue.py --lora_rank R`` (or ``--checkpoint TASK=PATH``). Each point writes a run folder under
``<output_dir>/peft_lora_glue/`` with ``config.json`` and ``metrics.json`` (the shapes of the inference and merge
scripts'), and ``--resume`` skips finished ones. Needs ``peft`` (``requirements.txt``).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from common.logging_setup import setup_logging
from common.run_dir import hyperparameter_dirname, prepare_run_dir, read_json, run_dir_for, write_config, write_metrics
from common.selection import select_best
from glue.encoder_models import (
    device_for,
    load_finetuned_classifier,
    load_pretrained_classifier,
    load_tokenizer,
    model_short_name,
)
from glue.glue_data import GLUE_TASK_NAMES, GLUE_TASKS, load_glue_task, make_dataloader
from glue.glue_finetune import (
    add_checkpoint_args,
    add_rerun_flags,
    checkpoint_tag,
    checkpoints_tag,
    resolve_checkpoints,
)
from glue.glue_metrics import primary_score
from glue.glue_training import evaluate_model
from glue.peft_factorwise import FactorwiseMerger, with_delta

logger = logging.getLogger(__name__)

SCRIPT_NAME = "peft_lora_glue"
PLAIN = {"dare_linear": "linear", "dare_ties": "ties"}
#: the weights searched for each combination: the reduced GLUE grid's lambdas of Task Arithmetic and of TIES
DEFAULT_WEIGHTS = {"dare_linear": (0.3, 0.5, 0.7, 1.0), "dare_ties": (0.5, 1.0)}
DEFAULT_MERGE_RATES = (0.1, 0.5, 0.9)  # DARE's reduced GLUE grid


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["sweep", "merge"])
    add_checkpoint_args(parser)
    parser.add_argument("--dataset_names", nargs="+", default=list(GLUE_TASK_NAMES), choices=GLUE_TASK_NAMES)
    parser.add_argument("--weight_mask_rate", type=float, nargs="+", default=None,
                        help="drop rates p (density 1 - p); sweep default 0.1 0.5 0.9, merge default 0.1 0.5 0.9")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0],
                        help="torch seeds of PEFT's masks; merge: none (--seeds alone) runs only the plain merge")
    parser.add_argument("--combination_type", choices=sorted(PLAIN), default="dare_linear", help="merge mode only")
    parser.add_argument("--weights", type=float, nargs="+", default=None,
                        help="adapter weights searched (both alike); default: 0.3 0.5 0.7 1.0 (dare_linear), "
                             "0.5 1.0 (dare_ties)")
    parser.add_argument("--max_validation_samples", type=int, default=None, help="merge selection cap")
    add_rerun_flags(parser)
    return parser


def _check_rates(rates: Sequence[float]) -> None:
    for rate in rates:
        if not 0.0 < rate < 1.0:
            raise ValueError(f"--weight_mask_rate values must be in (0, 1) (density = 1 - p), got {rate}")


class Evaluator:
    """Each task's adapter model (for its head), loaders and the pretrained weights; scores ``W + ΔW``."""

    def __init__(self, args: argparse.Namespace, tasks: Sequence[str], checkpoints: dict[str, Path],
                 splits: Sequence[str]) -> None:
        self.device = device_for(args.gpu)
        tokenizer = load_tokenizer(args.language_model_name)
        self.models, self.loaders, self.heads = {}, {}, {}
        for task in tasks:
            model = load_finetuned_classifier(checkpoints[task])
            self.heads[task] = {k: v.clone() for k, v in model.state_dict().items() if "classifier" in k}
            self.models[task] = model.to(self.device)
            data = load_glue_task(task, tokenizer, glue_dir=args.glue_dir, max_seq_length=args.max_seq_length,
                                  max_eval_samples=args.max_eval_samples, max_train_samples=0,
                                  max_validation_samples=getattr(args, "max_validation_samples", None))
            self.loaders[task] = {split: make_dataloader(getattr(data, split), tokenizer, batch_size=args.batch_size,
                                                         sort_by_length=True) for split in splits}
        self.pretrained = load_pretrained_classifier(args.language_model_name,
                                                     GLUE_TASKS[tasks[0]].num_labels).state_dict()
        self.encoder = {k: v for k, v in self.pretrained.items() if "classifier" not in k}
        self.cache: dict[tuple, dict] = {}

    def score(self, key: tuple, make_delta: Callable[[], dict[str, torch.Tensor]], task: str,
              split: str) -> dict[str, Any]:
        """Metrics of ``W + ΔW`` (``make_delta()``, called only when ``key`` was not scored yet) with ``task``'s
        head, memoised by ``(key, task, split)``."""
        if (key, task, split) not in self.cache:
            model = self.models[task]
            model.load_state_dict({**with_delta(self.encoder, make_delta()), **self.heads[task]})
            self.cache[(key, task, split)] = evaluate_model(model, self.loaders[task][split], [task],
                                                            device=self.device, desc=f"{task} {split} {key}")
        return self.cache[(key, task, split)]


def run_sweep(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    rates = tuple(args.weight_mask_rate or (0.1, 0.5, 0.9))
    _check_rates(rates)
    if not args.seeds:
        raise ValueError("sweep needs at least one mask seed, got none; pass --seeds 0 (or more)")
    checkpoints = resolve_checkpoints(args, args.dataset_names)
    results = {}
    for task in args.dataset_names:
        def run_dir(rate: float, seed: int, task: str = task) -> Path:
            hyper = {"combination_type": "dare_linear", "weight_mask_rate": rate, "seed": seed}
            if args.max_eval_samples is not None:
                hyper["max_eval_samples"] = args.max_eval_samples
            return run_dir_for(args.output_dir, SCRIPT_NAME, "sweep", task, model_short_name(args.language_model_name),
                               checkpoint_tag(checkpoints[task], args.output_dir), hyperparameter_dirname(hyper))
        points = [(r, s) for s in args.seeds for r in rates]
        todo = [p for p in points if not (args.resume and (run_dir(*p) / "metrics.json").exists())]
        results[task] = {p: read_json(run_dir(*p) / "metrics.json")[task]["test"] for p in points if p not in todo}
        if not todo:
            continue
        for point in todo:
            prepare_run_dir(run_dir(*point), overwrite=args.overwrite, resume=args.resume)
        evaluator = Evaluator(args, [task], checkpoints, ["test"])
        base = load_pretrained_classifier(args.language_model_name, GLUE_TASKS[task].num_labels)
        merger = FactorwiseMerger({task: checkpoints[task]}, base)
        for rate, seed in todo:
            make = partial(merger.delta, [task], [1.0], "dare_linear", density=1.0 - rate, seed=seed)
            metrics = evaluator.score(("dare_linear", rate, seed), make, task, "test")
            results[task][(rate, seed)] = metrics
            logger.info("%s PEFT dare_linear p=%s seed=%s: %s", task, rate, seed, metrics)
            record = {"script": SCRIPT_NAME, "mode": "sweep", "combination_type": "dare_linear",
                      "language_model_name": args.language_model_name, "dataset_name": task,
                      "weight_mask_rate": rate, "density": 1.0 - rate, "seed": seed,
                      "checkpoint": str(checkpoints[task]), "max_eval_samples": args.max_eval_samples}
            write_config(run_dir(rate, seed), record, list(argv))
            write_metrics(run_dir(rate, seed), {task: {"test": metrics}})
    return results


def _select(evaluator: Evaluator, candidates: list[tuple[tuple, Any]], task: str) -> tuple[tuple, Any]:
    """The candidate ``(key, delta thunk)`` with the best validation score (first on ties; NaN never wins)."""
    scored = [((key, make), primary_score(task, evaluator.score(key, make, task, "validation")))
              for key, make in candidates]
    best = select_best(scored)
    return best[0] if best is not None else candidates[0]


def run_merge(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    combination, plain = args.combination_type, PLAIN[args.combination_type]
    rates = tuple(args.weight_mask_rate or DEFAULT_MERGE_RATES)
    _check_rates(rates)
    weights = tuple(args.weights or DEFAULT_WEIGHTS[combination])
    checkpoints = resolve_checkpoints(args, args.dataset_names)
    pairs = list(itertools.combinations(args.dataset_names, 2))
    results = {}
    for pair in pairs:
        pair_checkpoints = {t: checkpoints[t] for t in pair}

        def run_dir(seed: int | None, pair: tuple = pair, pair_checkpoints: dict = pair_checkpoints) -> Path:
            hyper = {"checkpoints": checkpoints_tag(pair_checkpoints, args.output_dir), "select_on": "validation",
                     "weights": list(weights)}
            if seed is not None:
                hyper.update(seed=seed, weight_mask_rates=list(rates))
            for cap in ("max_validation_samples", "max_eval_samples"):
                if getattr(args, cap) is not None:
                    hyper[cap] = getattr(args, cap)
            return run_dir_for(args.output_dir, SCRIPT_NAME, "merge", "+".join(pair),
                               model_short_name(args.language_model_name), combination if seed is not None else plain,
                               hyperparameter_dirname(hyper))
        runs = [None, *args.seeds]
        todo = [s for s in runs if not (args.resume and (run_dir(s) / "metrics.json").exists())]
        if not todo:
            continue
        for seed in todo:
            prepare_run_dir(run_dir(seed), overwrite=args.overwrite, resume=args.resume)
        evaluator = Evaluator(args, pair, checkpoints, ["validation", "test"])
        base = load_pretrained_classifier(args.language_model_name, GLUE_TASKS[pair[0]].num_labels)
        merger = FactorwiseMerger(pair_checkpoints, base)
        names = list(pair)

        plain_file = run_dir(None) / "metrics.json"
        if plain_file.exists() and None not in todo:  # the finished plain run's selection (another process's)
            chosen = {task: read_json(plain_file)[task]["hyperparameters"]["weight"] for task in pair}
            best_plain = {task: ((plain, w), partial(merger.delta, names, [w, w], plain))
                          for task, w in chosen.items()}
        else:
            best_plain = {task: _select(evaluator, [((plain, w), partial(merger.delta, names, [w, w], plain))
                                                    for w in weights], task) for task in pair}
        for seed in runs:
            if seed not in todo:
                continue
            metrics = {}
            for task in pair:
                key, make = best_plain[task]
                setting = {"weight": key[1]}
                if seed is not None:
                    weight = key[1]
                    key, make = _select(evaluator, [((combination, weight, r, seed), partial(
                        merger.delta, names, [weight, weight], combination, density=1.0 - r, seed=seed))
                        for r in rates], task)
                    setting["weight_mask_rate"] = key[2]
                metrics[task] = {"hyperparameters": setting, "selected_on": "validation",
                                 "combination_type": key[0],
                                 "validation": evaluator.score(key, make, task, "validation"),
                                 "test": evaluator.score(key, make, task, "test")}
            results[(pair, seed)] = metrics
            record = {"script": SCRIPT_NAME, "mode": "merge", "combination_type": combination if seed is not None
                      else plain, "language_model_name": args.language_model_name, "dataset_pair": list(pair),
                      "weights": list(weights), "weight_mask_rates": list(rates) if seed is not None else None,
                      "seed": seed, "checkpoints": {t: str(p) for t, p in pair_checkpoints.items()},
                      "max_validation_samples": args.max_validation_samples,
                      "max_eval_samples": args.max_eval_samples}
            write_config(run_dir(seed), record, list(argv))
            write_metrics(run_dir(seed), metrics)
            logger.info("%s %s seed %s: %s", "+".join(pair), combination, seed,
                        {t: m["test"] for t, m in metrics.items()})
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.lora_rank is None and not args.checkpoint:
        raise ValueError("the PEFT baseline merges LoRA adapters: pass --lora_rank R (the train_plms_glue.py runs) "
                         "or --checkpoint TASK=ADAPTER_FOLDER")
    setup_logging()
    return run_sweep(args, argv) if args.mode == "sweep" else run_merge(args, argv)


if __name__ == "__main__":
    main()
