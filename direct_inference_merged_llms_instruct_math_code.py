"""Evaluate an already-merged LLM folder on one task's datasets (no merging, nothing deleted).

Example (the README's command; the folder must have been kept by ``merge_llms_instruct_math_code.py
--keep_model`` with the same flags, or left by an interrupted run):
    python direct_inference_merged_llms_instruct_math_code.py --merge_instruct --merge_math \
        --merging_method_name mask_merging --use_weight_rescale --weight_mask_rate 0.2 \
        --mask_apply_method average_merging --tensor_parallel_size 1 --evaluate_task math

The folder is ``save_merge_models/{tasks}/{evaluate_task}/{name}`` as MergeLM named it, or ``--merged_model_path``
(then the --merge_* flags are optional). instruct -> alpaca_eval, math -> gsm8k + MATH, code -> human_eval +
mbpp. Results: ``results/direct_inference_merged_llms_instruct_math_code/...``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cli.recipe_flags import refuse_unused_flags
from common.run_dir import write_metrics
from llms.llm_cli import (
    add_common_args,
    add_merge_args,
    merge_config_from_args,
    merge_tasks_from_args,
    settings_from_args,
    start_run,
)
from llms.llm_configs import MERGE_TASK_ORDER, DirectInferenceConfig
from llms.llm_merging import check_direct_inputs, run_direct_inference

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_merge_args(parser)
    parser.add_argument("--evaluate_task", default="instruct", choices=MERGE_TASK_ORDER)
    parser.add_argument("--merged_model_path", default=None, help="evaluate this folder instead of the one the "
                        "merge flags name")
    add_common_args(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_config(args: argparse.Namespace) -> DirectInferenceConfig:
    """Flags -> validated configuration; the merge flags are optional with ``--merged_model_path``."""
    settings = settings_from_args(args)
    has_merge_flags = args.merged_model_path is None or len(merge_tasks_from_args(args)) >= 2
    merge = merge_config_from_args(args, settings, merges=False) if has_merge_flags else None
    return DirectInferenceConfig(evaluate_task=args.evaluate_task, merge=merge,
                                 merged_model_path=args.merged_model_path, evaluation=settings)


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    config = build_config(args)
    recipes = [config.merge.recipe] if config.merge is not None else []
    refuse_unused_flags(parser, args, recipes, also_used=("seed",))  # --seed also seeds torch/numpy
    check_direct_inputs(config)
    run_dir = start_run(config.run_dir(args.results_dir), args, config.record(), argv)
    metrics = run_direct_inference(config, run_dir)
    write_metrics(run_dir, metrics)
    return metrics


if __name__ == "__main__":
    main()
