"""Evaluate fine-tuned GLUE encoders after DARE, DropOnly or magnitude pruning, over one or many drop rates.

Example:
    python inference_plms_glue.py --language_model_name roberta-base --weight_mask_rate 0.9 --use_weight_rescale
    python inference_plms_glue.py --language_model_name all-MiniLM-L6-v2 --dataset_names rte mrpc \
        --weight_mask_rate 0.0 0.1 0.3 0.5 0.7 0.9 0.99 --use_weight_rescale

DARE = ``--use_weight_rescale`` (random drop + 1/(1-p) rescale); without it, DropOnly. ``--mask_strategy
magnitude`` drops the smallest deltas; ``--weight_format finetuned_weight`` drops fine-tuned weights themselves.
Every (task, rate, mask seed) writes ``<output_dir>/inference_plms_glue/<task>/<model>/<fine-tuning run>/<settings>/``
with ``config.json`` and ``metrics.json`` (``{task: {"test": metrics}}``). ``--seeds 0 1 2`` repeats every random
drop with three mask seeds (magnitude pruning has no randomness and runs once); ``--resume`` skips finished runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from cli.recipe_flags import add_hyperparameter_flags, dare_from_args
from common.logging_setup import setup_logging
from common.run_dir import prepare_run_dir, read_json, write_config, write_metrics
from glue.encoder_models import device_for, load_tokenizer
from glue.glue_data import GLUE_TASK_NAMES
from glue.glue_finetune import add_checkpoint_args, add_rerun_flags, resolve_checkpoints
from glue.glue_inference import RESCALE_SEARCHES, SCRIPT_NAME, InferenceConfig, sweep_drop_rates

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)
    parser.add_argument("--dataset_names", nargs="+", default=list(GLUE_TASK_NAMES), choices=GLUE_TASK_NAMES)
    # DARE's declared flags; --weight_mask_rate takes a sweep (one run per rate, 0 = the fine-tuned model)
    add_hyperparameter_flags(parser, methods=(), several=("weight_mask_rate",))
    parser.add_argument("--rescale_search", choices=RESCALE_SEARCHES, default=None,
                        help="last_layer: per point, the rescale factor of the kept deltas that keeps the model's "
                             "last-layer outputs closest to the fine-tuned model's on 32 unlabelled training "
                             "examples (DAREx-q, arXiv 2410.09344), instead of 1/(1-p); needs --use_weight_rescale")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="several mask seeds (one run folder each; summarize_results.py reports mean +- std); "
                             "overrides --seed")
    add_rerun_flags(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[tuple[float, int], dict[str, Any]]]:
    """Returns ``{task: {(rate, seed): test metrics}}`` of the runs computed (and read back, with --resume)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    config = InferenceConfig(
        language_model_name=args.language_model_name, dataset_names=tuple(args.dataset_names),
        weight_mask_rates=tuple(args.weight_mask_rate),
        dare=dare_from_args(args, values={"weight_mask_rate": args.weight_mask_rate[0]}),
        batch_size=args.batch_size, max_seq_length=args.max_seq_length, max_eval_samples=args.max_eval_samples,
        glue_dir=args.glue_dir, device=device_for(args.gpu), seeds=tuple(args.seeds or ()),
        rescale_search=args.rescale_search)
    checkpoints = resolve_checkpoints(args, config.dataset_names)
    setup_logging()
    tokenizer = load_tokenizer(args.language_model_name)
    results: dict[str, dict[tuple[float, int], dict[str, Any]]] = {}
    for task in config.dataset_names:
        run_dirs = {(r, s): config.run_dir(args.output_dir, task, checkpoints[task], r, s)
                    for s in config.mask_seeds for r in config.weight_mask_rates}
        done = {point: read_json(d / "metrics.json")[task]["test"] for point, d in run_dirs.items()
                if args.resume and (d / "metrics.json").exists()}
        todo = [point for point in run_dirs if point not in done]
        for point in todo:
            prepare_run_dir(run_dirs[point], overwrite=args.overwrite, resume=args.resume)
        logger.info("%s: %d runs to compute, %d finished", task, len(todo), len(done))
        computed = sweep_drop_rates(config, task, checkpoints[task], tokenizer, todo) if todo else {}
        results[task] = {**done, **computed}
        for rate, seed in todo:
            record = {"script": SCRIPT_NAME, **asdict(config), "dare": config.settings(rate, seed).settings(),
                      "dataset_name": task, "weight_mask_rate": rate, "seed": seed,
                      "checkpoint": str(checkpoints[task])}
            write_config(run_dirs[(rate, seed)], record, argv)
            write_metrics(run_dirs[(rate, seed)], {task: {"test": results[task][(rate, seed)]}})
    logger.info("all results: %s", results)
    return results


if __name__ == "__main__":
    main()
