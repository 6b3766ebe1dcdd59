"""Evaluate one fine-tuned LLM on AlpacaEval, GSM8K, MATH, HumanEval or MBPP, optionally after DARE.

Example (DARE with p=0.9 on WizardMath-7B, then GSM8K):
    python inference_llms_instruct_math_code.py --dataset_name gsm8k --finetuned_model_name WizardMath-7B-V1.0 \
        --tensor_parallel_size 1 --weight_mask_rate 0.9 --use_weight_rescale

``--weight_mask_rate 0.0`` evaluates the fine-tuned model as it is. With a rate > 0, ``backbone + DARE(delta)`` is
written by the streaming merger (bf16) to ``save_models/{dataset}/{name}`` and deleted afterwards (unless
``--keep_model``). Results: ``results/inference_llms_instruct_math_code/{model}/{dataset}/{settings}/`` with
config.json, metrics.json, predictions/, generations/ (resumable) and external/ (files for the external tools).
Models resolve from ``--model_path NAME=PATH``, then the hub ids of llms/model_names.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cli.recipe_flags import add_homology_flags, add_hyperparameter_flags, dare_from_args
from common.run_dir import write_metrics
from llms.llm_cli import add_common_args, homology_from_args, settings_from_args, start_run
from llms.llm_configs import FINETUNED_MODEL_NAMES, LLM_DATASET_NAMES, LlmInferenceConfig
from llms.llm_merging import inference_model_paths, run_inference
from llms.model_resolution import parse_model_path_overrides
from model_merging_methods import DARE_SPECS

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finetuned_model_name", default="WizardLM-13B-V1.2", choices=FINETUNED_MODEL_NAMES)
    parser.add_argument("--dataset_name", default="alpaca_eval", choices=LLM_DATASET_NAMES)
    # DARE's flags with MergeLM's command-line defaults (--weight_mask_rate 0.1, --use_weight_rescale store_true);
    # one model, so one drop rate; --seed is the common flag (DARE masks and torch/numpy/random)
    rate = DARE_SPECS["weight_mask_rate"]
    parser.add_argument("--weight_mask_rate", type=rate.python_type(), default=rate.command_line_default,
                        help=f"{rate.help}; 0.0 evaluates the fine-tuned model as it is (default: "
                             f"{rate.command_line_default})")
    add_hyperparameter_flags(parser, methods=(), skip=("seed", "weight_mask_rate"))
    parser.add_argument("--wizardcoder_use_llama2_as_backbone", action="store_true",
                        help="take WizardCoder-Python-7B/13B deltas against Llama-2 instead of CodeLlama-Python")
    parser.add_argument("--save_models_dir", default="save_models", help="folder of the temporary DARE'd model")
    add_homology_flags(parser)
    add_common_args(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_config(args: argparse.Namespace) -> LlmInferenceConfig:
    """Flags -> validated configuration (no model is touched); ``--weight_mask_rate 0.0`` is plain inference."""
    return LlmInferenceConfig(
        finetuned_model_name=args.finetuned_model_name, dataset_name=args.dataset_name,
        dare=dare_from_args(args) if args.weight_mask_rate != 0.0 else None,
        wizardcoder_use_llama2_as_backbone=args.wizardcoder_use_llama2_as_backbone,
        model_paths=parse_model_path_overrides(args.model_path), save_models_dir=args.save_models_dir,
        save_dtype=args.save_dtype, keep_model=args.keep_model, merge_num_threads=args.merge_num_threads,
        **homology_from_args(args), evaluation=settings_from_args(args),
    )


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    config = build_config(args)
    paths = inference_model_paths(config)
    record = {**config.record(), "resolved_model_paths": paths}
    run_dir = start_run(config.run_dir(args.results_dir), args, record, argv)
    metrics = run_inference(config, run_dir, paths)
    write_metrics(run_dir, metrics)
    return metrics


if __name__ == "__main__":
    main()
