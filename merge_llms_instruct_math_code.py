"""Merge two or three of WizardLM-13B-V1.2 / WizardMath-13B-V1.0 / llama-2-13b-code-alpaca and evaluate the result.

Example (DARE p=0.2 on both deltas, then averaging; the README's command):
    python merge_llms_instruct_math_code.py --merge_instruct --merge_math --merging_method_name mask_merging \
        --use_weight_rescale --weight_mask_rate 0.2 --mask_apply_method average_merging --tensor_parallel_size 1

Methods: every registered method that needs no Fisher/Gram statistics (average_merging, task_arithmetic,
ties_merging, ...) and mask_merging (DARE, then ``--mask_apply_method``; ``ties_merging`` there is DARE-TIES); each
method's settings have their own flags, and a flag the chosen method does not read is refused. The models are
merged ONCE by the streaming merger (bf16 on disk) into
``save_merge_models/{tasks}/{task}/{name}`` (one folder per task, sharing the weight files, each with its task's
tokenizer), then each task is evaluated from its folder: instruct -> alpaca_eval, math -> gsm8k + MATH,
code -> human_eval + mbpp. With vLLM every dataset is generated in its own process, so one GPU set suffices.
The folders are deleted at the end unless ``--keep_model``. Results:
``results/merge_llms_instruct_math_code/{tasks}/{method}/{settings}/``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cli.recipe_flags import add_homology_flags, refuse_unused_flags
from common.run_dir import write_metrics
from llms.llm_cli import add_common_args, add_merge_args, merge_config_from_args, settings_from_args, start_run
from llms.llm_merging import merge_model_paths, run_merge

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_merge_args(parser)
    add_homology_flags(parser)
    add_common_args(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    config = merge_config_from_args(args, settings_from_args(args))
    refuse_unused_flags(parser, args, [config.recipe], also_used=("seed",))  # --seed also seeds torch/numpy
    paths = merge_model_paths(config)
    record = {**config.record(), "resolved_model_paths": paths}
    run_dir = start_run(config.run_dir(args.results_dir), args, record, argv)
    metrics = run_merge(config, run_dir, paths)
    write_metrics(run_dir, metrics)
    return metrics


if __name__ == "__main__":
    main()
